"""Deep learning: Delta snapshots into TensorFlow (Petastorm and Arrow readers), Horovod-on-Spark and
barrier-MWMS training with identical weights on both ranks, the CNN and ANN end to end.

Runs in the deep-learning runtime (``make dl-env``; ``make test`` runs this file there). The lake is
prepared the way production does it: ingest / clean / features run in the main runtime (its CLI in
a subprocess), the deep-learning jobs read the same Delta tables."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLE, shared

pytest.importorskip("tensorflow", reason="deep-learning runtime only (make dl-env)")

from ehrlake.dl import _NOTICES, datasets, launch, predict, runtime  # noqa: E402
from ehrlake.dl import train as dl_train  # noqa: E402
from ehrlake.errors import EhrlakeError  # noqa: E402

MAIN_CLI = REPO / ".venv" / "bin" / "ehrlake"
SHAPE = (64, 64)


def _main_runtime(*args: str) -> None:
    if not MAIN_CLI.exists():
        pytest.skip("the main runtime (.venv) prepares the lake; run make setup")
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_SUBMIT_ARGS")}
    subprocess.run([str(MAIN_CLI), *args], check=True, env=env, capture_output=True, timeout=600)


def _prepare(lake, *steps: list[str]) -> None:
    """The lake prepared as production prepares it: the main runtime's steps (each an ehrlake command
    line) run by ``ehrlake pipeline`` in one process, one JVM start for them all, not one per step."""
    import shlex

    import yaml

    pipeline = Path(lake).parent / "prepare.yaml"
    pipeline.write_text(yaml.safe_dump({"steps": [shlex.join(step) for step in steps]}))
    _main_runtime("pipeline", str(pipeline), "--lake", str(lake))


@pytest.fixture(scope="module")
def image_lake(spark, tmp_path_factory, security_conf):
    """BreastMNIST and the shared DICOM files in silver.imaging, written by the main runtime."""
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = tmp_path_factory.mktemp("dl") / "lake"
    npz = tmp_path_factory.mktemp("npz")
    os.symlink(shared("medmnist", "breastmnist.npz"), npz / "breastmnist.npz")
    _prepare(
        root,
        [
            "ingest",
            "--source",
            "images",
            "--input",
            str(npz),
            "--source-system",
            "breastmnist",
            "--follow-links",
        ],
        ["ingest", "--source", "images", "--input", str(shared("dicom")), "--source-system", "pacs"],
        ["clean"],
    )
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

    from ehrlake.models import evaluate, registry

    mv = dl_train.train_image_model(image_lake, "breastmnist_normal", _cfg(), epochs=3, workers=2)
    assert mv.algorithm == "cnn" and mv.training_data == {
        "silver.imaging": mv.training_data["silver.imaging"]
    }
    assert 0.0 <= mv.metrics["auroc"]["value"] <= 1.0 and mv.metrics["auroc"]["n"] == 156
    assert registry.get(image_lake, mv.model_id).version == mv.version
    assert os.path.getsize(os.path.join(image_lake.root, mv.params["saliency"])) > 10_000
    findings = image_lake.read("gold.image_findings").where(F.col("model_id") == mv.model_id)
    assert findings.count() == 780 and findings.where(F.col("model_version") == mv.version).count() == 780
    # the finding's threshold is the most accurate on the validation labels, and the findings use it
    threshold = mv.params["threshold"]
    validation = findings.where((F.col("split") == "val") & (F.col("label") >= 0))
    assert threshold == evaluate.accuracy_threshold(validation)
    assert findings.where(F.col("finding") != (F.col("score") >= threshold)).count() == 0
    # mirror_at_test (conf): a score is the mean of the image's and its left-right mirror's
    assert mv.params["mirror_at_test"] is True
    one = image_lake.read("silver.imaging").where(F.col("source_system") == "breastmnist").first()
    x = np.frombuffer(one.pixels, "<f4").reshape(1, *SHAPE, 1)
    model = predict.load_model(mv.artifact_path(image_lake))
    views = [model.predict_on_batch(v)[0, 0] for v in (x, np.ascontiguousarray(x[:, :, ::-1]))]
    score = findings.where(F.col("image_id") == one.image_id).first().score
    assert score == pytest.approx(float(np.mean(views)), abs=1e-5) and views[0] != views[1]
    metrics = image_lake.read("gold.model_metrics").where(
        F.col("evaluation") == f"{mv.model_id}.v{mv.version}.test"
    )
    assert metrics.where(F.col("metric") == "auroc").first().value == pytest.approx(
        mv.metrics["auroc"]["value"]
    )

    # a new labelled set of the same kind, without retraining: the PNG export of 32 train images
    result = predict.evaluate_images(image_lake, mv, str(shared("medmnist", "breastmnist_png_sample")))
    assert result["metrics"]["auroc"]["n"] == 32 and result["metrics"]["accuracy"]["value"] is not None

    # the same code path scores DICOM slices (no labels: findings only) where no modality is asked
    snap_version = image_lake.version("silver.imaging")
    dicom = predict.image_findings(image_lake, mv.artifact_path(image_lake), snap_version, "pacs", mv.task,
                                   mv.model_id, mv.version, predict.mirrored(mv))  # fmt: skip
    predict.write_findings(image_lake, dicom, threshold)
    rows = image_lake.read("gold.image_findings").where(F.col("source_system") == "pacs").collect()
    assert {r.format for r in rows} == {"dicom"} and all(0 <= r.score <= 1 for r in rows)
    predict.write_findings(image_lake, dicom, threshold)  # re-running replaces, never duplicates
    assert image_lake.read("gold.image_findings").where(F.col("source_system") == "pacs").count() == len(rows)

    # but the ultrasound model refuses CT and MR slices: score-images counts them, scores none, and
    # takes away the findings made of them above
    assert mv.params["modalities"] == ["US"]
    pacs = image_lake.read("silver.imaging").where(F.col("source_system") == "pacs")
    recorded = {r.modality: r["count"] for r in pacs.groupBy("modality").count().collect()}
    assert set(recorded) <= {"CT", "MR"} and recorded
    counts, refused = predict.score_source(image_lake, mv, "pacs")
    assert counts == {} and refused == recorded
    assert image_lake.read("gold.image_findings").where(F.col("source_system") == "pacs").count() == 0
    audited = image_lake.read("audit.events").where(F.col("job") == "score-images").select("detail").collect()
    assert any(r.detail and all(f"{n} {m}" in r.detail for m, n in recorded.items()) for r in audited)


@pytest.mark.slow
@pytest.mark.heavy
def test_tabular_ann_is_compared_and_scores_patients(spark, tmp_path, security_conf):
    from pyspark.sql import functions as F

    from ehrlake import config, scoring
    from ehrlake.lake import Lake
    from ehrlake.models import registry
    from ehrlake.security import Security

    root = str(tmp_path / "lake")
    # features: the extract's own rows (gold.features_diabetes130)
    extract = str(SAMPLE / "diabetes_130_us")
    _prepare(
        root,
        ["ingest", "--source", "csv-extract", "--extract", "diabetes130", "--input", extract],
        ["features"],
    )
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
    # the ANN keeps each input's training range, and scoring refuses a row far outside it
    import dataclasses

    from ehrlake.models import scope

    accepts = mv.params["accepts"]
    assert set(accepts) <= set(mv.features) and all(lo <= hi for lo, hi in accepts.values())
    name = next(f for f, (lo, hi) in accepts.items() if hi > lo)
    lo, hi = accepts[name]
    narrow = {**accepts, name: [lo, lo + (hi - lo) / 100]}  # the same ranges, one of them a hundredth
    outside = dataclasses.replace(mv, params={**mv.params, "accepts": narrow})
    flagged = {
        m.params["accepts"][name][1]: predict.ann_population(lake, m, dt.date(2026, 1, 1))
        .where(F.size(scope.OUTSIDE) > 0)
        .count()
        for m in (mv, outside)
    }
    assert flagged[lo + (hi - lo) / 100] > flagged[hi] and run.refused == flagged[hi]


@pytest.fixture(scope="module")
def federated_ann_lake(spark, tmp_path_factory, security_conf):
    """The Diabetes 130-US extract's first 8,000 stays and their features, written by the main runtime."""
    from conftest import diabetes_extract

    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    folder = tmp_path_factory.mktemp("federated_ann")
    root = str(folder / "lake")
    extract = str(diabetes_extract(folder, 8000))
    _prepare(
        root,
        ["ingest", "--source", "csv-extract", "--extract", "diabetes130", "--input", extract],
        ["features"],
    )
    return Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))


