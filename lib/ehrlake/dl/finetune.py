"""A patient task from event sequences: the encoder fine-tuned with a risk head, starting from the
pretrained encoder or from random weights (issue 19; docs/self_supervised.md).

The rows are the task's labelled indexes of ``gold.labels`` with their sequence of
``gold.sequences`` (an index whose patient had nothing before it gets an empty sequence: the same
rows as the tabular models), split by patient with the tabular models' split and seed, so the test
rows, metrics and intervals compare one to one with XGBoost's and the ANN's. ``label_fraction``
keeps that share of the training patients' labels (stratified by whether a patient has a positive,
chosen by a hash of the patient, nested: the patients of 5% are among those of 10%): the
label-efficiency curve.
"""

from __future__ import annotations

import dataclasses
import os

from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake.clean import origin
from ehrlake.dl import datasets, predict, runtime, tensors
from ehrlake.dl import train as dl_train
from ehrlake.dl.datasets import Selection
from ehrlake.errors import EhrlakeError
from ehrlake.features import sequences as seqs
from ehrlake.lake import WriteMode
from ehrlake.models import algorithms, evaluate, registry
from ehrlake.models.train import DEFAULT_SEED, require_both_classes, split, stratified_share


def table(task_name: str) -> str:
    return f"gold.tensors_seq_{task_name}"


def with_labels_kept(train_df, label_fraction: float, label_seed: int):
    """The training rows of ``label_fraction`` of the training patients, stratified: that share
    (at least one) of the patients with a positive label and of those without, separately in the
    fitted folds and in the validation fold (fold 0), each stratum's lowest hashes of patient and
    ``label_seed``. Nested (the patients of 5% are among those of 10%), the same patients for every
    learner given the same seed (``bench/ssl_curves.py``'s XGBoost), and never one class only
    in the fitted rows when the training split's fitted folds have both."""
    if label_fraction >= 1:
        return train_df
    patients = train_df.groupBy("patient_key").agg(
        F.max("label").alias("_positive"), F.max(F.col("cv_fold") == 0).alias("_validation")
    )
    kept = stratified_share(patients, "patient_key", ["_positive", "_validation"], label_fraction, label_seed)
    return train_df.join(kept.select("patient_key"), "patient_key", "left_semi")


def write_tensors(
    lake, task_name: str, length: int, seed: int, label_fraction: float, label_seed: int
) -> dict[str, int]:
    """The task's labelled indexes as float32 ``(2, length)`` sequences with their label and split
    (``train`` / ``val`` / ``test``; training patients beyond ``label_fraction`` left out). Returns
    the versions read."""
    t = feats.task(task_name)
    if t.level not in ("patient", "encounter"):
        raise EhrlakeError(f"{task_name} has no dated indexes (its rows are an extract's): no sequences")
    read = {tb: lake.version(tb) for tb in (seqs.SEQUENCES, seqs.VOCABULARY, "gold.labels")}
    labels = (
        lake.read("gold.labels", version=read["gold.labels"])
        .where((F.col("task") == task_name) & F.col("label").isNotNull())
        .select("patient_key", "index_id", F.col("label").cast("int").alias("label"))
    )
    sequences = lake.read(seqs.SEQUENCES, version=read[seqs.SEQUENCES]).select(
        "patient_key", "index_id", "token_ids", "ages"
    )
    rows = origin.with_templates(lake, labels.join(sequences, ["patient_key", "index_id"], "left"))
    train_df, test_df = split(rows, seed)
    marked = tensors.with_split(with_labels_kept(train_df, label_fraction, label_seed), test_df)

    packed = tensors.packed_sequence(length)
    out = marked.select(
        "index_id", "patient_key", "split", "label", packed("token_ids", "ages").alias("x")
    ).repartition(8, "index_id")
    lake.write(out, table(task_name), mode=WriteMode.OVERWRITE, commit_info={"ehrlakeJob": "train"})
    return read


def _same_vocabulary(pretrained: registry.ModelVersion, fingerprint: str, version: int) -> None:
    """The encoder's token embeddings index the vocabulary it was pretrained with: refuse another."""
    if pretrained.params.get("vocabulary_fingerprint") != fingerprint:
        raise EhrlakeError(
            f"{pretrained.label} was pretrained on vocabulary version "
            f"{pretrained.training_data[seqs.VOCABULARY]}, and the tokens or their ids have changed since "
            f"(now version {version}): pretrain again (ehrlake pretrain)"
        )


