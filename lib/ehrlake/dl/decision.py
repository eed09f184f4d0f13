"""Decision support a clinician can follow: one patient's risk from a sequence model, the events
that raised or lowered it, and what happened to the patients most like them (issue 19;
``ehrlake explain``; docs/self_supervised.md).

- **The record** is built as of the date from silver with the vocabulary the model was trained on
  (``features.sequences.build``: only events strictly before the date), packed as in training.
- **Why**: integrated gradients (:mod:`ehrlake.dl.attribution`), summed per event kind and code
  (an outpatient visit seen twelve times is one line with its count and the latest time).
- **Similar patients**: the training patients (the task's tensors at the model's version, test
  patients excluded) whose patient embedding (the fine-tuned encoder's mean vector) has cosine
  similarity of at least ``explain.min_similarity`` with this patient's; of those, the
  ``explain.neighbours`` most similar, one index per patient. Their outcome rate is shown only when
  at least ``security.small_cell_k`` (11) of them exist: below that the rate would be a few
  people's outcomes, and a clinician would read noise as evidence.

One row per patient, task, date and model in ``gold.decision_support`` (merged: explaining again
replaces it). The job runs under a role that may write that table (the clinician's, by the access
policy), and the audit log records which patient was explained, by whom, with which model.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.dl import attribution, finetune, predict, runtime, tensors
from ehrlake.errors import EhrlakeError
from ehrlake.features import sequences as seqs
from ehrlake.models import algorithms, evaluate, registry
from ehrlake.security.audit import Event

TABLE = "gold.decision_support"
KEYS = ["patient_key", "task", "as_of", "model_id"]
EVENT = T.StructType(
    [
        T.StructField("token", T.StringType()),
        T.StructField("description", T.StringType()),
        T.StructField("times", T.IntegerType()),
        T.StructField("last_days_before", T.IntegerType()),
        T.StructField("log_odds", T.DoubleType()),
    ]
)
SCHEMA = T.StructType(
    [
        T.StructField("patient_key", T.StringType()),
        T.StructField("task", T.StringType()),
        T.StructField("as_of", T.DateType()),
        T.StructField("score", T.DoubleType()),
        T.StructField("risk_band", T.StringType()),
        T.StructField("model_id", T.StringType()),
        T.StructField("model_version", T.IntegerType()),
        T.StructField("method", T.StringType()),
        T.StructField("baseline_score", T.DoubleType()),
        T.StructField("attribution_gap", T.DoubleType()),
        T.StructField("raised", T.ArrayType(EVENT)),
        T.StructField("lowered", T.ArrayType(EVENT)),
        T.StructField("events_read", T.IntegerType()),
        T.StructField("similar_patients", T.IntegerType()),
        T.StructField("similar_outcome_rate", T.DoubleType()),
        T.StructField("min_similarity", T.DoubleType()),
        T.StructField("explained_at", T.TimestampType()),
    ]
)


@dataclass(frozen=True)
class Decision:
    row: dict  # one row of SCHEMA
    model: str
    k: int

    def format(self) -> str:
        r = self.row
        band = f" ({r['risk_band']} band)" if r["risk_band"] else ""
        lines = [
            f"patient {r['patient_key']}, {r['task']} as of {r['as_of']}: risk {r['score']:.3f}{band} "
            f"from {self.model}",
            f"  why ({r['method']}; {r['events_read']} events read, attributions within "
            f"{r['attribution_gap']:.4f} of the log-odds difference from the baseline's "
            f"{r['baseline_score']:.3f}):",
        ]
        for title, events in (("raised by", r["raised"]), ("lowered by", r["lowered"])):
            lines.append(f"  {title}:" + ("" if events else " nothing"))
            for e in events:
                when = (
                    f"last {e['last_days_before']} days before" if e["last_days_before"] is not None else ""
                )
                times = f" x{e['times']}" if e["times"] > 1 else ""
                lines.append(f"    {e['log_odds']:+.3f}  {e['description']}{times} ({when})")
        if r["similar_outcome_rate"] is None:
            lines.append(
                f"  similar patients: fewer than {self.k} training patients with embedding similarity "
                f">= {r['min_similarity']}: outcome rate not shown"
            )
        else:
            lines.append(
                f"  similar patients: {r['similar_outcome_rate']:.1%} had the outcome among the "
                f"{r['similar_patients']} most similar training patients "
                f"(similarity >= {r['min_similarity']})"
            )
        lines.append(f"  -> {TABLE}")
        return "\n".join(lines)


def sequence_model(lake, task: str, model_id: str | None = None, version: int | None = None):
    """``model_id`` (at ``version``), else the task's production model when it reads sequences,
    else the latest ``<task>.sequence``."""
    if model_id:
        mv = registry.get(lake, model_id, version)
    else:
        production = [m for m in registry.versions(lake, task) if m.status == "production"]
        if production and production[-1].algorithm == algorithms.SEQUENCE_TRANSFORMER:
            mv = production[-1]
        else:
            mv = registry.get(lake, f"{task}.sequence")
    if mv.algorithm != algorithms.SEQUENCE_TRANSFORMER:
        raise EhrlakeError(
            f"{mv.label} is a {mv.algorithm} model; ehrlake explain explains the sequence models "
            f"(train one: ehrlake train --task {task} --algorithms sequence)"
        )
    if mv.task != task:
        raise EhrlakeError(f"{mv.label} is a model of {mv.task}, not {task}")
    return mv


def token_descriptions(lake, vocab, patients=None, ids=None) -> dict[int, tuple[str, str]]:
    """Token id -> (token, what a clinician reads): a code's name as the records (of ``patients``,
    a frame of ``patient_key``, where given) call it, a lab bin with its bin. Only ``ids`` where
    given; else the whole vocabulary (bounded: a token needs ``min_patients`` patients)."""
    if ids is not None:
        vocab = vocab.where(F.col("id").isin(sorted(set(ids))))
    if patients is None:
        patients = lake.read("silver.patient").select("patient_key")
    names = {(r.kind, r.text): r.display for r in seqs.displays(lake, patients).collect()}
    return {
        r.id: (r.token, _describe(r.token, r.kind, names))
        for r in vocab.select("id", "token", "kind").collect()
    }


def patient_record(lake, mv, patient_key: str, as_of: dt.date) -> dict:
    """The patient's sequence as of the date in the model's vocabulary: ``x`` (packed as in
    training), the kept tokens' ids, texts, descriptions and days before the date."""
    vocab = lake.read(seqs.VOCABULARY, version=mv.training_data[seqs.VOCABULARY])
    index = lake.spark.createDataFrame(
        [(patient_key, f"as_of:{as_of}", dt.datetime.combine(as_of, dt.time()))],
        "patient_key string, index_id string, index_time timestamp",
    )
    length = mv.params["length"]
    seq = seqs.build(lake, index, vocab, seqs.load_settings())
    row = seq.select(
        "token_ids", "days_before_index", tensors.packed_sequence(length)("token_ids", "ages").alias("x")
    ).first()
    if row is None:
        raise EhrlakeError(
            f"patient {patient_key} has no events before {as_of} in silver (or no such patient): "
            "nothing to explain"
        )
    ids, days = row.token_ids[-length:], row.days_before_index[-length:]
    texts = token_descriptions(lake, vocab, index.select("patient_key"), ids)
    return {"x": np.frombuffer(row.x, "<f4").reshape(1, 2, length), "ids": ids, "days": days, "texts": texts}