FEDERATED_TASK = "diabetes130_readmission_30d"


@pytest.mark.slow
def test_the_tabular_ann_trains_over_flower_sites_from_updates_only_and_scores_patients(federated_ann_lake):
    """Issue 24's ANN: three SuperNodes of this runtime train the central ANN's network (FedAvg); the
    server receives weight arrays of the network's shapes only; the version is registered as an ANN
    and scores patients through ``scoring.score``."""
    from pyspark.sql import functions as F

    from ehrlake import scoring
    from ehrlake.federated import ann, sites
    from ehrlake.federated import train as federated

    lake, task = federated_ann_lake, FEDERATED_TASK
    run = federated.train(lake, task, rounds=4, bootstrap=100, algorithm="ann")
    mv = run.model
    assert mv.model_id == f"{task}.ann-federated" and mv.algorithm == "ann"
    assert set(mv.params["scaling"]) == set(mv.features) == set(sites.inputs(task))
    losses = mv.params["round_train_loss"]  # the global model improves on round 1, and on
    assert len(losses) == 4 and losses[1] < losses[0] and losses[-1] < losses[1]
    assert len(run.round_auroc) == 4 and run.round_auroc[-1] > run.round_auroc[0]
    # better than chance on ~1,600 held-out stays (~180 readmitted). The split is by patient key,
    # and the keys are the test session's own, so each session holds out other stays: two sessions
    # gave 0.637 (CI 0.595-0.681) and 0.617 (0.582-0.657); two trainings in one session, the same
    # AUROC to 1e-15. On 4,000 stays (~90 readmitted) sessions ranged 0.533-0.636
    auroc = mv.metrics["auroc"]
    assert auroc["value"] > 0.55 and auroc["ci_low"] > 0.5, auroc
    hyper = runtime.load().ann
    assert mv.params["learning_rate"] == hyper.learning_rate
    shapes = [list(w.shape) for w in ann.initial_weights(len(mv.features), hyper.hidden, hyper.dropout, 1)]
    trained = [r for r in run.received if r["stage"] == "train"]
    assert len(trained) == 3 * 4 and all(r["arrays"] == {"arrays": shapes} for r in trained)
    # scored like the central ANN: every patient of the extract once, with this version, but for
    # those with an input outside the sites' pooled training range (refused, as the ANN refuses)
    scored = scoring.score(lake, task, dt.date(2026, 1, 1), model_id=mv.model_id)
    patients = lake.read("gold.features_diabetes130").select("patient_key").distinct().count()
    written = lake.read("gold.risk_scores").where(F.col("model_id") == mv.model_id)
    assert scored.scored == written.count() == patients - scored.refused and scored.scored > 0.9 * patients


