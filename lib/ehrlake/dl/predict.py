"""Predictions of the deep models, computed on the executors and written to Delta.

Each Spark partition loads the saved Keras model once and scores its rows in batches, so nothing
is collected on the driver and no Arrow path is needed (the deep-learning runtime keeps Spark's
Arrow conversions off). ``gold.image_findings`` gets one row per image and image model version
(merge on source system, image and model: re-running replaces, never duplicates);
the ANN's scores reach ``gold.risk_scores`` through ``scoring.score``, as any model's do.
"""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.dl import datasets, runtime
from ehrlake.models import evaluate, scope

FINDINGS = "gold.image_findings"
FINDING_KEYS = ["source_system", "image_id", "model_id"]
BATCH = 256
_MODELS: dict[str, object] = {}


def load_model(path: str):
    """The saved Keras model under ``path`` (cached per process: executors reuse Python workers)."""
    if path not in _MODELS:
        from ehrlake.dl.nets import sequence_layers  # the sequence models' own layers

        _MODELS[path] = runtime.keras().models.load_model(
            os.path.join(path, "model.keras"), custom_objects=sequence_layers(), compile=False
        )
    return _MODELS[path]


def batched(rows, size: int = BATCH):
    batch = []
    for r in rows:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _image_scorer(path: str, shape: tuple[int, ...], pixels_at: int, mirrored: bool):
    def score(rows):
        model = None
        for batch in batched(rows):
            model = model or load_model(path)
            x = np.stack([np.frombuffer(r[pixels_at], "<f4").reshape(shape) for r in batch])
            p = model.predict_on_batch(x)[:, 0]
            if mirrored:  # batch, height, width, channel: the left-right mirror
                p = (p + model.predict_on_batch(np.ascontiguousarray(x[:, :, ::-1]))[:, 0]) / 2
            for r, s in zip(batch, p, strict=True):
                yield (*r[:pixels_at], *r[pixels_at + 1 :], float(s))

    return score


IMAGE_COLUMNS = ["image_id", "patient_key", "source_system", "format", "modality", "split", "label"]


def score_images(frame: DataFrame, path: str, shape, mirrored: bool = False) -> DataFrame:
    """``frame`` (``IMAGE_COLUMNS`` + ``pixels``) with a ``score`` column instead of pixels;
    ``mirrored``: the mean of each image's and its mirror's scores (the model's ``mirror_at_test``)."""
    rows = frame.select(*IMAGE_COLUMNS, "pixels").rdd.mapPartitions(
        _image_scorer(path, tuple(shape) + (1,), len(IMAGE_COLUMNS), mirrored)
    )
    schema = T.StructType(
        [*frame.select(*IMAGE_COLUMNS).schema.fields, T.StructField("score", T.DoubleType())]
    )
    return frame.sparkSession.createDataFrame(rows, schema)


def in_scope(modalities) -> F.Column:
    """Whether an image is one a model reading ``modalities`` may score: its recorded modality is
    one of them, or none is recorded (an NPZ or PNG says nothing); no ``modalities``: every image."""
    if not modalities:
        return F.lit(True)
    return F.col("modality").isNull() | F.upper(F.col("modality")).isin(*[m.upper() for m in modalities])


def modalities(mv) -> tuple[str, ...]:
    """The modalities image model ``mv`` reads: recorded at training, else its task's declaration."""
    recorded = mv.params.get("modalities")
    if recorded is not None:
        return tuple(recorded)
    task = runtime.load().image_tasks.get(mv.task)
    return tuple(task.modalities) if task else ()


def image_findings(
    lake,
    path,
    version: int,
    source: str,
    task: str,
    model_id: str,
    model_version: int,
    mirrored: bool,
    reads: tuple[str, ...] = (),
):
    """Every image of ``source`` in ``silver.imaging`` (at ``version``) that a model reading the
    modalities ``reads`` may score (:func:`in_scope`), scored by the model."""
    from ehrlake.ingest.images import load_spec

    images = lake.read("silver.imaging", version=version).where(
        (F.col("source_system") == source) & in_scope(reads)
    )
    scored = score_images(images, path, load_spec().shape, mirrored)
    return scored.select(
        *IMAGE_COLUMNS,
        "score",
        F.lit(task).alias("task"),
        F.lit(model_id).alias("model_id"),
        F.lit(model_version).alias("model_version"),
        F.current_timestamp().alias("scored_at"),
    )


