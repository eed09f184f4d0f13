"""Point-in-time features over silver: one row per index (a patient as of a date, or an inpatient
stay at discharge), computed only from what was known *before* the index time.

The rule, applied to every source table, is one join condition: an event counts if its time is
strictly before ``index_time`` (an encounter once it has *ended*, a condition from its onset, a lab
from when it was measured, a medication from its start). Deaths, later diagnoses and later stays
therefore cannot leak into the features; ``tests/test_features.py`` builds a patient whose future
would change every feature and checks none does.

Feature names are stable and described in :data:`DESCRIPTIONS` (the readable reasons of a
prediction come from there).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.eda.aggregates import age_band
from ehrlake.encounters import READMISSION_DAYS, days, readmitted_stays
from ehrlake.features.definitions import Definitions

INDEX = ["patient_key", "index_id"]
ATTRIBUTES = ["sex", "age_band", "state", "race"]  # kept for subgroup metrics, never model inputs
ENCOUNTER_CLASSES = {
    "inpatient": ("inpatient",),
    "emergency": ("emergency", "urgentcare"),
    "ambulatory": ("ambulatory", "outpatient", "wellness", "home", "virtual"),
}


def silver(lake, entity: str) -> DataFrame:
    """A silver table, or an empty one of its schema where no source has produced it yet (a lake
    of extracts without medications still gets features, with zero medication counts)."""
    from ehrlake.clean.model import ENTITIES

    e = ENTITIES[entity]
    return lake.read(e.table) if lake.exists(e.table) else lake.spark.createDataFrame([], e.schema())


def lab_of(labs: dict, system: Column, code: Column) -> Column:
    """The name of the lab of ``labs`` (``conf/features.yaml``) an observation's code is, or null."""
    name = F.lit(None).cast("string")
    for n, lab in labs.items():
        name = F.when(lab.matches(system, code), F.lit(n)).otherwise(name)
    return name


def lab_values(lake, labs: dict) -> DataFrame:
    """The numeric, plausible observations of ``labs``: ``patient_key``, ``effective_at``,
    ``value_number`` and the ``lab``'s name (what a feature's latest value is taken from)."""
    return (
        silver(lake, "observation")
        .where(F.col("value_number").isNotNull() & ~F.array_contains("quality_flags", "implausible_value"))
        .select(
            "patient_key",
            "effective_at",
            "value_number",
            lab_of(labs, F.col("code_system"), F.col("code")).alias("lab"),
        )
        .where(F.col("lab").isNotNull())
    )


def with_estimates(lake, rows: DataFrame, defs: Definitions) -> DataFrame:
    """``rows`` (``INDEX``, ``index_time``, ``last_<lab>``) where each lab that opts in
    (``estimates: true`` in conf/features.yaml) and has no measurement in the window takes the
    latest active estimate of the record update in it (``silver.observation_estimates``), and
    ``estimated_<lab>`` says which. An estimate is never taken over a measurement, and never from
    after the row's date: one at the row's own date is made from the panel of what came before it.
    ``missing_<lab>`` keeps saying "not measured"."""
    from ehrlake.lake.provenance import ESTIMATES

    opted = [n for n, lab in defs.labs.items() if lab.estimates]
    if not opted:
        return rows
    if lake.exists(ESTIMATES):
        active = (
            lake.read(ESTIMATES)
            .where(~F.col("superseded") & F.col("lab").isin(*opted))
            .select("patient_key", "lab", F.col("as_of").alias("_at"), "value")
        )
        window = (F.col("_at") <= F.col("index_time")) & (
            F.col("_at") > F.col("index_time") - days(defs.windows.labs_days)
        )
        latest = (
            rows.select(*INDEX, "index_time")
            .join(active, "patient_key")
            .where(window)
            .groupBy(*INDEX)
            .pivot("lab", opted)
            .agg(F.max_by("value", "_at"))
        )
        rows = rows.join(
            latest.select(*INDEX, *[F.col(n).alias(f"_estimate_{n}") for n in opted]), INDEX, "left"
        )
    else:
        rows = rows.select("*", *[F.lit(None).cast("double").alias(f"_estimate_{n}") for n in opted])
    for n in opted:
        observed, estimate = F.col(f"last_{n}"), F.col(f"_estimate_{n}")
        rows = rows.withColumn(f"estimated_{n}", (observed.isNull() & estimate.isNotNull()).cast("int"))
        rows = rows.withColumn(f"last_{n}", F.coalesce(observed, estimate)).drop(f"_estimate_{n}")
    return rows