@pytest.mark.slow
@pytest.mark.heavy
def test_a_private_federated_ann_spends_at_most_its_epsilon_at_its_own_learning_rate(federated_ann_lake):
    """FedProx with patient-level DP-SGD at the sites: the ANN's private learning rate, its epsilon
    spent and recorded (the DP-SGD step itself: the clipping test below, in CI; the accounting: the
    main suite's private FedProx run of the logistic regression)."""
    from ehrlake.federated import sites
    from ehrlake.federated import train as federated

    private = federated.train(federated_ann_lake, FEDERATED_TASK, rounds=2, strategy="fedprox", epsilon=8.0,
                              bootstrap=100, algorithm="ann").model  # fmt: skip
    p, hyper = private.params, runtime.load().ann
    assert (private.algorithm, p["privacy"], p["strategy"]) == ("ann", "patient", "fedprox")
    assert 7.9 < p["epsilon"] <= 8.0 and p["hidden"] == list(hyper.hidden)
    assert p["learning_rate"] == sites.settings().ann_private_learning_rate != hyper.learning_rate


def test_dp_sgd_clips_every_rows_gradient_before_the_sum():
    """With no noise, the private gradient's norm is at most clip x rows / expected rows, whatever
    the rows; without clipping these rows' gradient is far larger."""
    from ehrlake.federated import ann

    tf = runtime.tensorflow()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(scale=50.0, size=(40, 6)), tf.float32)
    y = tf.constant((rng.random((40, 1)) < 0.5).astype("float32"))
    model = ann.network(6, [8], 0.0)
    bce = runtime.keras().losses.BinaryCrossentropy(reduction="none")
    local = ann.Local(steps=1, rate=0.5, learning_rate=0.01, clip=0.1, noise=0.0)
    with tf.GradientTape(persistent=True) as tape:
        losses = bce(y, model(x, training=True))
        total = tf.reduce_sum(losses)
    clipped = ann._private(tape, losses, model.trainable_variables, local, 20.0, rng)
    plain = tape.gradient(total, model.trainable_variables)
    del tape
    norm = float(tf.linalg.global_norm(clipped))
    assert 0 < norm <= 0.1 * 40 / 20.0 + 1e-6
    assert float(tf.linalg.global_norm(plain)) / 20.0 > 10 * norm