def _describe(token: str, kind: str, names: dict) -> str:
    """``condition:SNOMED:44054006`` -> its name in the record; a lab bin says which bin."""
    base, _, rest = token.partition(":")
    text, bin_ = rest, None
    if base == "lab" and rest.rsplit(":", 1)[-1][:1] == "q" and rest.rsplit(":", 1)[-1][1:].isdigit():
        text, bin_ = rest.rsplit(":", 1)
    name = names.get((base, text)) or token
    if token.endswith(":?"):
        name = f"a rare {kind} (not in the vocabulary)"
    elif base == "encounter":
        name = f"{text} encounter"
    return f"{name} (value bin {bin_[1:]} of the lab's quantiles)" if bin_ else name


def population_scores(lake, mv, as_of: dt.date, patients=None, cfg: runtime.Config | None = None):
    """(every eligible patient's ``patient_key`` and ``score`` as of the date, their
    ``top_reasons``): the population of the tabular models' scoring (the patient tasks' index
    without exclusions; only ``patients`` where given), each with the sequence of events before the
    date in the model's vocabulary (none: an empty sequence, scored all the same), and the three
    events that raised the risk most by integrated gradients, for ``scoring.score`` to write."""
    from ehrlake.features import definitions, labels

    settings = (cfg or runtime.load()).explain
    index = (
        labels.patient_index(lake, [as_of], definitions.load(), patients)
        .where(F.col("_base_excluded").isNull())
        .select("patient_key", "index_id", "index_time")
    )
    vocab = lake.read(seqs.VOCABULARY, version=mv.training_data[seqs.VOCABULARY])
    built = seqs.build(lake, index, vocab, seqs.load_settings()).select(
        "patient_key", "index_id", "token_ids", "ages"
    )
    length, path, steps = mv.params["length"], mv.artifact_path(lake), settings.steps
    rows = index.join(built, ["patient_key", "index_id"], "left").select(
        "patient_key", tensors.packed_sequence(length)("token_ids", "ages").alias("x")
    )
    described = {i: d for i, (_, d) in token_descriptions(lake, vocab).items()}

    def score(partition):
        model = None
        for batch in predict.batched(partition, 64):
            model = model or predict.load_model(path)
            x = np.stack([np.frombuffer(r["x"], "<f4").reshape(2, length) for r in batch])
            a = attribution.integrated_gradients(model, x, steps)
            for i, r in enumerate(batch):
                top = [(t, v) for t, v in per_token(x[i, 0].astype(int), a.events[i]) if v > 0][:3]
                reasons = [f"{described.get(t, str(t))} ({v:+.2f})" for t, v in top]
                yield (r["patient_key"], float(1 / (1 + np.exp(-a.logit[i]))), reasons)

    scored = lake.spark.createDataFrame(
        rows.rdd.mapPartitions(score), "patient_key string, score double, top_reasons array<string>"
    )
    return scored, F.col("top_reasons")


