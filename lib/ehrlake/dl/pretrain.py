"""Masked-code pretraining of the sequence encoder on every patient's whole record (issue 19).

BERT's recipe as Med-BERT applies it to structured records: 15% of a sequence's code tokens are
chosen (``encoder.mask_rate``); of those, 80% become ``[MASK]``, 10% another code, 10% stay; the
model predicts the original codes at the chosen positions, labels unused. The records are
``gold.sequences``' ``all`` rows (``features/sequences.py``), written as float32 tensors (token
ids and ages, padded) into ``gold.tensors_sequences`` split by patient with the same split as
every supervised model, so the patients a supervised model is tested on are never pretrained on.
Training runs on the existing launchers (Horovod on Spark, barrier MWMS, local) like the CNN and
the ANN; the encoder is registered (``sequences.encoder``) with the data versions it read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import time
from dataclasses import dataclass

import numpy as np
from pyspark.sql import functions as F

from ehrlake.clean import origin
from ehrlake.dl import datasets, launch, runtime, tensors
from ehrlake.dl.datasets import Selection, Shard
from ehrlake.features import sequences as seqs
from ehrlake.lake import WriteMode
from ehrlake.models import registry, versions
from ehrlake.models.train import DEFAULT_SEED, split

TENSORS = "gold.tensors_sequences"
FIRST_CODE = len(seqs.SPECIAL)  # ids below are [PAD] [MASK] [CLS] [UNK]


def write_tensors(lake, length: int, seed: int = DEFAULT_SEED) -> dict[str, int]:
    """``gold.sequences``' whole records as ``x`` = float32 bytes of shape (2, ``length``) (token ids,
    ages; padded with 0 at the end), split ``train`` / ``val`` / ``test`` by patient. Returns the
    versions of the sequences and the vocabulary read."""
    read = {t: lake.version(t) for t in (seqs.SEQUENCES, seqs.VOCABULARY)}
    rows = lake.read(seqs.SEQUENCES, version=read[seqs.SEQUENCES]).where(F.col("index_id") == seqs.ALL)
    marked = tensors.with_split(*split(origin.with_templates(lake, rows), seed))

    packed = tensors.packed_sequence(length)
    out = marked.select(
        "patient_key", "split", F.lit(0).alias("label"), packed("token_ids", "ages").alias("x")
    ).repartition(8, "patient_key")
    lake.write(out, TENSORS, mode=WriteMode.OVERWRITE, commit_info={"ehrlakeJob": "pretrain"})
    return read


def masked(tokens, vocab_size: int, seed, rate: float):
    """(inputs with the chosen codes masked, the original ids, 1.0 at the chosen positions):
    stateless randomness from ``seed`` (a shape-(2,) int tensor), so a rerun masks alike."""
    tf = runtime.tensorflow()
    u = tf.random.stateless_uniform(tf.shape(tokens), seed, dtype=tf.float32)
    kind = tf.random.stateless_uniform(tf.shape(tokens), seed + 1, dtype=tf.float32)
    other = tf.random.stateless_uniform(tf.shape(tokens), seed + 2, FIRST_CODE, vocab_size, dtype=tf.int32)
    chosen = (tokens >= FIRST_CODE) & (u < rate)
    inputs = tf.where(chosen & (kind < 0.8), tf.ones_like(tokens), tokens)  # [MASK] is id 1
    inputs = tf.where(chosen & (kind >= 0.8) & (kind < 0.9), other, inputs)
    return inputs, tokens, tf.cast(chosen, tf.float32)


@dataclass(frozen=True)
class Payload:
    """Everything a worker needs; small and picklable (file lists, not data)."""

    shards: tuple[Shard, ...]
    val: Shard | None
    selection: Selection
    val_selection: Selection
    vocab_size: int
    frequencies: tuple[float, ...]  # each token id's share of the training records' codes (a baseline)
    encoder: runtime.EncoderSettings
    steps_per_epoch: int
    epochs: int
    seed: int
    save_to: str | None


def _batches(ds, p: Payload, seed: int):
    """``(x, y)`` tensor batches as ``((tokens, ages), targets, weights)`` with fresh masks."""
    tf = runtime.tensorflow()

    def to_inputs(i, batch):
        x, _ = batch
        tokens, ages = tf.cast(x[:, 0, :], tf.int32), tf.cast(x[:, 1, :], tf.int32)
        seeds = tf.stack([seed, tf.cast(i, tf.int32)])
        inputs, targets, weights = masked(tokens, p.vocab_size, seeds, p.encoder.mask_rate)
        return (inputs, ages), targets, weights

    return ds.enumerate().map(to_inputs)


def fit_worker(worker: launch.Worker, p: Payload) -> dict:
    """Pretrain on this worker's shard; rank 0 saves the encoder. Every rank reports the masked-code
    loss on the validation split before and after, and the embeddings of a few validation records
    (``probe``: a reloaded encoder must give the same)."""
    from ehrlake.dl import nets

    k = runtime.keras()
    e = p.encoder
    k.utils.set_random_seed(p.seed)
    lr = e.learning_rate * (worker.size if worker.launcher == "horovod" else 1)
    with worker.scope():
        encoder = nets.sequence_encoder(p.vocab_size, e.length, e.dim, e.layers, e.heads)
        model = nets.masked_code_model(encoder, p.vocab_size)
        model.compile(
            optimizer=worker.optimizer(k.optimizers.Adam(lr)),
            loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    before = _val_loss(model, p)
    started = time.perf_counter()
    with datasets.open_dataset(
        p.shards[worker.rank], p.selection, "arrow", worker.batch(e.batch_size), repeat=True,
        shuffle=1024, seed=p.seed + worker.rank,
    ) as ds:  # fmt: skip
        history = model.fit(
            _batches(ds, p, p.seed + 7919 * worker.rank),
            epochs=p.epochs,
            steps_per_epoch=p.steps_per_epoch,
            callbacks=worker.callbacks(),
            verbose=0,
        )
    seconds = time.perf_counter() - started
    after = _val_loss(model, p)
    weights = model.get_weights()
    probe = _probe(encoder, p)
    if worker.rank == 0 and p.save_to:
        plain = nets.sequence_encoder(p.vocab_size, e.length, e.dim, e.layers, e.heads)
        nets.save_portable(plain, encoder.get_weights(), os.path.join(p.save_to, "encoder.keras"))
    return {
        "digest": launch.weights_digest(weights),
        "seconds": seconds,
        "val_before": before,
        "val_after": after,
        "loss": [float(v) for v in history.history.get("loss", [])],
        "probe": probe,
    }


def _probe(encoder, p: Payload) -> dict | None:
    """The first validation records' inputs and patient embeddings (a handful of small lists)."""
    from ehrlake.dl import nets

    if p.val is None:
        return None
    with datasets.open_dataset(p.val, p.val_selection, "arrow", 4, repeat=False) as ds:
        for x, _ in ds.take(1):
            tokens, ages = x[:, 0, :].numpy().astype("int32"), x[:, 1, :].numpy().astype("int32")
            pooled = nets.patient_embedding(encoder)([tokens, ages], training=False).numpy()
            return {"tokens": tokens.tolist(), "ages": ages.tolist(), "embeddings": pooled.tolist()}
    return None


