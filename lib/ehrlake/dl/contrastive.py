"""Contrastive pretraining of the CNN's trunk on every image, labels unused (SimCLR; Chen et al.
2020, and Azizi et al. 2021 for medical images; issue 19, docs/self_supervised.md).

Each image is seen as two random views (flips, shifts, zoom, contrast, noise), and the encoder
with a small projection head learns to tell which view of the batch belongs with which (NT-Xent:
a softmax over the batch's other views at temperature ``contrastive.temperature``). The images are
every image of ``silver.imaging`` outside a held-out split, every source together (MedMNIST sets,
DICOM frames), written as ``gold.tensors_images_ssl`` with a ``train`` / ``val`` split by a hash of
the image; no task's test image is pretrained on. Runs on the existing launchers; the encoder
(``nets.image_encoder``: the CNN's trunk, layers named as the CNN's) is registered as
``images.encoder`` with the validation loss and pair accuracy before and after.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

from pyspark.sql import functions as F

from ehrlake.dl import datasets, launch, runtime
from ehrlake.dl.datasets import Selection, Shard
from ehrlake.dl.pretrain import register_encoder
from ehrlake.lake import WriteMode
from ehrlake.models import registry, versions

IMAGES = "silver.imaging"
TENSORS = "gold.tensors_images_ssl"
MODEL_ID = "images.encoder"
VALIDATION_PERCENT = 10


def held_out(cfg: runtime.Config):
    """Images no pretraining may see: every ``test`` split, and each image task's evaluation split
    where the task evaluates on another (PneumoniaMNIST's shared file has no test array: its
    ``val`` is its test split)."""
    split = F.coalesce(F.col("split"), F.lit(""))
    out = split == "test"
    for name, task in cfg.image_tasks.items():
        evaluated = cfg.cnn_for(name).test
        if evaluated != "test":
            out = out | ((F.col("source_system") == task.source_system) & (split == evaluated))
    return out


def write_tensors(lake, cfg: runtime.Config) -> int:
    """Every image outside a held-out split (:func:`held_out`) as ``pixels`` with ``split``
    (``val`` for a hash tenth of them); returns the version of ``silver.imaging`` read."""
    version = lake.version(IMAGES)
    images = lake.read(IMAGES, version=version).where(~held_out(cfg))
    bucket = F.pmod(F.xxhash64("source_system", "image_id"), F.lit(100))
    out = images.select(
        F.when(bucket < VALIDATION_PERCENT, "val").otherwise("train").alias("split"),
        F.lit(0).alias("label"),
        "pixels",
    ).repartition(8)
    lake.write(out, TENSORS, mode=WriteMode.OVERWRITE, commit_info={"ehrlakeJob": "pretrain"})
    return version


def contrastive_model(encoder, shape, projection: int = 64):
    """``pixels`` -> (batch, 2, ``projection``): two random views' projections (training only).
    Its ``views`` (the augmentations) and ``projection`` layers are reachable by name."""
    k = runtime.keras()
    layers = k.layers
    views = k.Sequential(
        [
            layers.RandomFlip("horizontal"),
            layers.RandomTranslation(0.12, 0.12, fill_mode="constant"),
            layers.RandomZoom(0.15, fill_mode="constant"),
            layers.RandomContrast(0.3),
            layers.GaussianNoise(0.03),
        ],
        name="views",
    )
    head = k.Sequential(
        [layers.Dense(encoder.output.shape[-1], activation="relu"), layers.Dense(projection)],
        name="projection",
    )
    x = k.Input(shape=shape, name="pixels")
    pair = [layers.Reshape((1, projection))(head(encoder(views(x)))) for _ in range(2)]
    return k.Model(x, layers.Concatenate(axis=1)(pair), name="contrastive")


def _projected_pair(model, x):
    """Two random views of ``x`` through the encoder and head in inference mode (batch norm's
    moving statistics are read, not updated)."""
    tf = runtime.tensorflow()
    encoder, head, views = (model.get_layer(n) for n in ("image_encoder", "projection", "views"))
    z = [head(encoder(views(x, training=True), training=False), training=False) for _ in range(2)]
    return tf.stack(z, axis=1)


def nt_xent(temperature: float):
    """NT-Xent per image: each view's cross-entropy of finding its partner among the batch's views."""
    tf = runtime.tensorflow()

    def loss(_, pair):
        z = tf.math.l2_normalize(tf.concat([pair[:, 0], pair[:, 1]], axis=0), axis=1)
        n = tf.shape(pair)[0]
        logits = tf.matmul(z, z, transpose_b=True) / temperature - 1e9 * tf.eye(2 * n)
        partner = tf.concat([tf.range(n, 2 * n), tf.range(n)], axis=0)
        ce = tf.keras.losses.sparse_categorical_crossentropy(partner, logits, from_logits=True)
        return (ce[:n] + ce[n:]) / 2

    return loss


@dataclass(frozen=True)
class Payload:
    shards: tuple[Shard, ...]
    val: Shard | None
    selection: Selection
    val_selection: Selection
    shape: tuple[int, ...]
    settings: runtime.ContrastiveSettings
    filters: tuple[int, ...]
    steps_per_epoch: int
    epochs: int
    seed: int
    save_to: str | None


def _val_metrics(model, p: Payload) -> dict | None:
    """NT-Xent and pair accuracy (a view's nearest other view is its partner) on the validation
    images, with the same random views every time (seeded): comparable before and after."""
    if p.val is None:
        return None
    tf, k = runtime.tensorflow(), runtime.keras()
    k.utils.set_random_seed(12345)
    loss_fn = nt_xent(p.settings.temperature)
    total = hits = n = 0.0
    with datasets.open_dataset(p.val, p.val_selection, "arrow", 64, repeat=False) as ds:
        for x, _ in ds:
            pair = _projected_pair(model, x)
            total += float(tf.reduce_sum(loss_fn(None, pair)))
            z = tf.math.l2_normalize(pair, axis=-1)
            sims = tf.matmul(z[:, 0], z[:, 1], transpose_b=True)
            found = tf.argmax(sims, 1, output_type=tf.int32) == tf.range(len(z))
            hits += float(tf.reduce_sum(tf.cast(found, tf.float32)))
            n += float(len(z))
    return {"loss": total / n, "pair_accuracy": hits / n, "images": int(n)} if n else None


def fit_worker(worker: launch.Worker, p: Payload) -> dict:
    from ehrlake.dl import nets

    k = runtime.keras()
    s = p.settings
    k.utils.set_random_seed(p.seed)
    lr = s.learning_rate * (worker.size if worker.launcher == "horovod" else 1)
    with worker.scope():
        # batch norm's statistics over all workers' batches, or the ranks' weights drift apart
        encoder = nets.image_encoder(p.shape, p.filters, norm=worker.batch_norm())
        model = contrastive_model(encoder, p.shape, s.projection)
        model.compile(optimizer=worker.optimizer(k.optimizers.Adam(lr)), loss=nt_xent(s.temperature))
    before = _val_metrics(model, p)
    k.utils.set_random_seed(p.seed + worker.rank)
    started = time.perf_counter()
    with datasets.open_dataset(
        p.shards[worker.rank], p.selection, "arrow", worker.batch(s.batch_size), repeat=True,
        shuffle=1024, seed=p.seed + worker.rank,
    ) as ds:  # fmt: skip
        history = model.fit(
            ds, epochs=p.epochs, steps_per_epoch=p.steps_per_epoch, callbacks=worker.callbacks(), verbose=0
        )
    seconds = time.perf_counter() - started
    after = _val_metrics(model, p)
    weights = model.get_weights()  # every rank: under MWMS reading batch-norm statistics is collective
    if worker.rank == 0 and p.save_to:
        path = os.path.join(p.save_to, "encoder.keras")
        nets.save_portable(nets.image_encoder(p.shape, p.filters), encoder.get_weights(), path)
    return {
        "digest": launch.weights_digest(weights),
        "seconds": seconds,
        "val_before": before,
        "val_after": after,
        "loss": [float(v) for v in history.history.get("loss", [])],
    }


def pretrain_images(
    lake,
    cfg: runtime.Config | None = None,
    epochs: int | None = None,
    workers: int | None = None,
    launcher: str | None = None,
    seed: int = 42,
    role: str | None = None,
) -> registry.ModelVersion:
    """Contrastive pretraining of the CNN trunk (``cnn.filters``) on every image outside a held-out
    split (:func:`held_out`); registered as ``images.encoder``."""
    from ehrlake.ingest.images import load_spec

    cfg = cfg or runtime.load()
    s = cfg.contrastive
    epochs, workers, launcher = epochs or s.epochs, workers or cfg.workers, launcher or cfg.launcher
    shape = (*load_spec().shape, 1)
    with lake.security.job("pretrain", ["gold"], role) as (_, audit):
        data = {IMAGES: write_tensors(lake, cfg)}
        snap = datasets.snapshot(lake.root, TENSORS)
        data[TENSORS] = snap.version
        train, val = (Selection((("split", "=", x),), "pixels", shape) for x in ("train", "val"))
        shards = tuple(datasets.plan_shards(snap, train, workers))
        steps = max(1, math.ceil(sum(x.rows for x in shards) / (s.batch_size * workers)))
        version, artifact, path = versions.new_artifact(lake, MODEL_ID)
        os.makedirs(path)
        filters = tuple(cfg.cnn.filters)
        p = Payload(
            shards, datasets.whole_shard(snap, val), train, val, shape, s, filters, steps, epochs, seed, path
        )
        results = launch.run(lake.spark, fit_worker, p, workers, launcher)
        before, after = results[0]["val_before"] or {}, results[0]["val_after"] or {}
        params = {
            **dataclasses.asdict(s),
            "filters": list(filters),
            "shape": list(shape),
            "epochs": epochs,
            "seed": seed,
            "launcher": launcher,
            "workers": workers,
        }
        metrics = {
            "contrastive_loss": {"value": after.get("loss"), "untrained": before.get("loss")},
            "pair_accuracy": {"value": after.get("pair_accuracy"), "untrained": before.get("pair_accuracy")},
            "validation_images": {"value": after.get("images")},
        }
        return register_encoder(
            lake,
            audit,
            MODEL_ID,
            version,
            artifact,
            "contrastive-cnn",
            params,
            ["pixels"],
            data,
            metrics,
            results,
        )