def descriptions(defs: Definitions) -> dict[str, str]:
    """Feature name -> what it means, for docs and readable prediction reasons."""
    w = defs.windows
    out = {
        "age_years": "age in years at the index date",
        "sex_female": "sex recorded as female",
        "sex_male": "sex recorded as male",
        "encounters_recent": f"encounters ended in the last {w.recent_days} days",
        "inpatient_recent": f"earlier inpatient stays ended in the last {w.recent_days} days",
        "inpatient_long": f"inpatient stays ended in the last {w.long_days} days",
        "emergency_recent": f"emergency / urgent care visits in the last {w.recent_days} days",
        "ambulatory_recent": f"ambulatory / outpatient / wellness visits in the last {w.recent_days} days",
        "inpatient_days_recent": f"days in hospital in the last {w.recent_days} days",
        "readmissions_long": (
            f"earlier inpatient stays followed by a readmission within {READMISSION_DAYS} days, the "
            f"readmission begun in the last {w.long_days} days"
        ),
        "days_since_last_encounter": "days since the last encounter ended (capped at 3650)",
        "conditions_ever": "distinct conditions recorded before the index date",
        "medications_recent": f"distinct medications started in the last {w.recent_days} days",
        "medications_active": "medications running at the index date",
        "procedures_recent": f"procedures in the last {w.recent_days} days",
        "index_length_of_stay": "length of the index stay (days)",
        "index_diagnoses": "diagnoses recorded on the index stay",
        "index_procedures": "procedures on the index stay",
    }
    for name, group in defs.condition_groups.items():
        out[f"has_{name}"] = f"history of {group.description}"
    if defs.note_features:
        out["notes_recent"] = f"notes written in the last {w.recent_days} days (with or without text)"
        out["note_concepts_recent"] = (
            f"distinct codes the notes of the last {w.recent_days} days mention (not negated, nor about "
            "family, nor hypothetical)"
        )
        for name, group in defs.condition_groups.items():
            out[f"notes_{name}"] = (
                f"notes of the last {w.long_days} days that mention {group.description} "
                "(not negated, nor about family, nor hypothetical)"
            )
    for name, lab in defs.labs.items():
        out[f"last_{name}"] = f"latest {lab.description} (last {w.labs_days} days)"
        out[f"missing_{name}"] = f"no {lab.description} in the last {w.labs_days} days"
        if lab.estimates:
            out[f"estimated_{name}"] = f"latest {lab.description} is the record update's estimate"
    return out


def feature_columns(defs: Definitions, level: str) -> list[str]:
    """The model inputs of a feature table, in a fixed order (``level``: patient or encounter)."""
    names = list(descriptions(defs))
    if level != "encounter":
        names = [n for n in names if not n.startswith("index_")]
    return names