def test_contrastive_pretraining_learns_to_pair_views_of_every_image(image_lake):
    """SimCLR on BreastMNIST and the DICOM frames together, labels unused, on two Horovod workers:
    the held-out images' views pair better than before, no test image is trained on, the saved
    trunk loads into the CNN by layer name, and an image task fine-tunes from it."""
    import dataclasses

    from pyspark.sql import functions as F

    from ehrlake.dl import contrastive, nets

    cfg = _cfg()
    cfg = dataclasses.replace(cfg, contrastive=dataclasses.replace(cfg.contrastive, batch_size=32))
    mv = contrastive.pretrain_images(image_lake, cfg, epochs=6, workers=2, launcher="horovod")
    loss, pairs = mv.metrics["contrastive_loss"], mv.metrics["pair_accuracy"]
    assert loss["value"] < loss["untrained"] and pairs["value"] > pairs["untrained"], mv.metrics
    tensors = image_lake.read(contrastive.TENSORS, version=mv.training_data[contrastive.TENSORS])
    images = image_lake.read("silver.imaging")
    assert tensors.count() == images.where(F.coalesce("split", F.lit("")) != "test").count()
    assert images.where(F.col("source_system") == "pacs").count() > 0  # DICOM frames are in
    encoder = runtime.keras().models.load_model(os.path.join(mv.artifact_path(image_lake), "encoder.keras"))
    cnn = nets.cnn((*SHAPE, 1), filters=tuple(mv.params["filters"]))
    for layer in encoder.layers:
        if layer.weights:
            cnn.get_layer(layer.name).set_weights(layer.get_weights())  # the same trunk, by name
    # an image task fine-tuned from the trunk on a tenth of its labels: its own model id, the
    # encoder it started from, a tenth of each class's training images (147 malignant, 399 not)
    tuned = dl_train.train_image_model(
        image_lake, "breastmnist_normal", cfg, epochs=2, workers=2, launcher="local", pretrained=mv,
        label_fraction=0.1,
    )  # fmt: skip
    assert tuned.model_id == "breastmnist_normal.cnn_pretrained" and tuned.params["pretrained"] == mv.label
    assert tuned.params["label_fraction"] == 0.1 and tuned.params["train_images"] == 15 + 40
    assert tuned.metrics["auroc"]["n"] == 156  # the test split whole


def test_pretraining_holds_out_every_image_tasks_evaluation_split(spark):
    """PneumoniaMNIST evaluates on its val split (its file has no test array): those images are
    as held out from contrastive pretraining as every test split."""
    from ehrlake.dl import contrastive

    rows = [("breastmnist", "test"), ("breastmnist", "val"), ("pneumoniamnist", "val"),
            ("pneumoniamnist", "train"), ("pacs", None)]  # fmt: skip
    frame = spark.createDataFrame(rows, "source_system string, split string")
    held = frame.where(contrastive.held_out(runtime.load())).collect()
    assert sorted(tuple(r) for r in held) == [("breastmnist", "test"), ("pneumoniamnist", "val")]