def mirrored(mv) -> bool:
    """Whether image model ``mv`` scores with its mirror (as it was evaluated and thresholded)."""
    return bool(mv.params.get("mirror_at_test", False))


def write_findings(lake, findings: DataFrame, threshold: float, delete: DataFrame | None = None) -> None:
    """Merge into ``gold.image_findings`` with the finding at the model's threshold; in the same
    commit, delete the findings whose keys ``delete`` holds."""
    out = findings.withColumn("finding", F.col("score") >= F.lit(threshold))
    lake.merge(out, FINDINGS, keys=FINDING_KEYS, commit_info={"ehrlakeJob": "score-images"}, delete=delete)


def score_source(
    lake, mv, source_system: str, role: str | None = None
) -> tuple[dict[bool, int], dict[str, int]]:
    """``ehrlake score-images``: every image of ``source_system`` in ``silver.imaging`` that image
    model ``mv`` may read (:func:`in_scope`) scored on the executors, merged into
    ``gold.image_findings`` as one audited job; returns (images per finding of this model and
    source, images refused per recorded modality)."""
    from ehrlake.errors import EhrlakeError

    if mv.algorithm != "cnn":
        raise EhrlakeError(f"{mv.label} is not an image model")
    reads = modalities(mv)
    with lake.security.job("score-images", ["gold"], role) as (_, audit):
        version = lake.version("silver.imaging")
        images = lake.read("silver.imaging", version=version).where(F.col("source_system") == source_system)
        refused = {
            r.modality: int(r["count"])
            for r in images.where(~in_scope(reads)).groupBy("modality").count().collect()  # per modality
        }
        path = mv.artifact_path(lake)
        findings = image_findings(
            lake, path, version, source_system, mv.task, mv.model_id, mv.version, mirrored(mv), reads
        )
        # a finding an earlier run made of an image this model may not read goes
        stale = images.where(~in_scope(reads)).select(*FINDING_KEYS[:2], F.lit(mv.model_id).alias("model_id"))
        write_findings(lake, findings, float(mv.params.get("threshold", evaluate.FINDING_THRESHOLD)), stale)
        counts = (
            lake.read(FINDINGS)
            .where((F.col("model_id") == mv.model_id) & (F.col("source_system") == source_system))
            .groupBy("finding")
            .count()
            .collect()  # two rows at most
        )
        refusal = ", ".join(f"{n} {m}" for m, n in sorted(refused.items()))
        audit.append(
            (
                FINDINGS,
                f"{source_system} scored with {mv.label}" + (f"; refused {refusal}" if refused else ""),
            )
        )
    return {bool(r.finding): int(r["count"]) for r in counts}, refused


def saliency_figure(
    lake, path: str, snap, selection, task: str, artifact_png: str, per_class: int = 4
) -> None:
    """Grad-CAM of the most confident held-out findings of each class (at most 8 images read)."""
    from ehrlake.dl import saliency

    model = load_model(path)
    picked: dict[int, list] = {0: [], 1: []}
    for batch in datasets.read_all(snap, selection, [selection.tensor, selection.label], batch_size=256):
        if batch.num_rows == 0:
            continue
        x = np.stack([np.frombuffer(b, "<f4").reshape(selection.shape) for b in batch.column(0).to_pylist()])
        y = np.asarray(batch.column(1).to_pylist())
        s = model.predict_on_batch(x)[:, 0]
        for label in (0, 1):
            confidence = s if label == 1 else 1 - s
            for i in np.where(y == label)[0]:
                picked[label].append((float(confidence[i]), x[i], label, float(s[i])))
            picked[label] = sorted(picked[label], key=lambda t: -t[0])[:per_class]
    chosen = picked[0] + picked[1]
    if not chosen:
        return
    saliency.figure(
        model,
        np.stack([c[1] for c in chosen]),
        [c[2] for c in chosen],
        [c[3] for c in chosen],
        os.path.join(lake.root, artifact_png),
        f"{task}: Grad-CAM for the predicted class, most confident held-out images (score = P(label 1))",
    )


# --- tabular ----------------------------------------------------------------------------------------