def _notes(lake, before, defs: Definitions) -> DataFrame:
    """Per index row, from the notes written before the index time (``silver.note`` and
    ``silver.note_concept``; none without notes): the notes of the recent window, the distinct
    codes those notes affirm, and per condition group the notes of the long window affirming one."""
    w = defs.windows
    affirmed = ~(F.col("negated") | F.col("family") | F.col("hypothetical"))
    if lake.exists("silver.note_concept"):
        mentions = lake.read("silver.note_concept").where(affirmed)
    else:
        mentions = lake.spark.createDataFrame(
            [],
            "patient_key string, note_id string, date timestamp, kind string, code_system string, "
            "code string",
        )
    mentions = mentions.select("patient_key", "note_id", "date", "kind", "code_system", "code")
    if lake.exists("silver.note"):
        notes = lake.read("silver.note").select("patient_key", "note_id", "date")
    else:
        notes = lake.spark.createDataFrame([], "patient_key string, note_id string, date timestamp")
    since = lambda n: F.col("date") >= F.col("index_time") - days(n)  # noqa: E731
    condition = F.col("kind") == "condition"
    found = (
        before(mentions, "date", max(w.long_days, w.recent_days))
        .groupBy(*INDEX)
        .agg(
            F.countDistinct(F.when(since(w.recent_days), F.concat_ws("|", "code_system", "code"))).alias(
                "note_concepts_recent"
            ),
            *[
                F.countDistinct(
                    F.when(
                        since(w.long_days) & condition & g.matches(F.col("code_system"), F.col("code")),
                        F.col("note_id"),
                    )
                ).alias(f"notes_{name}")
                for name, g in defs.condition_groups.items()
            ],
        )
    )
    written = (
        before(notes, "date", w.recent_days)
        .groupBy(*INDEX)
        .agg(F.countDistinct("note_id").alias("notes_recent"))
    )
    return written.join(found, INDEX, "full")


