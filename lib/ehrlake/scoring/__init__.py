"""Population risk scoring: every eligible patient as of a date, with the task's production model.

Eligible is what the task's labels call an index: alive, born, and seen in the previous two years
(``features.labels.patient_index``); the features are computed as of the date by the same code
the model was trained with. Each score carries its risk band (cut points from the model's held-out
score distribution: top 10% high, next 20% medium), up to three readable reasons and the model id
and version. ``gold.risk_scores`` is updated by merge on (patient_key, task, as_of): scoring the
same date again replaces those rows, never duplicates them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake.errors import EhrlakeError
from ehrlake.models import explain, registry
from ehrlake.models.train import score_column

TABLE = "gold.risk_scores"
KEYS = ["patient_key", "task", "as_of"]


@dataclass(frozen=True)
class ScoringRun:
    task: str
    as_of: dt.date
    model: str
    scored: int
    bands: dict
    seconds: float

    def format(self) -> str:
        spread = ", ".join(f"{k} {v:,}" for k, v in sorted(self.bands.items()))
        return (
            f"scored {self.scored:,} patients for {self.task} as of {self.as_of} with {self.model} "
            f"in {self.seconds:.1f} s ({self.scored / max(self.seconds, 1e-9):,.0f} patients/s) -> {TABLE}"
            f"\n  risk bands: {spread or 'none'}"
        )


def band(score: F.Column, cuts: dict) -> F.Column:
    if not cuts:
        return F.lit(None).cast("string")
    return F.when(score >= cuts["high"], "high").when(score >= cuts["medium"], "medium").otherwise("low")


def score(
    lake,
    task_name: str,
    as_of: dt.date,
    role: str | None = None,
    model_id: str | None = None,
    version: int | None = None,
) -> ScoringRun:
    t = feats.task(task_name)
    mv = registry.get(lake, model_id, version) if model_id else registry.production(lake, task_name)
    if mv.task != task_name:
        raise EhrlakeError(f"{mv.label} is a model of {mv.task}, not {task_name}")
    started = dt.datetime.now(dt.UTC)
    if mv.algorithm == "ann":  # TensorFlow: scored on the executors in the deep-learning runtime
        from ehrlake.dl.predict import ann_scores

        scored, reasons = ann_scores(lake, mv, as_of)
    else:
        if t.level != "patient":
            raise EhrlakeError(
                f"task {task_name} is predicted per {t.level} row, not per patient as of a date; "
                "population scoring covers the patient-level tasks ("
                + ", ".join(n for n, x in feats.TASKS.items() if x.level == "patient")
                + "); evaluate per-stay models with ehrlake evaluate"
            )
        model = mv.load(lake)
        explain.prepare(mv.algorithm, model)
        importance = explain.importance(mv.algorithm, model, mv.features)
        population = feats.patient_features(lake, [as_of])
        scored = model.transform(population).withColumn(
            "score", score_column(mv.params.get("pos_weight", 1.0))
        )
        reasons = explain.reasons(mv.algorithm, model, scored, mv.features, feats.descriptions(t), importance)
    scored_at = started.replace(tzinfo=None)
    out = scored.select(
        "patient_key",
        F.lit(task_name).alias("task"),
        F.lit(as_of).cast("date").alias("as_of"),
        F.col("score").cast("double").alias("score"),
        band(F.col("score"), mv.bands).alias("risk_band"),
        reasons.alias("top_reasons"),
        F.lit(mv.model_id).alias("model_id"),
        F.lit(mv.version).alias("model_version"),
        F.lit(scored_at).cast("timestamp").alias("scored_at"),
    )
    with lake.security.job("score", ["gold"], role) as (_, audit):
        lake.merge(out, TABLE, keys=KEYS, commit_info={"ehrlakeJob": "score"})
        counts = (
            lake.read(TABLE)
            .where((F.col("task") == task_name) & (F.col("as_of") == F.lit(as_of)))
            .groupBy("risk_band")
            .count()
            .collect()  # one row per band
        )
        bands = {r.risk_band or "none": int(r["count"]) for r in counts}
        total = sum(bands.values())
        audit.append((TABLE, f"{task_name} as of {as_of}: {total} patients scored with {mv.label}"))
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return ScoringRun(task_name, as_of, mv.label, total, bands, seconds)