def train_sequence_model(
    lake,
    task_name: str,
    pretrained: registry.ModelVersion | None,
    label_fraction: float = 1.0,
    cfg: runtime.Config | None = None,
    epochs: int | None = None,
    workers: int | None = None,
    launcher: str | None = None,
    seed: int = DEFAULT_SEED,
    role: str | None = None,
    label_seed: int | None = None,
) -> registry.ModelVersion:
    """Fine-tune for ``task_name`` from ``pretrained`` (a ``sequences.encoder`` version; its
    architecture and vocabulary) or, with None, the same architecture from random weights; evaluate
    on the task's test patients and register ``<task>.sequence`` (from scratch:
    ``<task>.sequence_scratch``). ``seed`` is the patient split's (the tabular models' default, so
    the test rows are theirs); ``label_seed`` (default ``seed``) chooses the kept labels of
    ``label_fraction`` and seeds the fit."""
    if not 0 < label_fraction <= 1:
        raise EhrlakeError(f"the share of labels kept must be in (0, 1], not {label_fraction}")
    cfg = cfg or runtime.load()
    label_seed = seed if label_seed is None else label_seed
    e = cfg.encoder
    if pretrained is not None:
        e = dataclasses.replace(e, **{k: pretrained.params[k] for k in ("length", "dim", "layers", "heads")})
    workers, launcher = workers or cfg.workers, launcher or cfg.launcher
    hyper = dataclasses.replace(cfg.ann, batch_size=e.batch_size, learning_rate=e.learning_rate / 2)
    epochs = epochs or hyper.epochs
    with lake.security.job("train", ["gold"], role) as (_, audit):
        data = write_tensors(lake, task_name, e.length, seed, label_fraction, label_seed)
        fingerprint = seqs.vocabulary_fingerprint(lake, data[seqs.VOCABULARY])
        if pretrained is not None:
            _same_vocabulary(pretrained, fingerprint, data[seqs.VOCABULARY])
        snap = datasets.snapshot(lake.root, table(task_name))
        data[table(task_name)] = snap.version
        fitted, trained = F.col("split") == "train", F.col("split") != "test"  # trained: train + val
        counts = (
            lake.read(table(task_name), version=snap.version)
            .agg(
                F.count(F.when(fitted, 1)).alias("fit_n"),
                F.sum(F.when(fitted, F.col("label"))).alias("fit_positives"),
                F.avg(F.when(trained, F.col("label"))).alias("train_rate"),
                F.count(F.when(trained, 1)).alias("train_n"),
            )
            .first()
        )
        require_both_classes(task_name, counts["fit_n"], int(counts["fit_positives"] or 0))
        train_rate, train_n = counts["train_rate"], counts["train_n"]
        vocab_size = lake.read(seqs.VOCABULARY, version=data[seqs.VOCABULARY]).agg(F.max("id")).first()[0] + 1
        sel = Selection((("split", "=", "train"),), "x", (2, e.length))
        val_sel = dataclasses.replace(sel, filters=(("split", "=", "val"),))
        model_id = f"{task_name}.sequence" + ("" if pretrained else "_scratch")
        version, artifact, path = dl_train._new_version(lake, model_id)
        sequence = {
            "vocab_size": vocab_size,
            **{k: getattr(e, k) for k in ("length", "dim", "layers", "heads")},
            "pretrained": os.path.join(pretrained.artifact_path(lake), "encoder.keras")
            if pretrained
            else None,
        }
        payload = dl_train.plan(
            "sequence", snap, sel, val_sel, hyper, "arrow", workers, epochs, label_seed, path, sequence
        )
        results = dl_train._launch(lake, payload, workers, launcher)
        held_out = lake.read(table(task_name), version=snap.version).where(F.col("split") == "test")
        scored = predict.sequence_scores(held_out, path, e.length)
        subgroups = lake.read("gold.features_patient").select(
            "patient_key", "index_id", *feats.pointintime.ATTRIBUTES
        )
        test = scored.join(subgroups, ["patient_key", "index_id"], "left").cache()
        positives, n = test.agg(F.sum("label"), F.count("*")).first()
        metrics = evaluate.metrics(test, train_rate)
        run = dl_train.Run(
            model_id, version, artifact, epochs, label_seed, launcher, "arrow", workers, results
        )
        params = {
            **dataclasses.asdict(hyper),
            **{k: v for k, v in sequence.items() if k != "pretrained"},
            "pretrained": pretrained.label if pretrained else None,
            "vocabulary_fingerprint": fingerprint,
            "label_fraction": label_fraction,
            "split_seed": seed,
            "train_rows": int(train_n),
            "threshold": train_rate,
            "test_rows": int(n),
            "test_positives": int(positives or 0),
        }
        mv = dl_train._register(
            lake,
            audit,
            run,
            task_name,
            algorithms.SEQUENCE_TRANSFORMER,
            params,
            ["token_ids", "ages"],
            data,
            metrics,
            evaluate.risk_bands(test),
            test,
        )
        test.unpersist()
    return mv


def external_predictions(lake, scratch, mv: registry.ModelVersion):
    """``mv``'s scores of every labelled index of its task in ``scratch`` (a new hospital's lake:
    ``models.external``), each read from the sequence before it built from the scratch lake's silver
    with the vocabulary ``mv`` was trained on, with the subgroup attributes of its features row."""
    t = feats.task(mv.task)
    length = mv.params["length"]
    vocab = lake.read(seqs.VOCABULARY, version=mv.training_data[seqs.VOCABULARY])
    labels = (
        scratch.read("gold.labels")
        .where((F.col("task") == mv.task) & F.col("label").isNotNull())
        .select("patient_key", "index_id", "index_time", F.col("label").cast("int").alias("label"))
    )
    built = seqs.build(scratch, labels, vocab, seqs.load_settings()).select(
        "patient_key", "index_id", "token_ids", "ages"
    )
    frame = labels.join(built, ["patient_key", "index_id"], "left").select(
        "index_id",
        "patient_key",
        F.lit("external").alias("split"),
        "label",
        tensors.packed_sequence(length)("token_ids", "ages").alias("x"),
    )
    scored = predict.sequence_scores(frame, mv.artifact_path(lake), length)
    attributes = scratch.read(t.feature_table).select(
        "patient_key", F.col("index_id").cast("string").alias("index_id"), *feats.pointintime.ATTRIBUTES
    )
    return scored.join(attributes, ["patient_key", "index_id"], "left")