def test_a_share_of_image_labels_is_stratified_and_nested(image_lake):
    from pyspark.sql import functions as F

    snap = datasets.snapshot(image_lake.root, dl_train.IMAGES)
    kept = {
        share: dl_train.kept_images(image_lake, snap, "breastmnist", "train", share, 7)
        for share in (0.05, 0.25)
    }
    labels = image_lake.read("silver.imaging").where(F.col("image_id").isin(list(kept[0.25])))
    assert sorted(tuple(r) for r in labels.groupBy("label").count().collect()) == [(0.0, 37), (1.0, 100)]
    assert set(kept[0.05]) < set(kept[0.25]) and len(kept[0.05]) == 8 + 20
    assert dl_train.kept_images(image_lake, snap, "breastmnist", "train", 0.05, 8) != kept[0.05]


SEQUENCE_TASK = "hypertension_onset_12m"


@pytest.fixture(scope="module")
def sequence_models(spark, tmp_path_factory, security_conf):
    """The sample's hundred FHIR patients: their sequences (main runtime), masked-code pretraining on
    two Horovod workers, and a task fine-tuned from the encoder (Horovod) and from scratch on half the
    labels (local). Returns (lake, encoder, tuned, scratch model versions, split seed)."""
    import dataclasses

    from ehrlake import config
    from ehrlake.dl import finetune, pretrain
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = str(tmp_path_factory.mktemp("sequences") / "lake")
    # features: the task indexes the fine-tuned models are labelled at
    ndjson = str(SAMPLE / "fhir_ndjson" / "server_import_100p")
    _prepare(
        root, ["ingest", "--source", "fhir-ndjson", "--input", ndjson], ["clean"], ["features"], ["sequences"]
    )
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    cfg = runtime.load()
    tiny = dataclasses.replace(cfg.encoder, length=48, dim=16, layers=1, heads=2, batch_size=16)
    # the sample has two patients with a hypertension onset, and its patient keys (so its split) come
    # from this session's linkage secret: the first split seed that fits on one of them
    from pyspark.sql import functions as F

    from ehrlake import features
    from ehrlake.models.train import split

    rows = features.training_frame(lake, features.task(SEQUENCE_TASK)).cache()
    seed = next(
        s for s in range(42, 142)
        if split(rows, s)[0].where((F.col("cv_fold") != 0) & (F.col("label") == 1)).limit(1).count()
    )  # fmt: skip
    rows.unpersist()
    mv = pretrain.pretrain(
        lake, dataclasses.replace(cfg, encoder=tiny), epochs=12, workers=2, launcher="horovod", seed=seed
    )
    tuned = finetune.train_sequence_model(
        lake, SEQUENCE_TASK, mv, epochs=2, workers=2, launcher="horovod", seed=seed
    )
    scratch = finetune.train_sequence_model(
        lake, SEQUENCE_TASK, None, 0.5, epochs=2, workers=2, launcher="local", seed=seed
    )
    return lake, mv, tuned, scratch, seed


@pytest.mark.slow
def test_pretraining_lowers_the_masked_code_loss_and_fine_tuning_starts_from_the_registered_encoder(
    sequence_models,
):
    """Pretraining beat the untrained encoder on held-out records, never saw a test patient, and
    reloads from the registry; the fine-tuned models are tested on the tabular models' test rows."""
    from pyspark.sql import functions as F

    from ehrlake import features
    from ehrlake.dl import finetune, nets, pretrain
    from ehrlake.features import sequences
    from ehrlake.models import registry
    from ehrlake.models.train import split

    lake, mv, tuned, scratch, seed = sequence_models
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
    assert held_out == {r.patient_key for r in split(whole, seed)[1].collect()} and held_out
    # reloaded from the registry: the same embeddings of the probe records as the trained encoder
    encoder = pretrain.load_encoder(lake, registry.get(lake, pretrain.MODEL_ID))
    probe = mv.params["probe"]
    again = nets.patient_embedding(encoder)(
        [np.array(probe["tokens"], "int32"), np.array(probe["ages"], "int32")]
    )
    assert np.array_equal(again.numpy(), np.array(probe["embeddings"], "float32"))

    # fine-tuned for a patient task from the encoder, and from scratch on half the labels: scored on
    # the tabular models' test rows; the half's training patients are among the whole's
    task = SEQUENCE_TASK
    assert (tuned.model_id, scratch.model_id) == (f"{task}.sequence", f"{task}.sequence_scratch")
    assert tuned.params["pretrained"] == mv.label and scratch.params["pretrained"] is None
    test_rows = split(features.training_frame(lake, features.task(task)), seed)[1]
    assert tuned.metrics["auroc"]["n"] == tuned.params["test_rows"] == test_rows.count() > 0

    def trained_on(model):
        rows = lake.read(finetune.table(task), version=model.training_data[finetune.table(task)])
        return {r.patient_key for r in rows.where(F.col("split") != "test").select("patient_key").collect()}

    assert trained_on(scratch) < trained_on(tuned) and trained_on(scratch)