def per_token(token_ids, attributions) -> list[tuple[int, float]]:
    """Attributions summed per token (an outpatient visit twelve times is one reason), padding (id
    0) left out, from the most raising down (ties by token id): the one ranking that population
    scoring's reasons and an explanation's events share, so the two agree for a patient."""
    per: dict[int, float] = {}
    for token_id, value in zip(token_ids, attributions, strict=True):
        if token_id:
            per[int(token_id)] = per.get(int(token_id), 0.0) + float(value)
    return sorted(per.items(), key=lambda tv: (-tv[1], tv[0]))


def _events(record: dict, events: np.ndarray, n: int) -> tuple[list[dict], list[dict]]:
    """The ``n`` tokens that raised the risk most and lowered it most, each with how many times it
    happened and how long before the date it last did."""
    times: dict[int, int] = {}
    last: dict[int, int] = {}
    for token_id, days in zip(record["ids"], record["days"], strict=True):
        times[token_id] = times.get(token_id, 0) + 1
        if days is not None and (token_id not in last or days < last[token_id]):
            last[token_id] = int(days)
    ranked = [
        {
            "token": record["texts"][t][0],
            "description": record["texts"][t][1],
            "times": times[t],
            "last_days_before": last.get(t),
            "log_odds": v,
        }
        for t, v in per_token(record["ids"], events)
    ]
    raised = [e for e in ranked if e["log_odds"] > 0][:n]
    lowered = [e for e in reversed(ranked) if e["log_odds"] < 0][:n]
    return raised, lowered


def _embedding_model(model):
    return runtime.keras().Model(model.inputs, model.get_layer("patient_embedding").output)


