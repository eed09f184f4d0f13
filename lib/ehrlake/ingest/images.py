"""Medical images into ``bronze.images``: DICOM, PNG and NPZ image sets, decoded on the executors.

Every image becomes one row (a multi-frame DICOM one row per frame, an NPZ set one row per array
entry) with pixels resampled to the shape and type declared in ``conf/imaging.yaml`` (float32 in
[0, 1], after the DICOM rescale slope/intercept), so training jobs read fixed-size tensors without
decoding files again. DICOM headers give modality, body part, study/series/instance UIDs and the
patient; the identifying tags (patient name, id, birth date, institution, physicians, accession
number) are sealed like every identifier, and ``patient_key`` links the image to the patient's
records. A file that cannot be read or decoded is quarantined with its reason (``unreadable_image``).

Keys: a DICOM image is its SOP Instance UID (``#<frame>`` for frames of a multi-frame instance); a
PNG its path relative to the input; an NPZ entry ``<file>/<split>/<index>``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.config import build, read_yaml
from ehrlake.errors import ConfigError
from ehrlake.home import CONF
from ehrlake.ingest.lineage import lineage
from ehrlake.ingest.quarantine import Reason

TABLE = "bronze.images"
KEYS = ["source_system", "image_id"]
UPDATE_WHEN = "s.record_hash <> t.record_hash"
IMAGING_FILE = CONF / "imaging.yaml"
IDENTIFYING_TAGS = {  # DICOM keyword -> sealed column
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "InstitutionName": "institution_name",
    "ReferringPhysicianName": "referring_physician",
    "PerformingPhysicianName": "performing_physician",
    "AccessionNumber": "accession_number",
}
DECODED = (
    "image_id string, source_file string, record_index long, format string, modality string, "
    "body_part string, study_uid string, series_uid string, instance_uid string, frame int, "
    "study_date string, label int, split string, original_shape array<int>, original_dtype string, "
    "height int, width int, pixels binary, "
    + ", ".join(f"{c} string" for c in IDENTIFYING_TAGS.values())
    + ", raw string, _reason string, _message string"
)


@dataclass(frozen=True)
class ImageSpec:
    """conf/imaging.yaml: what every image becomes in bronze."""

    shape: tuple = (64, 64)  # rows, columns
    dtype: str = "float32"
    normalise: str = "minmax"
    npz_splits: tuple = ("train", "val", "test")

    def validate(self) -> None:
        sizes = len(self.shape) == 2 and all(isinstance(x, int) and x > 0 for x in self.shape)
        if not sizes or self.dtype != "float32" or self.normalise != "minmax":
            raise ConfigError(
                "imaging: shape must be [rows, cols] (positive integers), dtype float32 and normalise minmax"
            )


def load_spec(path: str | Path | None = None) -> ImageSpec:
    """The image specification, typed and checked (an unknown key or a wrong type is named)."""
    file = Path(path or IMAGING_FILE)
    try:
        return build(ImageSpec, read_yaml(file), "imaging")
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


# --- decoding (runs on executors; pure functions of bytes, testable without Spark) ---------------


def normalised(array, spec: ImageSpec) -> bytes:
    """A 2-D array -> ``spec.shape`` float32 pixels in [0, 1] (little-endian bytes): resampled
    (bilinear), then min-max scaled per image."""
    import numpy as np
    from PIL import Image

    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # colour: luminance
        a = a[..., :3] @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {a.shape}")
    rows, cols = spec.shape
    img = Image.fromarray(a.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BILINEAR)
    b = np.asarray(img, dtype=np.float64)
    low, high = float(np.nanmin(b)), float(np.nanmax(b))  # after resampling: exactly [0, 1]
    b = (b - low) / (high - low) if high > low else np.zeros_like(b)
    return b.astype("<f4").tobytes()


def pixels_of(row_bytes: bytes, spec: ImageSpec):
    """Inverse of :func:`normalised` for readers: bytes -> (rows, cols) float32 array."""
    import numpy as np

    return np.frombuffer(row_bytes, dtype="<f4").reshape(spec.shape)


def _empty(path: str, index: int, fmt: str) -> dict:
    return {
        "image_id": None, "source_file": path, "record_index": index, "format": fmt, "modality": None,
        "body_part": None, "study_uid": None, "series_uid": None, "instance_uid": None, "frame": None,
        "study_date": None, "label": None, "split": None, "original_shape": None, "original_dtype": None,
        "height": None, "width": None, "pixels": None, **{c: None for c in IDENTIFYING_TAGS.values()},
        "raw": json.dumps({"file": path, "index": index}), "_reason": None, "_message": None,
    }  # fmt: skip


def _failed(path: str, index: int, fmt: str, exc: Exception) -> dict:
    row = _empty(path, index, fmt)
    row["_reason"] = Reason.UNREADABLE_IMAGE.value
    row["_message"] = f"{fmt}: {type(exc).__name__}: {str(exc)[:300]}"
    return row


def decode_dicom(path: str, data: bytes, spec: ImageSpec) -> list[dict]:
    import numpy as np
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        array = ds.pixel_array
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        stack = array if frames > 1 else array[np.newaxis]
        header = ds.copy()
        if "PixelData" in header:
            del header.PixelData
        raw = json.dumps(header.to_json_dict(suppress_invalid_tags=True))
    except Exception as exc:  # noqa: BLE001 - any decoding failure is this file's quarantine reason
        return [_failed(path, 0, "dicom", exc)]
    instance = str(getattr(ds, "SOPInstanceUID", "") or "") or None
    rows = []
    for i, frame in enumerate(stack):
        row = _empty(path, i + 1 if frames > 1 else 0, "dicom")
        try:
            row["pixels"] = normalised(frame.astype(np.float64) * slope + intercept, spec)
        except Exception as exc:  # noqa: BLE001
            rows.append(_failed(path, row["record_index"], "dicom", exc))
            continue
        row.update(
            image_id=(instance + (f"#{i + 1}" if frames > 1 else "")) if instance else None,
            modality=str(getattr(ds, "Modality", "") or "") or None,
            body_part=str(getattr(ds, "BodyPartExamined", "") or "") or None,
            study_uid=str(getattr(ds, "StudyInstanceUID", "") or "") or None,
            series_uid=str(getattr(ds, "SeriesInstanceUID", "") or "") or None,
            instance_uid=instance,
            frame=i + 1,
            study_date=str(getattr(ds, "StudyDate", "") or "") or None,
            original_shape=list(frame.shape),
            original_dtype=str(array.dtype),
            height=spec.shape[0],
            width=spec.shape[1],
            raw=raw,
        )
        for keyword, column in IDENTIFYING_TAGS.items():
            value = getattr(ds, keyword, None)
            row[column] = str(value) if value not in (None, "") else None
        if row["image_id"] is None:
            row.update(_reason=Reason.MISSING_ID.value, _message="DICOM without SOPInstanceUID")
        rows.append(row)
    return rows


def decode_png(path: str, data: bytes, spec: ImageSpec, relative: str) -> list[dict]:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            array = np.asarray(img)
        pixels = normalised(array, spec)
    except Exception as exc:  # noqa: BLE001
        return [_failed(path, 0, "png", exc)]
    folder = os.path.basename(os.path.dirname(path))
    row = _empty(path, 0, "png")
    row.update(
        image_id=relative,
        label=int(folder) if folder.isdigit() else None,
        original_shape=list(array.shape),
        original_dtype=str(array.dtype),
        height=spec.shape[0],
        width=spec.shape[1],
        pixels=pixels,
    )
    return [row]


def decode_npz(path: str, data: bytes, spec: ImageSpec, relative: str) -> list[dict]:
    import numpy as np

    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        splits = [s for s in spec.npz_splits if f"{s}_images" in arrays.files]
        if not splits:
            raise ValueError(f"no <split>_images arrays among {arrays.files}")
    except Exception as exc:  # noqa: BLE001
        return [_failed(path, 0, "npz", exc)]
    rows, index = [], 0
    for split in splits:
        images = arrays[f"{split}_images"]
        labels = (
            arrays[f"{split}_labels"].reshape(len(images), -1)[:, 0]
            if f"{split}_labels" in arrays.files
            else None
        )
        for i, image in enumerate(images):
            index += 1
            try:
                pixels = normalised(image, spec)
            except Exception as exc:  # noqa: BLE001
                rows.append(_failed(path, index, "npz", exc))
                continue
            row = _empty(path, index, "npz")
            row.update(
                image_id=f"{relative}/{split}/{i}",
                label=int(labels[i]) if labels is not None else None,
                split=split,
                original_shape=list(image.shape),
                original_dtype=str(image.dtype),
                height=spec.shape[0],
                width=spec.shape[1],
                pixels=pixels,
            )
            rows.append(row)
    return rows


def decode_file(path: str, root: str, spec: ImageSpec) -> list[dict]:
    relative = os.path.relpath(path, root) if os.path.isdir(root) else os.path.basename(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return [_failed(path, 0, "file", exc)]
    lower = path.lower()
    if lower.endswith(".npz"):
        return decode_npz(path, data, spec, relative)
    if lower.endswith(".png"):
        return decode_png(path, data, spec, relative)
    return decode_dicom(path, data, spec)


# --- Spark ----------------------------------------------------------------------------------------


def read_images(spark, files, input_root: str, spec: ImageSpec) -> DataFrame:
    """One decoded row per image (or per failed file) of ``files``, decoded in parallel."""
    import pandas as pd

    paths = spark.createDataFrame([(f.path,) for f in files], "path string").repartition(
        max(1, min(len(files), spark.sparkContext.defaultParallelism * 4))
    )

    def decode(batches):
        for batch in batches:
            rows = [r for p in batch["path"] for r in decode_file(p, input_root, spec)]
            yield pd.DataFrame(rows, columns=[c.split()[0] for c in DECODED.split(", ")])

    return paths.mapInPandas(decode, DECODED)


def type_rows(decoded: DataFrame, source_system: str, run_id: str, ingested_at: Column) -> DataFrame:
    """Decoded rows -> bronze rows (lineage, record hash) with ``_reason``/``_message``."""
    hashed = F.sha2(F.concat_ws("|", F.col("raw"), F.sha2(F.col("pixels"), 256)), 256)
    return decoded.select(
        F.lit(source_system).alias("source_system"),
        "image_id",
        "format",
        "modality",
        "body_part",
        "study_uid",
        "series_uid",
        "instance_uid",
        "frame",
        F.to_date("study_date", "yyyyMMdd").alias("study_date"),
        "label",
        "split",
        "original_shape",
        "original_dtype",
        "height",
        "width",
        "pixels",
        *IDENTIFYING_TAGS.values(),
        "raw",
        hashed.alias("record_hash"),
        *lineage(run_id, ingested_at),
        "_reason",
        "_message",
    )
