"""Population risk scoring: every eligible patient as of a date, with the task's production model.

Eligible is what the task's labels call an index: alive, born, and seen in the previous two years
(``features.labels.patient_index``); the features are computed as of the date by the same code
the model was trained with. Each score carries its risk band (cut points from the model's held-out
score distribution: top 10% high, next 20% medium), up to three readable reasons and the model id
and version. ``gold.risk_scores`` is updated by merge on (patient_key, task, as_of): scoring the
same date again replaces those rows (a patient no longer eligible loses theirs), never duplicates
them; a score that came out the same keeps the ``scored_at`` of when it was first computed.

A patient with an input far outside the model's training range is refused, not scored
(:mod:`ehrlake.models.scope`): named with the inputs in ``gold.scoring_refusals``, counted in the
run's output. Every run queues cases for clinician review by the rules of ``conf/review.yaml``
(:mod:`ehrlake.review`). A full scoring run with a Spark ML model also measures drift
(:mod:`ehrlake.scoring.drift`): the population stability index of each input and of the score
against the model's training snapshot, into ``gold.model_drift``; the run says which moved past 0.25.

``incremental``: a nightly re-scoring of the same date needs only the patients whose silver rows
changed since the last scoring with the same model (the Delta log since its watermark,
:mod:`ehrlake.lake.increments`): a patient's features as of a date depend on their own rows alone.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake import review
from ehrlake.errors import EhrlakeError
from ehrlake.features import definitions
from ehrlake.lake import increments, watermarks
from ehrlake.models import algorithms, evaluate, explain, registry, scope
from ehrlake.models.train import score_column
from ehrlake.scoring import drift

TABLE = "gold.risk_scores"
KEYS = ["patient_key", "task", "as_of"]
# the silver tables patient-level features are computed from (features.pointintime)


@dataclass(frozen=True)
class ScoringRun:
    task: str
    as_of: dt.date
    model: str
    scored: int
    bands: dict
    seconds: float
    how: str = "scored all"  # or what an incremental run merged
    drift: str = ""  # what the drift measurement found, or why there is none
    refused: int = 0  # patients with inputs outside the model's training range: not scored
    scope: str = ""  # what the check of the inputs found, or why there is none
    review: str = ""  # the cases put before a clinician

    def format(self) -> str:
        spread = ", ".join(f"{k} {v:,}" for k, v in sorted(self.bands.items()))
        return (
            f"scored {self.scored:,} patients for {self.task} as of {self.as_of} with {self.model} "
            f"in {self.seconds:.1f} s ({self.scored / max(self.seconds, 1e-9):,.0f} patients/s) -> {TABLE}"
            f"\n  risk bands: {spread or 'none'}; {self.how}"
            + (f"\n  inputs: {self.scope}" if self.scope else "")
            + (f"\n  review: {self.review}" if self.review else "")
            + (f"\n  drift: {self.drift}" if self.drift else "")
        )


def score(
    lake,
    task_name: str,
    as_of: dt.date,
    role: str | None = None,
    model_id: str | None = None,
    version: int | None = None,
    incremental: bool = False,
) -> ScoringRun:
    """Score ``task_name``'s eligible population as of ``as_of`` with its production model (or
    ``model_id`` at ``version``); ``incremental``: only the patients whose source rows changed
    since the last scoring of that date with the same model, everyone where that cannot be told."""
    t = feats.task(task_name)
    mv = registry.get(lake, model_id, version) if model_id else registry.production(lake, task_name)
    if mv.task != task_name:
        raise EhrlakeError(f"{mv.label} is a model of {mv.task}, not {task_name}")
    started = dt.datetime.now(dt.UTC)
    job = f"score {task_name} {as_of.isoformat()}"
    tables = list(feats.SOURCES) if t.level == "patient" else [t.feature_table]
    sources = {table: lake.version(table) for table in tables if lake.exists(table)}
    fp = watermarks.fingerprint(mv.model_id, mv.version, definitions.load(), watermarks.code(feats, explain))
    patients = None
    if incremental and lake.exists(TABLE):
        patients = increments.changed_patients(lake, watermarks.read(lake, job).get(TABLE), sources, fp)
    if patients is not None:
        patients = patients.persist()
        if increments.too_many(lake, patients, tables[0]):
            patients.unpersist()
            patients = None
    try:
        return _score(lake, t, mv, as_of, role, started, job, sources, fp, patients)
    finally:
        if patients is not None:
            patients.unpersist()


def review_selections(lake, mv, scored, inputs: list[str], rules) -> list:
    """The review cases of the rules that need the scored population (``conf/review.yaml``): the
    patients the task's challenger calls differently, and the near misses of subgroups where the
    model ranks worse than overall."""
    extra = []
    rival = review.challenger(lake, mv) if rules.challenger else None
    if rival is not None:  # scored on the same cached inputs, its band by its own cut points

        def high(frame, score, model):
            called = evaluate.risk_band(score, model.bands) == "high"
            return frame.select("patient_key", called.alias("high"))

        theirs = rival.load(lake).transform(scored.select(*inputs))
        ours_high = high(scored, F.col("score"), mv)
        theirs_high = high(theirs, score_column(rival.params.get("pos_weight", 1.0)), rival)
        extra.append(review.disagreements(ours_high, theirs_high, rival.label))
    weak = review.weak_subgroups(lake, mv, rules.subgroup_gap)
    return extra + review.weak_subgroup_cases(scored, weak, rules.subgroup_share, mv.bands.get("high"))


def _score(lake, t, mv, as_of, role, started, job, sources, fp, patients) -> ScoringRun:
    """Score the population (only ``patients`` where given) and bring the task's rows of the date
    in ``gold.risk_scores`` up to date in one commit, then record the watermark."""
    task_name = t.name
    if t.level != "patient" and mv.algorithm != "ann":
        raise EhrlakeError(
            f"task {task_name} is predicted per {t.level} row, not per patient as of a date; "
            "population scoring covers the patient-level tasks ("
            + ", ".join(n for n, x in feats.TASKS.items() if x.level == "patient")
            + "); evaluate per-stay models with ehrlake evaluate"
        )
    rules = review.rules()
    accepts = mv.params.get("accepts")  # absent in models trained before ranges were recorded
    extra = []  # review cases only a Spark ML model's scoring can select: a challenger, weak subgroups
    if mv.algorithm == "ann":  # TensorFlow: scored on the executors in the deep-learning runtime
        from ehrlake.dl.predict import ann_scores

        scored, reasons = ann_scores(lake, mv, as_of, patients)
    elif mv.algorithm == algorithms.SEQUENCE_TRANSFORMER:  # the events before the date, as in training
        from ehrlake.dl.decision import population_scores

        scored, reasons = population_scores(lake, mv, as_of, patients)
    else:
        model = mv.load(lake)
        explain.prepare(mv.algorithm, model)
        importance = explain.importance(mv.algorithm, model, mv.features)
        population = feats.patient_features(lake, [as_of], patients=patients)
        population = population.withColumn(scope.OUTSIDE, scope.outside(accepts or {}))
        scored = model.transform(population).withColumn(
            "score", score_column(mv.params.get("pos_weight", 1.0))
        )
        reasons = explain.reasons(mv.algorithm, model, scored, mv.features, feats.descriptions(t), importance)
        scored = scored.persist()  # read for the scores, the refusals and the drift: computed once
        extra = review_selections(lake, mv, scored, population.columns, rules)
    if patients is not None:
        drift_of = "measured by full scorings only (gold.model_drift keeps the last)"
    elif mv.algorithm in (algorithms.SEQUENCE_TRANSFORMER, "ann"):
        drift_of = f"not measured for {mv.algorithm} models"
    else:
        drift_of = None  # measured below, in the job
    scored_at = started.replace(tzinfo=None)
    out = scored.select(
        "patient_key",
        F.lit(task_name).alias("task"),
        F.lit(as_of).cast("date").alias("as_of"),
        F.col("score").cast("double").alias("score"),
        evaluate.risk_band(F.col("score"), mv.bands).alias("risk_band"),
        reasons.alias("top_reasons"),
        F.lit(mv.model_id).alias("model_id"),
        F.lit(mv.version).alias("model_version"),
        F.lit(scored_at).cast("timestamp").alias("scored_at"),
        *([scope.OUTSIDE] if scope.OUTSIDE in scored.columns else []),
    )
    refusals = None
    if scope.OUTSIDE in out.columns:  # a patient outside the training range is refused, not scored
        refusals = out.where(F.size(scope.OUTSIDE) > 0).select(
            *KEYS, F.col(scope.OUTSIDE).alias("inputs"), "model_id", "model_version",
            F.col("scored_at").alias("refused_at"),
        )  # fmt: skip
        out = out.where(F.size(scope.OUTSIDE) == 0).drop(scope.OUTSIDE)
    run_id = started.strftime("%Y%m%dT%H%M%S")
    commit = {"ehrlakeJob": "score", "ehrlakeRunId": run_id}
    try:
        with lake.security.job("score", ["gold"], role, run_id) as (_, audit):
            lake.create(TABLE, out.schema)
            slice_ = (F.col("task") == task_name) & (F.col("as_of") == F.lit(as_of))
            found = increments.replace_patients(
                lake, out, TABLE, KEYS, patients, commit, where=slice_, ignore=("scored_at",)
            )
            if refusals is not None:
                lake.create(scope.TABLE, refusals.schema)
                increments.replace_patients(
                    lake, refusals, scope.TABLE, KEYS, patients, commit, where=slice_, ignore=("refused_at",)
                )
                refused, checked = scope.summary(lake.read(scope.TABLE).where(slice_))
                if not accepts:
                    checked = f"not checked: {mv.label} was trained before input ranges were recorded"
                audit.append((scope.TABLE, f"{task_name} as of {as_of}: {refused} patients refused"))
            else:
                # a sequence model reads events, not values with a range
                refused, checked = 0, f"not checked for {mv.algorithm} models"
            counts = (
                lake.read(TABLE).where(slice_).groupBy("risk_band").count().collect()  # one row per band
            )
            bands = {r.risk_band or "none": int(r["count"]) for r in counts}
            total = sum(bands.values())
            queued, selected = review.enqueue(lake, task_name, as_of, mv.bands, commit, rules, extra, total)
            audit.append((review.QUEUE, f"{task_name} as of {as_of}: {queued} new cases"))
            if drift_of is None:  # today's population against the training snapshot's bins

                def snapshot():  # scored by the same model; only where the version's bins are not kept
                    then = drift.sample(
                        feats.training_frame(lake, t, mv.training_data),
                        feats.training_rows(lake, t, mv.training_data),
                        feats.INDEX,
                    )
                    then = model.transform(then)
                    return then.withColumn("score", score_column(mv.params.get("pos_weight", 1.0)))

                shifted = drift.record(lake, task_name, as_of, mv, snapshot, scored, commit)
                drift_of = (
                    f"PSI of the score and {len(mv.features)} inputs against the training snapshot -> "
                    f"{drift.TABLE}: "
                    + (f"shifted (> {drift.SHIFTED}): {', '.join(shifted)}" if shifted else "none shifted")
                )
            watermarks.record(lake, [watermarks.Watermark(job, TABLE, sources, fp, run_id)], commit)
            audit.append((TABLE, f"{task_name} as of {as_of}: {total} patients scored with {mv.label}"))
    finally:
        scored.unpersist()  # a no-op where it was not persisted
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    how = increments.describe(found) + (" (changed patients only)" if patients is not None else "")
    cap = rules.max_cases
    capped = f" (the {selected - cap:,} lowest left out: max_cases)" if selected > cap else ""
    queue = f"{selected:,} patients meet the review rules{capped}; {queued:,} new cases -> {review.QUEUE}"
    return ScoringRun(
        task_name, as_of, mv.label, total, bands, seconds, how, drift_of, refused, checked, queue
    )