def _val_loss(model, p: Payload) -> dict | None:
    """Masked-code cross-entropy (nats per masked code) and top-1 accuracy on the whole validation
    split, with the same masks every time (seed fixed): comparable before and after training, and
    with the baseline that knows only each code's frequency in the training records."""
    if p.val is None:
        return None
    tf = runtime.tensorflow()
    prior = tf.constant(p.frequencies, tf.float32)
    log_prior, most_frequent = tf.math.log(tf.maximum(prior, 1e-9)), int(np.argmax(p.frequencies))
    sums = dict.fromkeys(("loss", "accuracy", "frequency_loss", "frequency_accuracy", "masked"), 0.0)
    with datasets.open_dataset(p.val, p.val_selection, "arrow", 64, repeat=False) as ds:
        for inputs, targets, weights in _batches(ds, p, 12345):
            logits = model(inputs, training=False)
            ce = tf.keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
            hit = tf.cast(tf.argmax(logits, -1, output_type=tf.int32) == targets, tf.float32)
            sums["loss"] += float(tf.reduce_sum(ce * weights))
            sums["accuracy"] += float(tf.reduce_sum(hit * weights))
            sums["frequency_loss"] -= float(tf.reduce_sum(tf.gather(log_prior, targets) * weights))
            sums["frequency_accuracy"] += float(
                tf.reduce_sum(tf.cast(targets == most_frequent, tf.float32) * weights)
            )
            sums["masked"] += float(tf.reduce_sum(weights))
    n = sums.pop("masked")
    return {**{k: v / n for k, v in sums.items()}, "masked": int(n)} if n else None