def test_integrated_gradients_follow_the_saved_model_and_add_up_to_its_log_odds():
    """The attribution path recomputes the classifier's own output, and a record's attributions sum
    to its log-odds minus the baseline's (completeness); padding gets none."""
    from ehrlake.dl import attribution, nets

    model = nets.sequence_classifier(nets.sequence_encoder(30, 12, 16, 2, 2))
    rng = np.random.default_rng(0)
    x = np.zeros((3, 2, 12), "float32")
    for i, n in enumerate((12, 7, 1)):
        x[i, 0, :n], x[i, 1, :n] = rng.integers(4, 30, n), rng.integers(20, 80, n)
    p = model(x, training=False).numpy()[:, 0]
    a = attribution.integrated_gradients(model, x, steps=32)
    assert np.allclose(a.logit, np.log(p / (1 - p)), atol=1e-5)
    assert np.allclose(a.events.sum(axis=1), a.logit - a.baseline_logit, atol=1e-3)
    assert a.gap.max() < 1e-3 and (a.events[1, 7:] == 0).all() and (a.events[2, 1:] == 0).all()
    assert np.count_nonzero(a.events[0]) == 12
    again = attribution.integrated_gradients(model, x, steps=32)
    assert np.array_equal(a.events, again.events)  # no randomness: the same reasons every time


