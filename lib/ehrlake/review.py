"""Clinician review: the cases a scoring run puts before a clinician, their decisions, and the
labels those decisions give back to training.

Scoring queues cases by the rules of ``conf/review.yaml`` (:class:`Rules`): every patient in the
top risk band, and a share of the population ranked just below the high band's cut point (the calls
the model is least sure of, at the line that triggers action); every patient whom the task's
challenger (a nominated or candidate version) puts on the other side of its own cut; and, in each
subgroup where the model's test AUROC is ``subgroup_gap`` below its overall figure, a share of the
subgroup's patients ranked just below the cut. At most ``max_cases`` per task and date, the highest
scores first, so a day's review is a workload a team can do; a patient several rules select is one
case, under the first. A case is keyed by what it is
about (task, date, patient, model and version): re-scoring adds no duplicate.

``ehrlake review list | show | decide`` (role ``clinician``): ``show --purpose`` opens the
patient's identity (a reveal: one patient, audited); ``decide --accept`` agrees with the model's
call (high band: at risk; below it: not), ``--override LABEL`` gives the clinician's own, always with
a reason. Decisions go to ``gold.review_decisions`` and the audit log; an analyst cannot decide.
``train --with-feedback`` uses the latest reviewed label of each (patient, date) in place of the
computed one, on training rows only (the test split keeps the outcome), weighted
``feedback_weight``. The report shows how often clinicians overrode each model, by band.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.config import build, read_yaml
from ehrlake.errors import EhrlakeError
from ehrlake.home import CONF
from ehrlake.lake.modes import WriteMode
from ehrlake.security.grants import current_user

QUEUE, DECISIONS = "gold.review_queue", "gold.review_decisions"
SCORES = "gold.risk_scores"
RULES_FILE = CONF / "review.yaml"
TOP, NEAR = "top risk band", "near the high band's cut point"
QUEUE_SCHEMA = T.StructType(
    [
        T.StructField("case_id", T.StringType(), False),
        T.StructField("task", T.StringType(), False),
        T.StructField("as_of", T.DateType(), False),
        T.StructField("patient_key", T.StringType(), False),
        T.StructField("score", T.DoubleType()),
        T.StructField("risk_band", T.StringType()),
        T.StructField("rule", T.StringType()),
        T.StructField("top_reasons", T.ArrayType(T.StringType())),
        T.StructField("model_id", T.StringType()),
        T.StructField("model_version", T.IntegerType()),
        T.StructField("status", T.StringType()),  # open | decided
        T.StructField("queued_at", T.TimestampType()),
    ]
)
DECISION_SCHEMA = T.StructType(
    [
        T.StructField("case_id", T.StringType(), False),
        T.StructField("task", T.StringType(), False),
        T.StructField("as_of", T.DateType(), False),
        T.StructField("patient_key", T.StringType(), False),
        T.StructField("model_id", T.StringType()),
        T.StructField("model_version", T.IntegerType()),
        T.StructField("risk_band", T.StringType()),
        T.StructField("decision", T.StringType()),  # accept | override
        T.StructField("label", T.IntegerType()),  # the reviewed label: 1 at risk, 0 not
        T.StructField("reason", T.StringType()),
        T.StructField("role", T.StringType()),
        T.StructField("os_user", T.StringType()),
        T.StructField("decided_at", T.TimestampType()),
    ]
)


@dataclass(frozen=True)
class Rules:
    top_band: bool = True  # queue every patient in the high band
    near_cut_share: float = 0.02  # queue this share of the scored patients, those just below the cut
    max_cases: int = 200  # per task and date, the highest scores first
    feedback_weight: float = 2.0  # a reviewed label's weight in train --with-feedback (others: 1)
    challenger: bool = True  # patients the production model and the task's challenger call differently
    subgroup_gap: float = 0.10  # subgroups whose test AUROC is this far below the model's overall...
    subgroup_share: float = 0.05  # ...: this share of their scored patients, the highest below the cut


def rules(path: str | Path | None = None) -> Rules:
    path = Path(path or RULES_FILE)
    found = build(Rules, read_yaml(path), f"review rules {path}")
    if not 0 <= found.near_cut_share <= 1 or found.max_cases < 0 or found.feedback_weight <= 0:
        raise EhrlakeError(f"{path}: near_cut_share must be in [0, 1], max_cases >= 0, feedback_weight > 0")
    if not 0 <= found.subgroup_share <= 1 or found.subgroup_gap <= 0:
        raise EhrlakeError(f"{path}: subgroup_share must be in [0, 1] and subgroup_gap > 0")
    return found


def case_id() -> F.Column:
    keys = ("task", F.date_format("as_of", "yyyy-MM-dd"), "patient_key", "model_id", "model_version")
    return F.sha2(F.concat_ws("|", *[F.col(k) if isinstance(k, str) else k for k in keys]), 256)


def enqueue(
    lake,
    task: str,
    as_of: dt.date,
    cuts: dict,
    commit: dict,
    found: Rules | None = None,
    extra: list[DataFrame] = (),
    scored: int | None = None,
) -> tuple[int, int]:
    """Queue the task's scores of the date that the rules select (inside the scoring job); returns
    (cases new to the queue, cases the rules selected before the cap). ``extra``: frames of
    ``(patient_key, rule)`` that scoring selected (:func:`disagreements`, :func:`weak_subgroup_cases`);
    a patient selected by several rules is one case, under the first rule. ``scored``: the task's
    scores of the date, where the caller counted them (else counted here)."""
    found = found or rules()
    scores = lake.read(SCORES).where((F.col("task") == task) & (F.col("as_of") == F.lit(as_of)))
    parts = []
    if found.top_band:
        parts.append(scores.where(F.col("risk_band") == "high").withColumn("rule", F.lit(TOP)))
    if "high" in cuts and found.near_cut_share > 0:  # the highest scores below the line, ranked
        near = math.ceil(found.near_cut_share * (scored if scored is not None else scores.count()))
        below = (
            scores.where(F.col("score") < cuts["high"]).orderBy(F.desc("score"), "patient_key").limit(near)
        )
        parts.append(below.withColumn("rule", F.lit(NEAR)))
    parts += [scores.join(e.select("patient_key", "rule"), "patient_key") for e in extra]
    if not parts:
        return 0, 0
    ranked = [p.withColumn("_rule_order", F.lit(i)) for i, p in enumerate(parts)]
    first = Window.partitionBy("patient_key").orderBy("_rule_order")
    selected = (
        functools.reduce(DataFrame.unionByName, ranked)
        .withColumn("_n", F.row_number().over(first))
        .where("_n = 1")
        .drop("_n", "_rule_order")
    ).persist()  # counted, then capped: the union and its window computed once
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    new = None
    try:
        total = selected.count()
        chosen = selected.orderBy(F.desc("score"), "patient_key").limit(found.max_cases)
        cases = chosen.select(
            case_id().alias("case_id"), "task", "as_of", "patient_key", "score", "risk_band", "rule",
            "top_reasons", "model_id", "model_version", F.lit("open").alias("status"),
            F.lit(now).cast("timestamp").alias("queued_at"),
        )  # fmt: skip
        lake.create(QUEUE, QUEUE_SCHEMA, description="cases scoring put before a clinician")
        new = cases.join(lake.read(QUEUE).select("case_id"), "case_id", "left_anti").persist()
        added = new.count()
        if added:
            lake.write(new, QUEUE, mode=WriteMode.APPEND, commit_info=commit)
    finally:
        selected.unpersist()
        if new is not None:
            new.unpersist()
    return added, total


def challenger(lake, mv):
    """The task's challenger of production model ``mv``: its newest version that is nominated, else
    a candidate, of a Spark ML learner (scored beside the production model); None where none."""
    from ehrlake.models import algorithms, registry

    others = [
        m for m in registry.versions(lake, mv.task)
        if m.status in (registry.NOMINATED, registry.CANDIDATE)
        and (m.model_id, m.version) != (mv.model_id, mv.version)
        and m.algorithm not in ("ann", algorithms.SEQUENCE_TRANSFORMER)
    ]  # fmt: skip
    others.sort(key=lambda m: (m.status == registry.NOMINATED, m.created_at), reverse=True)
    return others[0] if others else None


def disagreements(ours: DataFrame, theirs: DataFrame, label: str) -> DataFrame:
    """``(patient_key, rule)`` of the patients a challenger (``label``) puts on the other side of
    its high band's cut from the production model; ``ours`` and ``theirs``: patient_key, high."""
    rule = f"production and challenger disagree ({label})"
    return (
        ours.join(theirs.withColumnRenamed("high", "theirs"), "patient_key")
        .where(F.col("high") != F.col("theirs"))
        .select("patient_key", F.lit(rule).alias("rule"))
    )