def _frequencies(lake, version: int, vocab_size: int) -> tuple[float, ...]:
    """Each code id's share of the code tokens of the training split's records."""
    rows = lake.read(TENSORS, version=version).where(F.col("split") == "train").select("x")
    counts = np.zeros(vocab_size)
    ids = F.udf(
        lambda x: np.frombuffer(x, "<f4")[: len(x) // 8].astype(int).tolist(), "array<int>", useArrow=False
    )
    for r in (
        rows.select(F.explode(ids("x")).alias("id"))
        .where(F.col("id") >= FIRST_CODE)
        .groupBy("id")
        .count()
        .collect()  # at most one row per vocabulary token
    ):
        counts[r.id] = r["count"]
    return tuple((counts / max(1.0, counts.sum())).tolist())


MODEL_ID = "sequences.encoder"


def pretrain(
    lake,
    cfg: runtime.Config | None = None,
    epochs: int | None = None,
    workers: int | None = None,
    launcher: str | None = None,
    seed: int = DEFAULT_SEED,
    role: str | None = None,
) -> registry.ModelVersion:
    """Pretrain the sequence encoder (``encoder:`` of conf/deep_learning.yaml) on the train split's
    whole records and register it (``sequences.encoder``) with the sequences, vocabulary and tensor
    versions it read and its masked-code loss on the validation split before and after."""
    cfg = cfg or runtime.load()
    e = cfg.encoder
    epochs, workers, launcher = epochs or e.epochs, workers or cfg.workers, launcher or cfg.launcher
    with lake.security.job("pretrain", ["gold"], role) as (_, audit):
        data = write_tensors(lake, e.length, seed)
        vocab_size = lake.read(seqs.VOCABULARY, version=data[seqs.VOCABULARY]).agg(F.max("id")).first()[0] + 1
        snap = datasets.snapshot(lake.root, TENSORS)
        data[TENSORS] = snap.version
        train, val = (Selection((("split", "=", s),), "x", (2, e.length)) for s in ("train", "val"))
        shards = tuple(datasets.plan_shards(snap, train, workers))
        val_shard = datasets.whole_shard(snap, val)
        steps = max(1, math.ceil(sum(s.rows for s in shards) / (e.batch_size * workers)))
        version, artifact, path = versions.new_artifact(lake, MODEL_ID)
        os.makedirs(path)
        frequencies = _frequencies(lake, data[TENSORS], vocab_size)
        p = Payload(shards, val_shard, train, val, vocab_size, frequencies, e, steps, epochs, seed, path)
        results = launch.run(lake.spark, fit_worker, p, workers, launcher)
        first = results[0]
        before, after = first["val_before"] or {}, first["val_after"] or {}
        params = {
            **dataclasses.asdict(e),
            "epochs": epochs,
            "vocab_size": vocab_size,
            "vocabulary_fingerprint": seqs.vocabulary_fingerprint(lake, data[seqs.VOCABULARY]),
            "seed": seed,
            "launcher": launcher,
            "workers": workers,
            "probe": first["probe"],
        }
        metrics = {
            "masked_code_loss": {
                "value": after.get("loss"),
                "untrained": before.get("loss"),
                "frequency": after.get("frequency_loss"),
            },
            "masked_code_accuracy": {
                "value": after.get("accuracy"),
                "untrained": before.get("accuracy"),
                "frequency": after.get("frequency_accuracy"),
            },
            "masked_codes": {"value": after.get("masked")},
        }
        return register_encoder(
            lake, audit, MODEL_ID, version, artifact, "masked-code-transformer", params,
            ["token_ids", "ages"], data, metrics, results,
        )  # fmt: skip


def register_encoder(
    lake, audit, model_id, version, artifact, algorithm, params, features, data, metrics, results
) -> registry.ModelVersion:
    """Register a self-supervised encoder (task ``pretraining``, a candidate) with the data
    versions it read, its held-out metrics, training time and first rank's loss history."""
    mv = registry.ModelVersion(
        model_id=model_id,
        version=version,
        task="pretraining",
        algorithm=algorithm,
        params={**params, "history": {"loss": results[0]["loss"]}},
        features=features,
        training_data=data,
        metrics={**metrics, "train_seconds": {"value": round(max(r["seconds"] for r in results), 1)}},
        bands={},
        artifact=artifact,
        created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        status="candidate",
    )
    registry.register(lake, mv)
    audit.append((registry.TABLE, f"{mv.label}: {mv.headline()}"))
    return mv


def load_encoder(lake, mv: registry.ModelVersion):
    """The registered encoder, ready to embed sequences built with vocabulary version
    ``mv.training_data['gold.sequence_vocabulary']``."""
    from ehrlake.dl import nets

    path = os.path.join(mv.artifact_path(lake), "encoder.keras")
    return runtime.keras().models.load_model(path, custom_objects=nets.sequence_layers(), compile=False)
