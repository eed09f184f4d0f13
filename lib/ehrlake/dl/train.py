"""Training the deep models: a CNN per image task, an ANN per tabular task, distributed.

The driver plans the work (Delta snapshot, selection, shards, steps), the launcher runs
:func:`fit_worker` on every worker, rank 0 saves the model into the lake, and the driver then
scores the task's rows on the executors (``predict.py``), evaluates the held-out split with the same
metrics as the Spark ML models (``models.train.record``) and registers the version with the Delta
versions it read. Every rank must end with bit-identical weights; a run where they differ fails.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import time
from dataclasses import dataclass, replace

from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake.dl import datasets, launch, predict, runtime, tensors
from ehrlake.dl.datasets import Selection, Shard
from ehrlake.errors import EhrlakeError
from ehrlake.models import evaluate, registry, versions
from ehrlake.models.train import DEFAULT_SEED, stratified_share

IMAGES = "silver.imaging"


@dataclass(frozen=True)
class Payload:
    """Everything a worker needs; small and picklable (file lists, not data)."""

    kind: str  # cnn | ann
    shards: tuple[Shard, ...]
    train: Selection
    val_shard: Shard | None
    val: Selection | None
    hyper: runtime.NetSettings
    backend: str
    steps_per_epoch: int
    epochs: int
    seed: int
    save_to: str | None  # rank 0 saves the model here
    # kind "sequence": vocab_size, length, dim, layers, heads, and the pretrained encoder's file or None
    sequence: dict | None = None
    # kind "cnn": a contrastively pretrained trunk's file (images.encoder) or None
    pretrained: str | None = None


def fit_worker(worker: launch.Worker, p: Payload) -> dict:
    """Build, fit and (rank 0) save one model; runs in every worker process."""
    tf = runtime.tensorflow()
    k = runtime.keras()
    k.utils.set_random_seed(p.seed)
    lr = p.hyper.learning_rate * (worker.size if worker.launcher == "horovod" else 1)
    with worker.scope():
        model = _network(p, worker.batch_norm())
        if p.hyper.schedule == "cosine":  # settles at the end instead of wandering
            lr = k.optimizers.schedules.CosineDecay(lr, decay_steps=p.epochs * p.steps_per_epoch, alpha=0.01)
        model.compile(
            optimizer=worker.optimizer(k.optimizers.Adam(lr)),
            loss="binary_crossentropy",
            metrics=[k.metrics.AUC(name="auc")],
        )
    callbacks = worker.callbacks()
    if p.val_shard is not None and p.hyper.early_stopping:
        callbacks.append(
            k.callbacks.EarlyStopping(
                monitor="val_auc",
                mode="max",
                patience=p.hyper.patience,
                restore_best_weights=True,
            )
        )
    per_worker = p.hyper.batch_size
    shard = p.shards[worker.rank]
    started = time.perf_counter()
    with (
        datasets.open_dataset(
            shard,
            p.train,
            p.backend,
            worker.batch(per_worker),
            repeat=True,
            shuffle=2048,
            seed=p.seed + worker.rank,
        ) as train_ds,
        _validation(p, worker) as val_ds,
    ):
        if worker.launcher == "barrier":  # the shards are planned already: MWMS must not re-shard
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
            train_ds = train_ds.with_options(options)
            val_ds = val_ds.with_options(options) if val_ds is not None else None
        history = model.fit(
            train_ds,
            epochs=p.epochs,
            steps_per_epoch=p.steps_per_epoch,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=0,
        )
    seconds = time.perf_counter() - started
    epochs_run = len(history.history.get("loss", []))
    # every rank reads its weights: under MWMS reading batch-norm statistics is a collective
    # operation, and a rank 0 reading alone would wait forever for the others
    weights = model.get_weights()
    if worker.rank == 0 and p.save_to:
        from ehrlake.dl import nets

        nets.save_portable(_network(p), weights, os.path.join(p.save_to, "model.keras"))
    return {
        "digest": launch.weights_digest(weights),
        "epochs": epochs_run,
        "seconds": seconds,
        "samples": epochs_run * p.steps_per_epoch * per_worker,
        "history": {k_: [float(v) for v in vals] for k_, vals in history.history.items()}
        if worker.rank == 0
        else {},
    }


def _network(p: Payload, norm=None):
    """The payload's network, untrained (``norm``: the batch-normalisation layer factory of
    distributed training; None: the plain layer)."""
    from ehrlake.dl import nets

    h = p.hyper
    if p.kind == "cnn":
        model = nets.cnn(p.train.shape, tuple(h.filters), h.dropout, h.augment, norm, h.bn_momentum)
        if p.pretrained:  # the trunk's layers carry the CNN's names: loaded by name, the head stays new
            saved = runtime.keras().models.load_model(p.pretrained, compile=False)
            for layer in saved.layers:
                if layer.weights:
                    model.get_layer(layer.name).set_weights(layer.get_weights())
        return model
    if p.kind == "sequence":
        s = p.sequence
        encoder = nets.sequence_encoder(s["vocab_size"], s["length"], s["dim"], s["layers"], s["heads"])
        if s["pretrained"]:  # the same starting weights on every rank (and rank 0 broadcasts them)
            saved = runtime.keras().models.load_model(
                s["pretrained"], custom_objects=nets.sequence_layers(), compile=False
            )
            encoder.set_weights(saved.get_weights())
        return nets.sequence_classifier(encoder, h.dropout)
    return nets.ann(p.train.shape[0], tuple(h.hidden), h.dropout)


def _validation(p: Payload, worker):
    import contextlib

    if p.val_shard is None:
        return contextlib.nullcontext(None)
    # every rank scores the whole validation split with the same weights, so early stopping decides
    # the same everywhere; the Arrow reader re-reads it each epoch
    return datasets.open_dataset(p.val_shard, p.val, "arrow", worker.batch(256), repeat=False)


def plan(
    kind,
    snap,
    train: Selection,
    val: Selection | None,
    hyper,
    backend,
    workers,
    epochs,
    seed,
    save_to,
    sequence=None,
    pretrained=None,
):
    """The payload of a run: the training selection sharded between ``workers``, the validation
    selection whole, and the steps per epoch every worker runs (all selected rows once)."""
    shards = tuple(datasets.plan_shards(snap, train, workers))
    steps = math.ceil(sum(s.rows for s in shards) / (hyper.batch_size * workers))
    val_shard = datasets.whole_shard(snap, val) if val else None
    return Payload(
        kind,
        shards,
        train,
        val_shard,
        val,
        hyper,
        backend,
        steps,
        epochs,
        seed,
        save_to,
        sequence,
        pretrained,
    )


def _launch(lake, payload: Payload, workers: int, launcher: str) -> list[dict]:
    return launch.run(lake.spark, fit_worker, payload, workers, launcher)


def _new_version(lake, model_id: str) -> tuple[int, str, str]:
    version, artifact, path = versions.new_artifact(lake, model_id)
    os.makedirs(path)  # the workers save into it
    return version, artifact, path


def _training_metrics(results: list[dict], workers: int) -> dict:
    seconds = max(r["seconds"] for r in results)
    samples = sum(r["samples"] for r in results)
    return {
        "train_seconds": {"value": round(seconds, 1)},
        "train_samples_per_s": {"value": round(samples / seconds, 1) if seconds else None},
        "epochs": {"value": results[0]["epochs"]},
        "workers": {"value": workers},
    }


@dataclass(frozen=True)
class Run:
    """One distributed training run: what every registered deep model records about it."""

    model_id: str
    version: int
    artifact: str
    epochs: int
    seed: int
    launcher: str
    backend: str
    workers: int
    results: list


def _register(lake, audit, run: Run, task, algorithm, params, features, data, metrics, bands, test):
    """Register the version (parameters, data versions, metrics, training history) and record its
    held-out evaluation in the gold model tables."""
    mv = registry.ModelVersion(
        model_id=run.model_id,
        version=run.version,
        task=task,
        algorithm=algorithm,
        params={
            **params,
            "epochs": run.epochs,
            "seed": run.seed,
            "launcher": run.launcher,
            "backend": datasets.default_backend() if run.backend == "auto" else run.backend,
            "workers": run.workers,
            "history": run.results[0]["history"],
        },
        features=features,
        training_data=data,
        metrics={**metrics, **_training_metrics(run.results, run.workers)},
        bands=bands,
        artifact=run.artifact,
        created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        status="candidate",
    )
    return versions.register(lake, audit, mv, test)


# --- images -----------------------------------------------------------------------------------------


def image_selection(source_system: str, split_name: str | None, shape) -> Selection:
    filters = [("source_system", "=", source_system), ("label", ">=", 0)]
    if split_name:
        filters.append(("split", "=", split_name))
    return Selection(tuple(filters), "pixels", (*shape, 1))


# A share of an image task's labels is kept as a list of image ids in the readers' filter: a
# label-efficiency point keeps few labels by definition, and a list beyond this many is refused
MAX_KEPT_IMAGES = 200_000


def kept_images(lake, snap, source: str, split_name: str, label_fraction: float, label_seed: int):
    """The ids of ``label_fraction`` of ``source``'s labelled ``split_name`` images, stratified by
    label (``models.train.stratified_share``, as the sequence models' kept patients are)."""
    images = (
        lake.read(IMAGES, version=snap.version)
        .where((F.col("source_system") == source) & (F.col("split") == split_name) & (F.col("label") >= 0))
        .select("image_id", "label")
    )
    kept = stratified_share(images, "image_id", ["label"], label_fraction, label_seed).select("image_id")
    count = kept.count()
    if count > MAX_KEPT_IMAGES:
        raise EhrlakeError(
            f"{label_fraction:.0%} of {source}'s {split_name} labels is {count:,} images, over the "
            f"{MAX_KEPT_IMAGES:,} a label share may name: train on all labels (--label-fraction 1)"
        )
    return tuple(sorted(r.image_id for r in kept.collect()))


def kept_selection(lake, snap, source: str, split_name: str | None, shape, label_fraction, label_seed):
    """The readers' selection of ``source``'s labelled ``split_name`` images (None without a split),
    narrowed to the kept ids when only a share of the labels is kept."""
    if not split_name:
        return None
    selection = image_selection(source, split_name, shape)
    if label_fraction >= 1:
        return selection
    ids = kept_images(lake, snap, source, split_name, label_fraction, label_seed)
    return replace(selection, filters=(*selection.filters, ("image_id", "in", ids)))


def train_image_model(
    lake,
    task: str,
    cfg: runtime.Config | None = None,
    epochs: int | None = None,
    workers: int | None = None,
    launcher: str | None = None,
    backend: str | None = None,
    seed: int = DEFAULT_SEED,
    role: str | None = None,
    pretrained: registry.ModelVersion | None = None,
    label_fraction: float = 1.0,
) -> registry.ModelVersion:
    """Train the CNN of an image task on its ``train`` split (validation AUC per epoch on ``val``),
    evaluate it on its test split, write every image's finding to ``gold.image_findings`` and
    register it. ``pretrained``: an ``images.encoder`` version whose trunk it starts from
    (registered as ``<task>.cnn_pretrained``; docs/self_supervised.md). ``label_fraction``: the
    share of the training and validation labels kept (:func:`kept_images`, chosen by ``seed``,
    which also seeds the fit); the test split is always whole."""
    if not 0 < label_fraction <= 1:
        raise EhrlakeError(f"the share of labels kept must be in (0, 1], not {label_fraction}")
    from ehrlake.ingest.images import load_spec

    cfg = cfg or runtime.load()
    if task not in cfg.image_tasks:
        raise EhrlakeError(
            f"no image task {task!r} in conf/deep_learning.yaml ({', '.join(cfg.image_tasks)})"
        )
    spec = cfg.image_tasks[task]
    workers = workers or cfg.workers
    launcher = launcher or cfg.launcher
    backend = backend or cfg.backend
    hyper = cfg.cnn_for(task)
    epochs = epochs or hyper.epochs
    shape = tuple(load_spec().shape)
    snap = datasets.snapshot(lake.root, IMAGES)
    source = spec.source_system
    test_split = hyper.test
    train_sel, val_sel = (
        kept_selection(lake, snap, source, split_name, shape, label_fraction, seed)
        for split_name in ("train", hyper.validation)
    )
    trunk = None
    if pretrained is not None:
        if list(pretrained.params["filters"]) != list(hyper.filters):
            raise EhrlakeError(
                f"{pretrained.label} is a trunk of filters {pretrained.params['filters']}, {task}'s CNN "
                f"has {list(hyper.filters)}: pretrain with the task's filters (ehrlake pretrain --images)"
            )
        trunk = os.path.join(pretrained.artifact_path(lake), "encoder.keras")
    model_id = f"{task}.cnn" + ("_pretrained" if pretrained else "")
    version, artifact, path = _new_version(lake, model_id)
    payload = plan(
        "cnn", snap, train_sel, val_sel, hyper, backend, workers, epochs, seed, path, pretrained=trunk
    )
    with lake.security.job("train", ["gold"], role) as (_, audit):
        results = _launch(lake, payload, workers, launcher)
        findings = predict.image_findings(
            lake, path, snap.version, source, task, model_id, version, hyper.mirror_at_test, spec.modalities
        )
        test = findings.where((F.col("split") == test_split) & F.col("label").isNotNull()).cache()
        if test.limit(1).count() == 0:
            raise EhrlakeError(
                f"{IMAGES} has no labelled {test_split} images of {source}: nothing to evaluate on"
            )
        # the finding's threshold: the most accurate on the validation labels training saw
        threshold = (
            evaluate.accuracy_threshold(findings.where(datasets.spark_condition(val_sel.filters)))
            if val_sel is not None
            else evaluate.FINDING_THRESHOLD
        )
        metrics = evaluate.metrics(test, threshold)
        saliency = os.path.join(artifact, "gradcam.png")
        predict.saliency_figure(lake, path, snap, image_selection(source, test_split, shape), task, saliency)
        run = Run(model_id, version, artifact, epochs, seed, launcher, backend, workers, results)
        params = {
            **dataclasses.asdict(hyper),
            "threshold": threshold,
            "source_system": source,
            "modalities": list(spec.modalities),
            "test_split": test_split,
            "shape": list(shape),
            "saliency": saliency,
            "pretrained": pretrained.label if pretrained else None,
            "label_fraction": label_fraction,
            "label_seed": seed,
            "train_images": sum(shard.rows for shard in payload.shards),
        }
        # evaluation id <model>.v<N>.test, whichever split the task evaluates on
        mv = _register(
            lake, audit, run, task, "cnn", params, ["pixels"], {IMAGES: snap.version}, metrics, {}, test
        )
        predict.write_findings(lake, findings, threshold)
        test.unpersist()
    return mv


# --- tabular ----------------------------------------------------------------------------------------


def train_tabular_ann(
    lake,
    task_name: str,
    cfg: runtime.Config | None = None,
    epochs: int | None = None,
    workers: int | None = None,
    launcher: str | None = None,
    backend: str | None = None,
    seed: int = DEFAULT_SEED,
    role: str | None = None,
) -> registry.ModelVersion:
    """The ANN of a tabular task, on the same rows, split and metrics as its Spark ML models."""
    cfg = cfg or runtime.load()
    t = feats.task(task_name)
    workers = workers or cfg.workers
    launcher = launcher or cfg.launcher
    backend = backend or cfg.backend
    hyper = cfg.ann
    epochs = epochs or hyper.epochs
    data_versions = {table: lake.version(table) for table in (t.feature_table, "gold.labels")}
    with lake.security.job("train", ["gold"], role) as (_, audit):
        inputs, scaling, accepts = tensors.build(lake, task_name, seed, data_versions)
        table = tensors.table(task_name)
        snap = datasets.snapshot(lake.root, table)
        sel = Selection((("split", "=", "train"),), "x", (len(inputs),))
        val_sel = replace(sel, filters=(("split", "=", "val"),))
        model_id = f"{task_name}.ann"
        version, artifact, path = _new_version(lake, model_id)
        payload = plan("ann", snap, sel, val_sel, hyper, backend, workers, epochs, seed, path)
        results = _launch(lake, payload, workers, launcher)
        held_out = lake.read(table, version=snap.version).where(F.col("split") == "test")
        test = predict.tabular_scores(held_out, path, inputs).join(
            feats.training_frame(lake, t, data_versions).drop("label"), ["patient_key", "index_id"]
        )
        positives, n = test.agg(F.sum("label"), F.count("*")).first()
        train_rate = (
            lake.read(table, version=snap.version)
            .where(F.col("split") != "test")
            .agg(F.avg("label"))
            .first()[0]
        )
        metrics = evaluate.metrics(test, train_rate)
        run = Run(model_id, version, artifact, epochs, seed, launcher, backend, workers, results)
        params = {
            **dataclasses.asdict(hyper),
            "threshold": train_rate,
            "scaling": scaling,
            "accepts": accepts,  # each input's training range: scoring refuses a patient far outside
            "tensors": {table: snap.version},
            "test_rows": int(n),
            "test_positives": int(positives or 0),
        }
        mv = _register(
            lake,
            audit,
            run,
            task_name,
            "ann",
            params,
            inputs,
            data_versions,
            metrics,
            evaluate.risk_bands(test),
            test,
        )
    return mv