def weak_subgroups(lake, mv, gap: float) -> list[tuple[str, str, float]]:
    """``(kind, value, AUROC gap)`` of the subgroups where ``mv``'s test AUROC is ``gap`` or more
    below its overall figure (``gold.model_metrics``)."""
    from ehrlake.models import versions

    if not lake.exists("gold.model_metrics"):
        return []
    rows = (
        lake.read("gold.model_metrics")
        .where(
            (F.col("evaluation") == versions.evaluation_name(mv.model_id, mv.version))
            & (F.col("metric") == "auroc") & (F.col("kind") != "overall") & (F.col("gap") <= -gap)
        )
        .orderBy("gap", "kind", "subgroup")
        .collect()  # one row per subgroup value at most
    )  # fmt: skip
    return [(r.kind, r.subgroup, float(r.gap)) for r in rows]


def weak_subgroup_cases(scored: DataFrame, weak: list, share: float, cut: float | None) -> list[DataFrame]:
    """Per weak subgroup, ``(patient_key, rule)`` of ``share`` of its scored patients: the highest
    scores below the high band's cut (the top band is queued anyway), where the model is known to
    rank worse."""
    if cut is None or share <= 0:
        return []
    found = []
    for kind, value, gap in weak:
        if kind not in scored.columns:
            continue
        members = scored.where(F.col(kind).cast("string") == value)
        n = math.ceil(share * members.count())
        rule = f"subgroup {kind}={value}: test AUROC {gap:+.2f} below overall"
        below = members.where(F.col("score") < cut).orderBy(F.desc("score"), "patient_key").limit(n)
        found.append(below.select("patient_key", F.lit(rule).alias("rule")))
    return found


