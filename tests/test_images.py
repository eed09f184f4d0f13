"""Images into bronze.images: DICOM of every transfer syntax in the shared set (and a generated
multi-frame one), PNG folders and NPZ sets, pixels in the declared shape, identifying tags sealed,
unreadable files quarantined."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import opened, shared

from ehrlake import clean, ingest
from ehrlake.ingest import SourceKind, images

SPEC = images.load_spec()


def _multiframe(path, frames: int = 3) -> None:
    """A small multi-frame MR instance written with pydicom (explicit VR little endian)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined = "MR", "BRAIN"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-0042", "19700101"
    ds.InstitutionName, ds.AccessionNumber = "District Hospital", "ACC-7"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 32, 48, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(frames * 32 * 48, dtype=np.uint16) % 4096).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(shared("dicom"), folder / "dicom", ignore=shutil.ignore_patterns("*.md"))
    shutil.copytree(shared("medmnist", "breastmnist_png_sample"), folder / "png")
    _multiframe(folder / "dicom" / "multiframe.dcm")
    (folder / "dicom" / "broken.dcm").write_bytes(b"not a dicom file at all")
    (folder / "png" / "0" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return folder


def test_dicom_and_png_land_normalised_with_tags_sealed(lake, image_dir):
    report = ingest.run(lake, SourceKind.IMAGES, str(image_dir), source_system="pacs")
    assert report.balanced
    counts = report.entities[images.TABLE]
    # 5 DICOM files + 3 frames + 32 PNGs (+2 broken); MR_small in three transfer syntaxes is one
    # SOP instance, so one row and two duplicates
    assert counts.records_in == 5 + 3 + 32 + 2 and counts.quarantined == 2 and counts.duplicate == 2
    rows = {r.image_id: r for r in opened(lake, images.TABLE).collect()}
    dicom = [r for r in rows.values() if r.format == "dicom"]
    assert {r.modality for r in dicom} == {"CT", "MR"}
    ct = next(r for r in dicom if r.modality == "CT")
    assert ct.original_shape == [128, 128] and (ct.height, ct.width) == tuple(SPEC.shape)
    px = images.pixels_of(ct.pixels, SPEC)
    assert px.dtype == np.float32 and px.min() == 0.0 and px.max() == 1.0
    # the three endianness / VR variants of one MR image decode to the same pixels
    variants = [
        images.decode_file(str(image_dir / "dicom" / f), str(image_dir), SPEC)[0]
        for f in ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm")
    ]
    assert len({v["image_id"] for v in variants}) == 1 and variants[0]["original_shape"] == [64, 64]
    assert all(v["pixels"] == variants[0]["pixels"] for v in variants)
    frames = sorted((r for r in dicom if r.frame and r.original_shape == [32, 48]), key=lambda r: r.frame)
    assert [r.frame for r in frames] == [1, 2, 3] and frames[0].image_id.endswith("#1")
    assert frames[0].patient_id == "MRN-0042" and frames[0].patient_name == "Doe^Jane"
    assert frames[0].body_part == "BRAIN" and frames[0].patient_key
    pngs = [r for r in rows.values() if r.format == "png"]
    assert len(pngs) == 32 and {r.label for r in pngs} == {0, 1}
    # stored sealed: identifiers are ciphertext in the table itself
    stored = lake.read(images.TABLE).where("frame = 2 AND modality = 'MR' AND height = 64").collect()
    sealed = [r for r in stored if r.patient_id and r.patient_id.startswith("ek2:")]  # to the reveal key
    assert sealed and all(r.patient_name.startswith("ek2:") for r in sealed)
    reasons = {r.reason for r in lake.read("ops.quarantine").collect()}
    assert reasons == {"unreadable_image"}
    # re-running adds nothing
    again = ingest.run(lake, SourceKind.IMAGES, str(image_dir), source_system="pacs")
    assert again.files_new == 0 and lake.row_count(images.TABLE) == 3 + 3 + 32
    # silver.imaging: the same images, no identifying column, pixels of the declared size
    clean.run(lake)
    silver = lake.read("silver.imaging")
    assert silver.count() == 3 + 3 + 32 and "patient_id" not in silver.columns
    sizes = {len(r.pixels) for r in silver.select("pixels").collect()}
    assert sizes == {SPEC.shape[0] * SPEC.shape[1] * 4}


def test_npz_sets_keep_split_and_label(lake, tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    shutil.copy(shared("medmnist", "breastmnist.npz"), folder)
    report = ingest.run(lake, SourceKind.IMAGES, str(folder), source_system="medmnist")
    assert report.entities[images.TABLE].inserted == 546 + 78 + 156
    df = lake.read(images.TABLE)
    by_split = {r.split: r["count"] for r in df.groupBy("split").count().collect()}
    assert by_split == {"train": 546, "val": 78, "test": 156}
    test_labels = {r.label: r["count"] for r in df.where("split = 'test'").groupBy("label").count().collect()}
    assert test_labels == {0: 42, 1: 114}
    one = df.where("image_id = 'breastmnist.npz/test/0'").first()
    source = np.load(shared("medmnist", "breastmnist.npz"))["test_images"][0].astype(np.float64)
    expected = np.frombuffer(images.normalised(source, SPEC), dtype="<f4")
    assert np.array_equal(np.frombuffer(one.pixels, dtype="<f4"), expected)