@pytest.mark.slow
def test_explain_gives_the_risk_its_events_and_similar_patients_only_at_k(sequence_models, capsys):
    """``ehrlake explain`` for a test patient: the fine-tuned model's risk, the events ranked by
    integrated gradients, one merged row of gold.decision_support, an audit event naming the
    patient; the similar-patient rate hidden below k and shown at k; analysts may not explain.
    Population scoring with the model agrees with the explanation."""
    import dataclasses

    from pyspark.sql import functions as F

    from ehrlake import cli
    from ehrlake.dl import decision, finetune
    from ehrlake.errors import AccessDenied
    from ehrlake.features import sequences

    lake, _, tuned, _, _ = sequence_models
    tensors = lake.read(
        finetune.table(SEQUENCE_TASK), version=tuned.training_data[finetune.table(SEQUENCE_TASK)]
    )
    # the features' latest index date, and a test patient under observation then with a record
    as_of = lake.read("gold.features_patient").agg(F.max(F.to_date("index_time"))).first()[0]
    at_date = lake.read("gold.features_patient").where(F.to_date("index_time") == as_of).select("patient_key")
    recorded = lake.read(sequences.SEQUENCES).where(
        (F.col("index_id") == sequences.ALL) & (F.col("length") > 5)
    )
    test_patients = tensors.where(F.col("split") == "test").select("patient_key")
    candidates = recorded.join(test_patients, "patient_key", "left_semi").join(
        at_date, "patient_key", "left_semi"
    )
    patient = candidates.orderBy("patient_key").first().patient_key
    assert cli.main(["explain", "--patient-key", patient, "--task", SEQUENCE_TASK, "--as-of", str(as_of),
                     "--lake", lake.root, "--role", "clinician"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"patient {patient}, {SEQUENCE_TASK} as of {as_of}: risk" in out and tuned.label in out

    cfg = runtime.load()
    shown = decision.explain(
        lake, patient, SEQUENCE_TASK, as_of, "clinician",
        cfg=dataclasses.replace(cfg, explain=dataclasses.replace(cfg.explain, min_similarity=-1.0)),
    )  # fmt: skip
    r = shown.row
    assert r["model_id"] == tuned.model_id and r["model_version"] == tuned.version
    assert 0 < r["score"] < 1 and r["attribution_gap"] < 0.01 and r["events_read"] > 0
    assert [e["log_odds"] for e in r["raised"]] == sorted((e["log_odds"] for e in r["raised"]), reverse=True)
    assert all(e["log_odds"] > 0 for e in r["raised"]) and all(e["log_odds"] < 0 for e in r["lowered"])
    assert r["raised"] or r["lowered"]
    # every training patient counts as similar at similarity -1: the rate over the 50 nearest
    others = tensors.where((F.col("split") != "test") & (F.col("patient_key") != patient))
    n = min(50, others.select("patient_key").distinct().count())
    assert n >= 11 and r["similar_patients"] == n and 0 <= r["similar_outcome_rate"] <= 1
    # ten neighbours are fewer than k = 11: no rate, no count
    few = decision.explain(
        lake, patient, SEQUENCE_TASK, as_of, "clinician",
        cfg=dataclasses.replace(cfg, explain=dataclasses.replace(cfg.explain, min_similarity=-1.0, neighbours=10)),
    )  # fmt: skip
    assert few.row["similar_patients"] is None and few.row["similar_outcome_rate"] is None
    assert "outcome rate not shown" in few.format()
    assert few.row["score"] == pytest.approx(r["score"], abs=1e-6)  # the same record and model

    rows = lake.read(decision.TABLE).where(F.col("patient_key") == patient).collect()
    assert len(rows) == 1 and rows[0].similar_outcome_rate is None  # merged: the latest explanation
    events = lake.read("audit.events").where(
        (F.col("action") == "explain") & (F.col("patient_key") == patient)
    )
    assert events.count() == 3 and {e.role for e in events.collect()} == {"clinician"}
    with pytest.raises(AccessDenied):
        decision.explain(lake, patient, SEQUENCE_TASK, as_of, "analyst")

    # population scoring with the same model: the same risk for this patient, its reasons the events
    # that raised it most, and every eligible patient scored
    from ehrlake import features, scoring

    run = scoring.score(lake, SEQUENCE_TASK, as_of, "scheduler", tuned.model_id)
    scores = lake.read(scoring.TABLE).where(F.col("model_id") == tuned.model_id)
    eligible = features.patient_features(lake, [as_of]).count()
    assert run.scored == scores.count() == eligible > 0
    mine = scores.where(F.col("patient_key") == patient).first()
    assert mine.score == pytest.approx(r["score"], abs=1e-5) and mine.model_version == tuned.version
    assert [reason.rsplit(" (", 1)[0] for reason in mine.top_reasons] == [
        e["description"] for e in r["raised"][:3]
    ]


@pytest.mark.slow
@pytest.mark.heavy
def test_a_sequence_model_is_evaluated_on_a_new_hospitals_dump(sequence_models, tmp_path):
    """External validation across the two runtimes: the main runtime's ``ehrlake evaluate --input``
    prepares the dump (ingest needs it) and names the second command; this runtime scores every
    labelled index of the dump with the model's own vocabulary."""
    import shutil

    from pyspark.sql import functions as F

    from ehrlake import features
    from ehrlake.models import evaluate_model, external

    lake, _, tuned, _, _ = sequence_models
    dump = tmp_path / "hospital_b"
    shutil.copytree(SAMPLE / "fhir_bundles", dump)
    with pytest.raises(EhrlakeError, match="is not prepared for evaluation"):
        evaluate_model(lake, tuned.model_id, tuned.version, str(dump))
    _main_runtime("evaluate", "--model", tuned.model_id, "--input", str(dump), "--lake", lake.root)
    result = evaluate_model(lake, tuned.model_id, tuned.version, str(dump))
    scratch = external.scratch_lake(lake, external.read_dump(str(dump)))
    labelled = scratch.read("gold.labels").where(
        (F.col("task") == SEQUENCE_TASK) & F.col("label").isNotNull()
    )
    assert result["dataset"] == "hospital_b" and result["metrics"]["auroc"]["n"] == labelled.count() > 0
    assert features.training_frame(scratch, features.task(SEQUENCE_TASK)).count() == labelled.count()
    evaluation = f"{tuned.model_id}.v{tuned.version}.hospital_b"
    assert lake.read("gold.model_metrics").where(F.col("evaluation") == evaluation).count() > 0


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
    # Which notices TensorFlow prints depends on the CPU (oneDNN's only where it is on by default).
    assert any(notice in loud.stderr for notice in _NOTICES), loud.stderr[-2000:]
    assert "kept" in loud.stderr