def cases(lake, task: str | None = None, status: str | None = "open", limit: int = 20, role=None) -> list:
    """The queue's cases (``limit`` of them, highest scores first), read under ``role``."""
    if not lake.exists(QUEUE):
        return []
    df = lake.read(QUEUE, role=role)
    if task:
        df = df.where(F.col("task") == task)
    if status:
        df = df.where(F.col("status") == status)
    return df.orderBy(F.desc("as_of"), F.desc("score"), "case_id").limit(max(limit, 0)).collect()


def case(lake, case_id_: str, role=None):
    found = (
        lake.read(QUEUE, role=role).where(F.col("case_id").startswith(case_id_)).limit(2).collect()
        if lake.exists(QUEUE)
        else []
    )
    if len(found) != 1:
        raise EhrlakeError(
            f"no review case {case_id_!r}"
            if not found
            else f"{case_id_!r} names several cases: give more of it"
        )
    return found[0]


def identity(lake, patient_key: str, role: str | None, purpose: str) -> list[dict]:
    """The patient's identifiers (their source id and the columns sealed to the reveal key, not
    the record as sent) for a reviewing clinician: a reveal (the policy's ``reveal``, a stated
    purpose, one patient, audited) of each bronze patient table that holds them."""
    from ehrlake.lake.catalog import bronze_patient_tables
    from ehrlake.security.protection import Sealing

    found = []
    for table in bronze_patient_tables(lake.root):
        schema = lake.schema(table)
        sealing = Sealing.of(schema)
        if "patient_key" not in schema.fieldNames() or sealing is None or not sealing.to_reveal:
            continue  # no identifiers here (bronze.generated_patients: a copy's lineage)
        if lake.read(table).where(F.col("patient_key") == patient_key).isEmpty():
            continue
        shown = ["source_system", "id", *sorted(sealing.to_reveal - {"raw"})]
        for row in lake.reveal(table, patient_key, role=role, purpose=purpose).collect():
            found.append({k: row[k] for k in shown if k in row.asDict() and row[k] is not None})
    return found