def build(lake, index: DataFrame, defs: Definitions, level: str = "patient") -> DataFrame:
    """Features for ``index`` (``patient_key``, ``index_id``, ``index_time``; for level ``encounter``
    also ``source_system`` and ``encounter_id`` of the stay). Rows of ``index`` are kept one for one."""
    w = defs.windows
    idx = index.select(
        *INDEX, "index_time", *(["source_system", "encounter_id"] if level == "encounter" else [])
    )
    keys = idx.select(*INDEX, "index_time")

    patients = silver(lake, "patient").select("patient_key", "gender", "birth_year", "state", "race")
    age = F.year("index_time") - F.col("birth_year")
    out = idx.join(patients, "patient_key", "left").select(
        *idx.columns,
        age.cast("double").alias("age_years"),
        (F.col("gender") == "female").cast("int").alias("sex_female"),
        (F.col("gender") == "male").cast("int").alias("sex_male"),
        F.coalesce(F.col("gender"), F.lit("unknown")).alias("sex"),
        age_band(age).alias("age_band"),
        F.coalesce(F.col("state"), F.lit("(unknown)")).alias("state"),
        F.coalesce(F.col("race"), F.lit("(unknown)")).alias("race"),
    )

    def before(events: DataFrame, time: str, within: int | None = None) -> DataFrame:
        cond = F.col(time) < F.col("index_time")
        if within is not None:
            cond = cond & (F.col(time) >= F.col("index_time") - days(within))
        return keys.join(events, "patient_key").where(cond)

    enc = silver(lake, "encounter").select(
        "patient_key",
        F.coalesce("end_at", "start_at").alias("ended_at"),
        F.lower("encounter_class").alias("class"),
        "length_of_stay_days",
    )
    recent = F.col("ended_at") >= F.col("index_time") - days(w.recent_days)

    def in_class(name: str) -> Column:
        return F.col("class").isin(*ENCOUNTER_CLASSES[name])

    utilisation = (
        before(enc, "ended_at", max(w.long_days, 3650))
        .groupBy(*INDEX)
        .agg(
            F.sum(recent.cast("int")).alias("encounters_recent"),
            F.sum((recent & in_class("inpatient")).cast("int")).alias("inpatient_recent"),
            F.sum(
                (in_class("inpatient") & (F.col("ended_at") >= F.col("index_time") - days(w.long_days))).cast(
                    "int"
                )
            ).alias("inpatient_long"),
            F.sum((recent & in_class("emergency")).cast("int")).alias("emergency_recent"),
            F.sum((recent & in_class("ambulatory")).cast("int")).alias("ambulatory_recent"),
            F.sum(F.when(recent & in_class("inpatient"), F.col("length_of_stay_days"))).alias(
                "inpatient_days_recent"
            ),
            F.least(
                F.lit(3650.0),
                F.min((F.unix_timestamp("index_time") - F.unix_timestamp("ended_at")) / 86400.0),
            ).alias("days_since_last_encounter"),
        )
    )

    # a stay's readmission is known once the next stay has begun (the index stay itself counts
    # where it is one: it began before its discharge, the index time)
    readmitted = (
        readmitted_stays(silver(lake, "encounter"))
        .where(F.col("readmitted_at").isNotNull())
        .select("patient_key", "readmitted_at")
    )
    readmissions = (
        before(readmitted, "readmitted_at", w.long_days)
        .groupBy(*INDEX)
        .agg(F.count(F.lit(1)).alias("readmissions_long"))
    )

    cond = silver(lake, "condition").select("patient_key", "onset_at", "code_system", "code")
    conditions = (
        before(cond, "onset_at")
        .groupBy(*INDEX)
        .agg(
            F.countDistinct("code_system", "code").alias("conditions_ever"),
            *[
                F.max(g.matches(F.col("code_system"), F.col("code")).cast("int")).alias(f"has_{name}")
                for name, g in defs.condition_groups.items()
            ],
        )
    )

    med = silver(lake, "medication").select("patient_key", "start_at", "end_at", "code")
    medications = (
        before(med, "start_at")
        .groupBy(*INDEX)
        .agg(
            F.countDistinct(
                F.when(F.col("start_at") >= F.col("index_time") - days(w.recent_days), F.col("code"))
            ).alias("medications_recent"),
            F.countDistinct(
                F.when(F.col("end_at").isNull() | (F.col("end_at") > F.col("index_time")), F.col("code"))
            ).alias("medications_active"),
        )
    )

    proc = silver(lake, "procedure").select("patient_key", "start_at")
    procedures = (
        before(proc, "start_at", w.recent_days).groupBy(*INDEX).agg(F.count("*").alias("procedures_recent"))
    )

    obs = lab_values(lake, defs.labs)
    labs = (
        before(obs, "effective_at", w.labs_days)
        .groupBy(*INDEX)
        .pivot("lab", list(defs.labs))
        .agg(F.max_by("value_number", "effective_at"))
    )
    labs = labs.select(*INDEX, *[F.col(n).alias(f"last_{n}") for n in defs.labs])

    parts = [utilisation, readmissions, conditions, medications, procedures, labs]
    if defs.note_features:
        parts.append(_notes(lake, before, defs))
    for part in parts:
        out = out.join(part, INDEX, "left")

    if level == "encounter":
        stays = silver(lake, "encounter").select(
            "source_system", "encounter_id", F.col("length_of_stay_days").alias("index_length_of_stay")
        )
        on_stay = lambda table, alias: (  # noqa: E731
            silver(lake, table).groupBy("source_system", "encounter_id").agg(F.count("*").alias(alias))
        )
        out = (
            out.join(stays, ["source_system", "encounter_id"], "left")
            .join(on_stay("condition", "index_diagnoses"), ["source_system", "encounter_id"], "left")
            .join(on_stay("procedure", "index_procedures"), ["source_system", "encounter_id"], "left")
        )

    counts = [
        c
        for c in feature_columns(defs, level)
        if not c.startswith(("last_", "missing_", "estimated_", "age_", "days_since", "index_length"))
    ]
    out = out.fillna(0, subset=counts)
    out = out.withColumn("days_since_last_encounter", F.coalesce("days_since_last_encounter", F.lit(3650.0)))
    for name in defs.labs:
        out = out.withColumn(f"missing_{name}", F.col(f"last_{name}").isNull().cast("int"))
    out = with_estimates(lake, out, defs)
    columns = feature_columns(defs, level)
    return out.select(
        *INDEX,
        "index_time",
        *ATTRIBUTES,
        *[F.col(c).cast("double").alias(c) for c in columns],
    )