def similar_patients(lake, mv, patient_key: str, x: np.ndarray, cfg: runtime.ExplainSettings):
    """(how many training patients are similar enough, capped at ``neighbours``; their outcome
    rate). Embeddings are computed on the executors; one aggregate row reaches the driver."""
    path, length = mv.artifact_path(lake), mv.params["length"]
    query = _embedding_model(predict.load_model(path))(x, training=False).numpy()[0]
    query = query / max(float(np.linalg.norm(query)), 1e-12)
    reference = (
        lake.read(finetune.table(mv.task), version=mv.training_data[finetune.table(mv.task)])
        .where((F.col("split") != "test") & (F.col("patient_key") != patient_key))
        .select("patient_key", "label", "x")
    )

    def similarity(rows):
        embed = None
        for batch in predict.batched(rows):
            embed = embed or _embedding_model(predict.load_model(path))
            xs = np.stack([np.frombuffer(r["x"], "<f4").reshape(2, length) for r in batch])
            v = embed(xs, training=False).numpy()
            cos = v @ query / np.maximum(np.linalg.norm(v, axis=1), 1e-12)
            for r, c in zip(batch, cos, strict=True):
                yield (r["patient_key"], r["label"], float(c))

    sims = lake.spark.createDataFrame(
        reference.rdd.mapPartitions(similarity), "patient_key string, label int, similarity double"
    )
    closest = (
        sims.where(F.col("similarity") >= cfg.min_similarity)
        .groupBy("patient_key")
        .agg(F.max_by("label", "similarity").alias("label"), F.max("similarity").alias("similarity"))
        .orderBy(F.desc("similarity"), "patient_key")
        .limit(cfg.neighbours)
    )
    n, rate = closest.agg(F.count("*"), F.avg("label")).first()
    return int(n), (float(rate) if rate is not None else None)


def explain(
    lake,
    patient_key: str,
    task: str,
    as_of: dt.date,
    role: str | None = None,
    model_id: str | None = None,
    version: int | None = None,
    cfg: runtime.Config | None = None,
) -> Decision:
    """Explain ``task``'s risk for one patient as of a date with a sequence model and merge the
    row into ``gold.decision_support``."""
    settings = (cfg or runtime.load()).explain
    with lake.security.job("explain", [TABLE], role) as (used, audit):
        mv = sequence_model(lake, task, model_id, version)
        record = patient_record(lake, mv, patient_key, as_of)
        model = predict.load_model(mv.artifact_path(lake))
        a = attribution.integrated_gradients(model, record["x"], settings.steps)
        kept = len(record["ids"])
        raised, lowered = _events(record, a.events[0, :kept], settings.events)
        n, rate = similar_patients(lake, mv, patient_key, record["x"], settings)
        k = lake.security.small_cell_k
        shown = n >= k
        score = float(1 / (1 + np.exp(-a.logit[0])))
        row = {
            "patient_key": patient_key,
            "task": task,
            "as_of": as_of,
            "score": score,
            "risk_band": evaluate.band_of(score, mv.bands),
            "model_id": mv.model_id,
            "model_version": mv.version,
            "method": attribution.METHOD.format(steps=settings.steps),
            "baseline_score": float(1 / (1 + np.exp(-a.baseline_logit[0]))),
            "attribution_gap": float(a.gap[0]),
            "raised": raised,
            "lowered": lowered,
            "events_read": kept,
            "similar_patients": n if shown else None,
            "similar_outcome_rate": rate if shown else None,
            "min_similarity": settings.min_similarity,
            "explained_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
        }
        lake.create(TABLE, SCHEMA)
        out = lake.spark.createDataFrame([row], SCHEMA)
        lake.merge(out, TABLE, KEYS, commit_info={"ehrlakeJob": "explain"})
        lake.security.audit.record(
            Event(
                "explain",
                role=used,
                job="explain",
                table_name=TABLE,
                patient_key=patient_key,
                detail=f"{task} as of {as_of} with {mv.label}: risk {score:.3f}",
            )
        )
        audit.append((TABLE, f"{task} as of {as_of} for one patient with {mv.label}"))
    return Decision(row, mv.label, k)