def decide(lake, case_id_: str, role: str | None, reason: str, override: int | None = None):
    """Record a clinician's decision on a case (``override``: their label, 0 or 1; None: accept
    the model's call) in ``gold.review_decisions`` and close the case, as an audited job."""
    if not (reason or "").strip():
        raise EhrlakeError("a review decision states its reason (--reason): it is kept and audited")
    if override not in (None, 0, 1):
        raise EhrlakeError(f"--override takes 1 (at risk) or 0 (not at risk), not {override}")
    role = role or lake.security.default_role
    with lake.security.job("review.decide", [DECISIONS, QUEUE], role) as (role, audit):
        c = case(lake, case_id_, role)
        called = 1 if c.risk_band == "high" else 0  # the model's call: flagged or not
        label = called if override is None else override
        decision = "accept" if override is None or override == called else "override"
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        row = (c.case_id, c.task, c.as_of, c.patient_key, c.model_id, c.model_version, c.risk_band,
               decision, label, reason.strip(), role, current_user(), now)  # fmt: skip
        lake.create(DECISIONS, DECISION_SCHEMA, description="clinicians' decisions on review cases")
        commit = {"ehrlakeJob": "review.decide"}
        lake.write(lake.spark.createDataFrame([row], DECISION_SCHEMA), DECISIONS, commit_info=commit)
        closed = lake.spark.createDataFrame([{**c.asDict(), "status": "decided"}], QUEUE_SCHEMA)
        lake.merge(closed, QUEUE, keys=["case_id"], commit_info=commit)
        audit.append((DECISIONS, f"case {c.case_id[:12]} ({c.task} {c.as_of}): {decision}, label {label}"))
    return decision, label


def _latest(df: DataFrame, keys: list[str]) -> DataFrame:
    """The latest decision of each ``keys``: a case decided twice counts by its last decision."""
    latest = Window.partitionBy(*keys).orderBy(F.desc("decided_at"))
    return df.withColumn("_n", F.row_number().over(latest)).where("_n = 1").drop("_n")


def feedback(lake, task: str) -> DataFrame | None:
    """The latest reviewed label of each (patient, date) of ``task``: patient_key, index_id, label."""
    if not lake.exists(DECISIONS):
        return None
    return _latest(lake.read(DECISIONS).where(F.col("task") == task), ["patient_key", "as_of"]).select(
        "patient_key",
        F.date_format("as_of", "yyyy-MM-dd").alias("index_id"),
        F.col("label").alias("reviewed_label"),
    )


def override_rates(lake) -> list:
    """Per model, version, band and the rule that queued the case (a challenger's or a subgroup's
    cases: the rule's kind, without its details): cases decided, overridden, and the share
    overridden, which tells whether a rule's cases are worth a clinician's time."""
    if not lake.exists(DECISIONS):
        return []
    kind = F.regexp_replace(F.coalesce(F.col("rule"), F.lit("not in the queue")), r"\s*[(:].*$", "")
    rules_of = lake.read(QUEUE).select("case_id", kind.alias("rule")) if lake.exists(QUEUE) else None
    decided = _latest(lake.read(DECISIONS), ["case_id"])
    if rules_of is not None:
        decided = decided.join(rules_of, "case_id", "left")
    else:
        decided = decided.withColumn("rule", F.lit(None).cast("string"))
    return (
        decided.groupBy("model_id", "model_version", "risk_band", "rule")
        .agg(
            F.count("*").alias("decided"),
            F.sum((F.col("decision") == "override").cast("int")).alias("overridden"),
        )
        .withColumn("override_rate", F.round(F.col("overridden") / F.col("decided"), 3))
        .orderBy("model_id", "model_version", "risk_band", "rule")
        .collect()  # one row per model version and band
    )
