"""Prediction tasks and their labels, each with its exact definition (docs/features.md).

A label row is an *index* (a patient as of a date, or an inpatient stay at discharge) with the
outcome in the horizon after it. Indexes that cannot be labelled are kept with ``label`` null and an
``excluded`` reason (nothing is silently dropped): the follow-up runs past the end of the data, the
patient died before the index, already has the disease, or was not seen recently enough to be
"under observation" (a patient never seen cannot be at risk in the data). The end of the data and
a readmission are defined in ``ehrlake/encounters.py``, which the published rates read too.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.encounters import PAST_END, days, readmission_outcomes
from ehrlake.errors import EhrlakeError
from ehrlake.features import pointintime
from ehrlake.features.definitions import Definitions

LABEL_COLUMNS = ["task", "patient_key", "index_id", "index_time", "label", "excluded"]


@dataclass(frozen=True)
class Task:
    name: str
    level: str  # patient (as of a date) | encounter (inpatient stay at discharge) | diabetes130 (extract row)
    definition: str
    horizon_days: int = 365
    group: str | None = None  # condition group of an onset task

    @property
    def feature_table(self) -> str:
        return f"gold.features_{self.level}"


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "readmission_30d",
            "encounter",
            "Index: every inpatient stay with a discharge time (silver.encounter, class inpatient), at "
            "discharge. Label 1 if the same patient starts another inpatient stay within 30 days after "
            "discharge (all-cause, planned or not: sources do not mark planned stays). Excluded: no "
            "discharge time; died on or before the discharge day; discharge less than 30 days before "
            "the end of the data.",
            horizon_days=30,
        ),
        Task(
            "type2_diabetes_onset_12m",
            "patient",
            "Index: a patient as of a date (00:00 UTC), alive, born before it, with an encounter ended "
            "in the previous 730 days. Label 1 if a type 2 diabetes diagnosis (conf/features.yaml "
            "type2_diabetes) has its first onset within 365 days from the index. Excluded: the "
            "diagnosis before the index; follow-up past the end of the data.",
            group="type2_diabetes",
        ),
        Task(
            "hypertension_onset_12m",
            "patient",
            "As type2_diabetes_onset_12m, for hypertension (conf/features.yaml hypertension).",
            group="hypertension",
        ),
        Task(
            "ckd_onset_12m",
            "patient",
            "As type2_diabetes_onset_12m, for chronic kidney disease (conf/features.yaml ckd).",
            group="ckd",
        ),
        Task(
            "mortality_12m",
            "patient",
            "Index: a patient as of a date, alive, born before it, with an encounter ended in the "
            "previous 730 days. Label 1 if the recorded death date falls within 365 days from the "
            "index. Excluded: follow-up past the end of the data.",
        ),
        Task(
            "diabetes130_readmission_30d",
            "diabetes130",
            "Diabetes 130-US's own label: one row per inpatient encounter of the extract, label 1 if "
            "readmitted == '<30' (readmitted within 30 days), 0 for '>30' and 'NO'. Excluded, as in "
            "Strack et al. 2014: discharges to hospice or death (discharge_disposition_id 11, 13, 14, "
            "19, 20, 21).",
            horizon_days=30,
        ),
    )
}


def task(name: str) -> Task:
    if name not in TASKS:
        raise EhrlakeError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]


def _of(table: DataFrame, patients: DataFrame | None) -> DataFrame:
    return table if patients is None else table.join(F.broadcast(patients), "patient_key", "left_semi")


def _label(excluded: Column, outcome: Column) -> tuple[Column, Column]:
    """(label, excluded): the first exclusion that applies wins; label null where excluded."""
    return F.when(excluded.isNull(), outcome.cast("int")), excluded


def readmission(lake, end: dt.datetime, patients: DataFrame | None = None) -> DataFrame:
    """Index rows of ``readmission_30d``: inpatient stays, with ``source_system`` / ``encounter_id``;
    only of ``patients`` (a frame of ``patient_key``) where given."""
    df = readmission_outcomes(
        _of(lake.read("silver.encounter"), patients), _of(lake.read("silver.patient"), patients), end
    )
    return df.select(
        F.lit("readmission_30d").alias("task"),
        "patient_key",
        F.concat_ws("/", "source_system", "encounter_id").alias("index_id"),
        F.col("end_at").alias("index_time"),
        F.col("readmitted").alias("label"),
        "excluded",
        "source_system",
        "encounter_id",
    )


def patient_index(
    lake, as_of: list[dt.date], defs: Definitions, patients: DataFrame | None = None
) -> DataFrame:
    """Every patient (of ``patients`` where given) with a dated encounter x as-of date, with the
    exclusion common to all patient tasks (or null).

    The dates are a literal array exploded on each patient's row, a narrow step: as a joined
    frame of dates made on the driver, Spark knew no size for it and planned a Cartesian product
    over every partition, three times per build (3.5 of the ~19 task-seconds of a nightly
    scoring's features at 100,000 patients)."""
    dates = F.explode(F.array(*[F.lit(d) for d in sorted(set(as_of))])).alias("as_of")
    people = _of(lake.read("silver.patient"), patients).select("patient_key", "birth_year", "death_date")
    seen = _of(lake.read("silver.encounter"), patients).select(
        "patient_key", F.coalesce("end_at", "start_at").alias("ended_at")
    )
    # only patients with a dated encounter can be placed in time (Diabetes 130-US has no dates)
    dated = seen.where(F.col("ended_at").isNotNull()).select("patient_key").distinct()
    index = (
        people.join(dated, "patient_key")
        .select("*", dates)
        .withColumn("index_time", F.col("as_of").cast("timestamp"))
    )
    observed = (
        index.select("patient_key", "as_of", "index_time")
        .join(seen, "patient_key")
        .where(
            (F.col("ended_at") < F.col("index_time"))
            & (F.col("ended_at") >= F.col("index_time") - days(defs.windows.observed_days))
        )
        .select("patient_key", "as_of")
        .distinct()
        .withColumn("_observed", F.lit(True))
    )
    index = index.join(observed, ["patient_key", "as_of"], "left")
    excluded = (
        F.when(
            F.col("birth_year").isNull() | (F.col("birth_year") > F.year("as_of")),
            F.lit("no birth year, or born after the index"),
        )
        .when(F.col("death_date") < F.col("as_of"), F.lit("died before the index"))
        .when(F.col("_observed").isNull(), F.lit("not under observation"))
    )
    return index.select(
        "patient_key",
        F.date_format("as_of", "yyyy-MM-dd").alias("index_id"),
        "index_time",
        "as_of",
        "death_date",
        excluded.alias("_base_excluded"),
    )


def patient_labels(lake, index: DataFrame, t: Task, end: dt.datetime, defs: Definitions) -> DataFrame:
    """Labels of one patient-level task over :func:`patient_index` rows."""
    horizon_end = F.col("index_time") + days(t.horizon_days)
    past_end = horizon_end > F.lit(end)
    if t.group is None:  # mortality
        outcome = (F.col("death_date") >= F.col("as_of")) & (
            F.col("death_date").cast("timestamp") < horizon_end
        )
        excluded = F.when(F.col("_base_excluded").isNotNull(), F.col("_base_excluded")).when(
            past_end, F.lit(PAST_END)
        )
        df = index
    else:
        group = defs.group(t.group)
        first = (
            pointintime.silver(lake, "condition")
            .where(group.matches(F.col("code_system"), F.col("code")) & F.col("onset_at").isNotNull())
            .groupBy("patient_key")
            .agg(F.min("onset_at").alias("_first_onset"))
        )
        df = index.join(first, "patient_key", "left")
        outcome = (F.col("_first_onset") >= F.col("index_time")) & (F.col("_first_onset") < horizon_end)
        excluded = (
            F.when(F.col("_base_excluded").isNotNull(), F.col("_base_excluded"))
            .when(F.col("_first_onset") < F.col("index_time"), F.lit(f"already has {group.description}"))
            .when(past_end, F.lit(PAST_END))
        )
    label, excluded = _label(excluded, F.coalesce(outcome, F.lit(False)))
    return df.select(
        F.lit(t.name).alias("task"),
        "patient_key",
        "index_id",
        "index_time",
        label.alias("label"),
        excluded.alias("excluded"),
    )
