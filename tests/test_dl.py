"""Deep learning: Delta snapshots into TensorFlow (Petastorm and Arrow readers), Horovod-on-Spark and
barrier-MWMS training with identical weights on both ranks, the CNN and ANN end to end.

Runs in the deep-learning runtime (``make dl-env``; ``make test`` runs this file there). The lake is
prepared the way production does it: ingest / clean / features run in the main runtime (its CLI in
a subprocess), the deep-learning jobs read the same Delta tables."""

from __future__ import annotations

import datetime as dt
import os
import subprocess

import numpy as np
import pytest
from conftest import REPO, SAMPLE, shared

pytest.importorskip("tensorflow", reason="deep-learning runtime only (make dl-env)")

from ehrlake.dl import datasets, launch, predict, runtime  # noqa: E402
from ehrlake.dl import train as dl_train  # noqa: E402

MAIN_CLI = REPO / ".venv" / "bin" / "ehrlake"
SHAPE = (64, 64)


def _main_runtime(*args: str) -> None:
    if not MAIN_CLI.exists():
        pytest.skip("the main runtime (.venv) prepares the lake; run make setup")
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_SUBMIT_ARGS")}
    subprocess.run([str(MAIN_CLI), *args], check=True, env=env, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def image_lake(spark, tmp_path_factory, security_conf):
    """BreastMNIST and the shared DICOM files in silver.imaging, written by the main runtime."""
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = tmp_path_factory.mktemp("dl") / "lake"
    npz = tmp_path_factory.mktemp("npz")
    os.symlink(shared("medmnist", "breastmnist.npz"), npz / "breastmnist.npz")
    _main_runtime("ingest", "--source", "images", "--input", str(npz), "--source-system", "breastmnist",
                  "--follow-links", "--lake", str(root))  # fmt: skip
    _main_runtime("ingest", "--source", "images", "--input", str(shared("dicom")), "--source-system", "pacs",
                  "--lake", str(root))  # fmt: skip
    _main_runtime("clean", "--lake", str(root))
    return Lake(
        str(root), spark, security=Security.from_config(config.load(security_conf).security, str(root))
    )


def _cfg(**cnn):
    import dataclasses

    cfg = runtime.load()
    return dataclasses.replace(cfg, cnn=dataclasses.replace(cfg.cnn, filters=(8, 16), **cnn))


def test_snapshot_files_only_and_shards_partition_the_selection(image_lake):
    snap = datasets.snapshot(image_lake.root, "silver.imaging")
    # a file in the table directory that no commit added (a crashed writer's) is never read
    stray = os.path.join(snap.path, "part-99999-stray.snappy.parquet")
    with open(snap.files[0], "rb") as src, open(stray, "wb") as dst:
        dst.write(src.read())
    assert stray not in datasets.snapshot(image_lake.root, "silver.imaging").files
    sel = dl_train.image_selection("breastmnist", "train", SHAPE)
    shards = datasets.plan_shards(snap, sel, 2)
    assert not set(shards[0].files) & set(shards[1].files)
    assert sum(s.rows for s in shards) == 546 and min(s.rows for s in shards) > 0

    seen = {}
    for backend in ("arrow", "petastorm"):
        labels, total = [], 0.0
        for shard in shards:
            with datasets.open_dataset(shard, sel, backend, batch_size=100, repeat=False) as ds:
                for x, y in ds:
                    assert x.shape[1:] == (64, 64, 1)
                    labels += list(y.numpy())
                    total += float(np.sum(x.numpy(), dtype=np.float64))
        seen[backend] = (len(labels), sum(labels), round(total, 2))
    # BreastMNIST train: 546 images, 399 normal/benign (label 1); both readers give the same rows
    assert seen["arrow"] == seen["petastorm"]
    assert seen["arrow"][:2] == (546, 399)


def test_too_few_files_for_the_workers_is_a_clear_error(image_lake):
    snap = datasets.snapshot(image_lake.root, "silver.imaging")
    sel = dl_train.image_selection("breastmnist", "train", SHAPE)
    with pytest.raises(Exception, match="fewer than the 64 workers"):
        datasets.plan_shards(snap, sel, 64)


def _payload(lake, epochs=1, save_to=None):
    snap = datasets.snapshot(lake.root, "silver.imaging")
    sel = dl_train.image_selection("breastmnist", "train", SHAPE)
    val = dl_train.image_selection("breastmnist", "val", SHAPE)
    return dl_train.Payload(
        "cnn", tuple(datasets.plan_shards(snap, sel, 2)), sel, datasets.whole_shard(snap, val), val,
        runtime.NetSettings(filters=(8, 16), batch_size=32, augment=True, dropout=0.3), "auto", 4, epochs, 7,
        save_to,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["horovod", "barrier"])
def test_two_workers_end_with_identical_weights(image_lake, launcher, tmp_path):
    results = launch.run(
        image_lake.spark, dl_train.fit_worker, _payload(image_lake, 2, str(tmp_path)), 2, launcher
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["digest"] == results[1]["digest"]
    assert all(r["epochs"] == 2 for r in results)
    # rank 0 saved a model any TensorFlow process can load, with those weights
    model = predict.load_model(str(tmp_path))
    assert launch.weights_digest(model) == results[0]["digest"]


@pytest.mark.slow
def test_cnn_trains_registers_writes_findings_and_evaluates_new_files(image_lake):
    from pyspark.sql import functions as F

    from ehrlake.models import registry

    mv = dl_train.train_image_model(image_lake, "breastmnist_normal", _cfg(), epochs=3, workers=2)
    assert mv.algorithm == "cnn" and mv.training_data == {
        "silver.imaging": mv.training_data["silver.imaging"]
    }
    assert 0.0 <= mv.metrics["auroc"]["value"] <= 1.0 and mv.metrics["auroc"]["n"] == 156
    assert registry.get(image_lake, mv.model_id).version == mv.version
    assert os.path.getsize(os.path.join(image_lake.root, mv.params["saliency"])) > 10_000
    findings = image_lake.read("gold.image_findings").where(F.col("model_id") == mv.model_id)
    assert findings.count() == 780 and findings.where(F.col("model_version") == mv.version).count() == 780
    metrics = image_lake.read("gold.model_metrics").where(
        F.col("evaluation") == f"{mv.model_id}.v{mv.version}.test"
    )
    assert metrics.where(F.col("metric") == "auroc").first().value == pytest.approx(
        mv.metrics["auroc"]["value"]
    )

    # a new labelled set of the same kind, without retraining: the PNG export of 32 train images
    result = predict.evaluate_images(image_lake, mv, str(shared("medmnist", "breastmnist_png_sample")))
    assert result["metrics"]["auroc"]["n"] == 32 and result["metrics"]["accuracy"]["value"] is not None

    # the same code path scores DICOM slices (no labels: findings only)
    snap_version = image_lake.version("silver.imaging")
    dicom = predict.image_findings(image_lake, mv.artifact_path(image_lake), snap_version, "pacs", mv.task,
                                   mv.model_id, mv.version)  # fmt: skip
    predict.write_findings(image_lake, dicom)
    rows = image_lake.read("gold.image_findings").where(F.col("source_system") == "pacs").collect()
    assert {r.format for r in rows} == {"dicom"} and all(0 <= r.score <= 1 for r in rows)
    predict.write_findings(image_lake, dicom)  # re-running replaces, never duplicates
    assert image_lake.read("gold.image_findings").where(F.col("source_system") == "pacs").count() == len(rows)


@pytest.mark.slow
def test_tabular_ann_is_compared_and_scores_patients(spark, tmp_path, security_conf):
    from pyspark.sql import functions as F

    from ehrlake import config, scoring
    from ehrlake.lake import Lake
    from ehrlake.models import registry
    from ehrlake.security import Security

    root = str(tmp_path / "lake")
    _main_runtime("ingest", "--source", "csv-extract", "--extract", "diabetes130", "--input",
                  str(SAMPLE / "diabetes_130_us"), "--lake", root)  # fmt: skip
    _main_runtime("features", "--lake", root)  # the extract's own rows (gold.features_diabetes130)
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    mv = dl_train.train_tabular_ann(lake, "diabetes130_readmission_30d", epochs=2, workers=2)
    assert mv.algorithm == "ann" and mv.features and set(mv.params["scaling"]) == set(mv.features)
    assert mv.metrics["auroc"]["n"] == mv.params["test_rows"] > 0
    assert [m.model_id for m in registry.versions(lake, "diabetes130_readmission_30d")] == [mv.model_id]
    # population scoring through the same entry point as the Spark ML models: every patient of the
    # extract (labelled or not) once, with the ANN's version
    run = scoring.score(lake, mv.task, dt.date(2026, 1, 1), model_id=mv.model_id)
    patients = lake.read("gold.features_diabetes130").select("patient_key").distinct().count()
    scores = lake.read("gold.risk_scores").where(F.col("model_id") == mv.model_id)
    assert run.scored == scores.count() == patients > 0
    assert scoring.score(lake, mv.task, dt.date(2026, 1, 1), model_id=mv.model_id).scored == patients
    n = patients
    assert scores.where(F.col("model_version") == mv.version).count() == n
    assert scores.where(F.size("top_reasons") > 0).count() > 0


@pytest.mark.slow
def test_pretraining_lowers_the_masked_code_loss_and_fine_tuning_starts_from_the_registered_encoder(
    spark, tmp_path, security_conf
):
    """The sample's hundred FHIR patients: their sequences (main runtime), masked-code pretraining on
    two Horovod workers, the registered encoder reloaded, and a task fine-tuned from it."""
    import dataclasses

    from pyspark.sql import functions as F

    from ehrlake import config, features
    from ehrlake.dl import finetune, nets, pretrain
    from ehrlake.features import sequences
    from ehrlake.lake import Lake
    from ehrlake.models import registry
    from ehrlake.models.train import split
    from ehrlake.security import Security

    root = str(tmp_path / "lake")
    _main_runtime("ingest", "--source", "fhir-ndjson", "--input", str(SAMPLE / "fhir_ndjson" / "server_import_100p"),
                  "--lake", root)  # fmt: skip
    _main_runtime("clean", "--lake", root)
    _main_runtime("features", "--lake", root)  # the task indexes the fine-tuned models are labelled at
    _main_runtime("sequences", "--lake", root)
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    cfg = runtime.load()
    tiny = dataclasses.replace(cfg.encoder, length=48, dim=16, layers=1, heads=2, batch_size=16)
    mv = pretrain.pretrain(
        lake, dataclasses.replace(cfg, encoder=tiny), epochs=12, workers=2, launcher="horovod"
    )
    loss, accuracy = mv.metrics["masked_code_loss"], mv.metrics["masked_code_accuracy"]
    # (beating the codes' frequencies needs more records than a hundred patients: docs/self_supervised.md)
    assert loss["value"] < loss["untrained"] and accuracy["value"] > accuracy["untrained"], mv.metrics
    assert loss["frequency"] > 0 and 0 < accuracy["frequency"] < 1
    assert mv.training_data[sequences.VOCABULARY] == lake.version(sequences.VOCABULARY)
    assert mv.params["vocabulary_fingerprint"] == sequences.vocabulary_fingerprint(lake)
    # the records a supervised model would be tested on (the same patient split) were not trained on
    tensors = lake.read(pretrain.TENSORS, version=mv.training_data[pretrain.TENSORS])
    held_out = {r.patient_key for r in tensors.where(F.col("split") == "test").collect()}
    whole = lake.read(sequences.SEQUENCES).where(F.col("index_id") == sequences.ALL)
    assert held_out == {r.patient_key for r in split(whole, 42)[1].collect()} and held_out
    # reloaded from the registry: the same embeddings of the probe records as the trained encoder
    encoder = pretrain.load_encoder(lake, registry.get(lake, pretrain.MODEL_ID))
    probe = mv.params["probe"]
    again = nets.patient_embedding(encoder)(
        [np.array(probe["tokens"], "int32"), np.array(probe["ages"], "int32")]
    )
    assert np.array_equal(again.numpy(), np.array(probe["embeddings"], "float32"))

    # fine-tuned for a patient task from the encoder, and from scratch on half the labels: scored on
    # the tabular models' test rows; the half's training patients are among the whole's
    task = "hypertension_onset_12m"
    tuned = finetune.train_sequence_model(lake, task, mv, epochs=2, workers=2, launcher="horovod")
    scratch = finetune.train_sequence_model(lake, task, None, 0.5, epochs=2, workers=2, launcher="local")
    assert (tuned.model_id, scratch.model_id) == (f"{task}.sequence", f"{task}.sequence_scratch")
    assert tuned.params["pretrained"] == mv.label and scratch.params["pretrained"] is None
    test_rows = split(features.training_frame(lake, features.task(task)), 42)[1]
    assert tuned.metrics["auroc"]["n"] == tuned.params["test_rows"] == test_rows.count() > 0

    def trained_on(model):
        rows = lake.read(finetune.table(task), version=model.training_data[finetune.table(task)])
        return {r.patient_key for r in rows.where(F.col("split") != "test").select("patient_key").collect()}

    assert trained_on(scratch) < trained_on(tuned) and trained_on(scratch)


def test_a_main_runtime_job_in_the_deep_learning_runtime_says_where_to_run_it(tmp_path):
    """``.venv-dl/bin/ehrlake ingest`` used to end in a PySparkImportError about PyArrow: now one
    line, before a JVM starts, naming the runtime that runs it."""
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "ehrlake"
    args = [
        "ingest",
        "--source",
        "fhir-ndjson",
        "--input",
        str(SAMPLE / "fhir_ndjson"),
        "--lake",
        str(tmp_path),
    ]
    result = subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "ehrlake: error: ehrlake ingest runs in the main runtime: .venv/bin/ehrlake ingest (this is the "
        f"deep-learning runtime, whose PyArrow {__import__('pyarrow').__version__} is pinned for Petastorm; "
        "Spark's Arrow paths need 18 or later)"
    ]
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_tensorflow_start_up_notices_are_filtered_and_other_output_kept():
    """The oneDNN / CPU-instruction / absl notices TensorFlow prints from C++ at import no longer
    flood a job's log; --verbose (EHRLAKE_DEBUG) shows them, and other stderr output still passes."""
    import sys

    code = (
        "import sys; import ehrlake.dl, tensorflow, horovod.tensorflow.keras; print('kept', file=sys.stderr)"
    )
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr.strip() == "kept", quiet.stderr[-2000:]
    env = {**os.environ, "EHRLAKE_DEBUG": "1", "TF_CPP_MIN_LOG_LEVEL": "0"}
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "oneDNN custom operations are on" in loud.stderr