def _tabular_scorer(path: str, inputs: int, reasons: int, names: list[str], keep: tuple = ()):
    def score(rows):
        tf = runtime.tensorflow()
        model = None
        for batch in batched(rows):
            model = model or load_model(path)
            x = tf.constant(np.stack([np.frombuffer(r["x"], "<f4").reshape(inputs) for r in batch]))
            with tf.GradientTape() as tape:
                tape.watch(x)
                p = model(x, training=False)[:, 0]
                logit = tf.math.log(tf.clip_by_value(p, 1e-7, 1.0) / tf.clip_by_value(1 - p, 1e-7, 1.0))
            contrib = (tape.gradient(logit, x) * x).numpy()  # gradient x input, in standard deviations
            for r, s, c in zip(batch, p.numpy(), contrib, strict=True):
                top = [i for i in np.argsort(-c)[:reasons] if c[i] > 0]
                features, weights = [names[i] for i in top], [float(c[i]) for i in top]
                yield (r["index_id"], r["patient_key"], r["split"], r["label"], float(s), features, weights,
                       *[r[k] for k in keep])  # fmt: skip

    return score


def tabular_scores(
    frame: DataFrame, path: str, inputs: list[str], reasons: int = 3, keep: tuple = ()
) -> DataFrame:
    """``frame`` (index_id, patient_key, split, label, x) with ``score`` and the top features raising
    it; ``keep``: more columns of ``frame`` carried through as they are."""
    rows = frame.select("index_id", "patient_key", "split", "label", "x", *keep).rdd.mapPartitions(
        _tabular_scorer(path, len(inputs), reasons, inputs, tuple(keep))
    )
    schema = T.StructType(
        [
            T.StructField("index_id", T.StringType()),
            T.StructField("patient_key", T.StringType()),
            T.StructField("split", T.StringType()),
            T.StructField("label", T.IntegerType()),
            T.StructField("score", T.DoubleType()),
            T.StructField("reason_features", T.ArrayType(T.StringType())),
            T.StructField("reason_weights", T.ArrayType(T.DoubleType())),
            *[frame.schema[k] for k in keep],
        ]
    )
    return frame.sparkSession.createDataFrame(rows, schema)


def sequence_scores(frame: DataFrame, path: str, length: int) -> DataFrame:
    """``frame`` (index_id, patient_key, split, label, x: float32 (2, ``length``)) with the sequence
    model's ``score``, computed on the executors."""

    def score(rows):
        model = None
        for batch in batched(rows):
            model = model or load_model(path)
            x = np.stack([np.frombuffer(r["x"], "<f4").reshape(2, length) for r in batch])
            for r, s in zip(batch, model(x, training=False).numpy()[:, 0], strict=True):
                yield (r["index_id"], r["patient_key"], r["split"], r["label"], float(s))

    rows = frame.select("index_id", "patient_key", "split", "label", "x").rdd.mapPartitions(score)
    return frame.sparkSession.createDataFrame(
        rows, "index_id string, patient_key string, split string, label int, score double"
    )


def ann_population(lake, mv, as_of: dt.date, patients: DataFrame | None = None) -> DataFrame:
    """What the ANN of ``mv.task`` scores, with its inputs standardised as in training: for a
    patient-level task, every eligible patient's features as of the date (as ``ehrlake score`` does
    for the Spark ML models); for a per-row task, each patient's latest row of the feature table
    (labelled or not: extract rows carry no dates, so "latest" is the highest row id). Only of
    ``patients`` (a frame of ``patient_key``) where given."""
    from ehrlake import features as feats
    from ehrlake.dl.tensors import tensor

    t = feats.task(mv.task)
    if t.level == "patient":
        rows = feats.patient_features(lake, [as_of], patients=patients)
    else:
        table = lake.read(t.feature_table)
        if patients is not None:
            table = table.join(F.broadcast(patients), "patient_key", "left_semi")
        latest = table.groupBy("patient_key").agg(F.max("index_id").alias("index_id"))
        rows = table.join(latest, ["patient_key", "index_id"])
    return rows.select(
        F.col("index_id").cast("string").alias("index_id"),
        "patient_key",
        F.lit("score").alias("split"),
        F.lit(None).cast("int").alias("label"),
        tensor({f: tuple(v) for f, v in mv.params["scaling"].items()}).alias("x"),
        # inputs far outside the training range (models trained before ranges were kept: none)
        scope.outside(mv.params.get("accepts") or {}).alias(scope.OUTSIDE),
    )


def ann_scores(lake, mv, as_of: dt.date, patients: DataFrame | None = None):
    """(rows with ``patient_key`` and ``score``, their ``top_reasons`` column) of the ANN over
    :func:`ann_population`, for ``scoring.score`` to write like any model's scores."""
    from ehrlake import features as feats

    descriptions = feats.descriptions(feats.task(mv.task))
    population = ann_population(lake, mv, as_of, patients)
    scored = tabular_scores(population, mv.artifact_path(lake), mv.features, keep=(scope.OUTSIDE,))
    described = F.create_map(*[x for f in mv.features for x in (F.lit(f), F.lit(descriptions.get(f, f)))])
    reasons = F.transform(
        F.arrays_zip("reason_features", "reason_weights"),
        lambda z: F.concat(
            F.coalesce(described[z["reason_features"]], z["reason_features"]),
            F.lit(" (+"),
            F.format_number(z["reason_weights"], 2),
            F.lit(")"),
        ),
    )
    return scored, reasons


def external_ann_predictions(lake, scratch, mv) -> DataFrame:
    """The ANN's scores of every labelled row of its task in ``scratch`` (a new hospital's lake:
    ``models.external``), standardised as in training, with the rows' subgroup attributes."""
    from ehrlake import features as feats
    from ehrlake.dl.tensors import tensor

    rows = feats.training_frame(scratch, feats.task(mv.task)).withColumn(
        "index_id", F.col("index_id").cast("string")
    )
    frame = rows.select(
        "index_id",
        "patient_key",
        F.lit("external").alias("split"),
        F.col("label").cast("int").alias("label"),
        tensor({f: tuple(v) for f, v in mv.params["scaling"].items()}).alias("x"),
    )
    scored = tabular_scores(frame, mv.artifact_path(lake), mv.features)
    return scored.join(
        rows.select("patient_key", "index_id", *feats.pointintime.ATTRIBUTES),
        ["patient_key", "index_id"],
        "left",
    )


def evaluate_images(lake, mv, input_path: str, role: str | None = None) -> dict:
    """An image model on a new labelled set of files (NPZ, PNG folders, DICOM with labels), decoded
    on the executors exactly as ingest does, without writing the images to the lake."""
    from ehrlake.errors import EhrlakeError
    from ehrlake.ingest import images
    from ehrlake.ingest.sources import SourceKind, discover
    from ehrlake.models.versions import record

    if not os.path.exists(input_path):
        raise EhrlakeError(f"no file or directory {input_path}")
    spec = images.load_spec()
    if list(spec.shape) != list(mv.params.get("shape", spec.shape)):
        raise EhrlakeError(
            f"{mv.label} was trained on {mv.params['shape']} images; conf/imaging.yaml says {spec.shape}"
        )
    files = [f.path for f in discover(input_path, SourceKind.IMAGES)]
    if not files:
        raise EhrlakeError(f"no image files (.npz, .png, .dcm) under {input_path}")
    sc = lake.spark.sparkContext
    root = input_path
    decoded = sc.parallelize(files, max(1, min(len(files), sc.defaultParallelism * 4))).flatMap(
        lambda f: images.decode_file(f, root, spec)
    )
    rows = decoded.filter(lambda r: r.get("pixels") is not None and r.get("label") is not None).map(
        lambda r: (
            r["image_id"],
            None,
            "evaluation",
            r["format"],
            r.get("modality"),
            r.get("split"),
            int(r["label"]),
            bytes(r["pixels"]),
        )
    )
    frame = lake.spark.createDataFrame(
        rows,
        "image_id string, patient_key string, source_system string, format string, modality string, "
        "split string, label int, pixels binary",
    )
    reads = modalities(mv)
    pred = score_images(
        frame.where(in_scope(reads)), mv.artifact_path(lake), spec.shape, mirrored(mv)
    ).cache()
    if pred.limit(1).count() == 0:
        pred.unpersist()
        raise EhrlakeError(
            f"no labelled images {mv.label} may read in {input_path} (a label comes from an NPZ's labels "
            f"or a PNG folder; the model reads {', '.join(reads) or 'any modality'})"
        )
    dataset = os.path.basename(input_path.rstrip("/")).split(".")[0]
    with lake.security.job("evaluate", ["gold"], role) as (_, audit):
        overall = record(lake, mv, pred, dataset)
        audit.append(
            ("gold.model_metrics", f"{mv.label} on {dataset}: AUROC {overall['auroc']['value']:.3f}")
        )
    pred.unpersist()
    return {"model": mv.label, "dataset": dataset, "metrics": overall}
