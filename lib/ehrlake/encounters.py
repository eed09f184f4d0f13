"""What a lake's encounters say beyond one row: when the data ends, and which inpatient stays were
followed by a 30-day readmission.

Both are defined once, here, below the features and the EDA: the ``readmission_30d`` label, the
``readmissions_long`` feature and the published rates (``gold.eda_utilisation``,
``gold.eda_readmission_by_facility``) read the same readmissions and the same exclusions, so an
analyst's rate is the mean of the label a model learns, not a near-twin of it.

The end of the data (:func:`data_end`) is the latest encounter start in silver that is not flagged
``future_date``; in a lake where every dated encounter is so flagged (a date-shifted extract on its
own, as MIMIC-IV's 2110-2201), the data's own clock is the only one and its latest start is the end.
The demand forecast's default origin is the last complete week before it.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

READMISSION_DAYS = 30
PAST_END = "follow-up past the end of the data"  # the one exclusion that the data's end decides


def days(n: int) -> Column:
    """An interval of ``n`` days, to add to or take from a timestamp column."""
    return F.expr(f"INTERVAL {int(n)} DAYS")


def data_end(lake, role: str | None = None) -> dt.datetime | None:
    """The latest encounter start in silver not flagged as lying in the future; where every dated
    one is (a date-shifted extract alone), the latest start. None without a dated encounter.
    ``role``: read under the access policy, audited (a job run by a role, as the forecast is)."""
    return data_clock(lake, role)[0]


def data_clock(lake, role: str | None = None) -> tuple[dt.datetime | None, bool]:
    """(:func:`data_end`, whether it is a date-shifted extract's own clock: then events flagged
    ``future_date`` are the data's present, not errors beyond its end)."""
    now, latest = start_bounds(lake, role)
    if now is not None:
        return now, False
    return latest, latest is not None


def start_bounds(lake, role: str | None = None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(the latest encounter start not flagged ``future_date``, the latest start of all), in one
    pass over silver.encounter: a job that needs both (the EDA: the data's end and the last year it
    shows) reads the table once."""
    future = F.array_contains(F.coalesce("quality_flags", F.array()), "future_date")
    row = (
        lake.read("silver.encounter", role=role)
        .agg(F.max(F.when(~future, F.col("start_at"))).alias("now"), F.max("start_at").alias("latest"))
        .first()
    )
    return row["now"], row["latest"]


def readmitted_stays(encounters: DataFrame) -> DataFrame:
    """The inpatient stays of ``encounters`` (silver.encounter rows, every column kept) with
    ``readmitted_at``: the start of the first other inpatient stay that began after the stay's
    discharge and at most 30 days after it, null when none. A stay that begins before the last one
    ended (a transfer, an overlapping record) is not a readmission of it."""
    stays = encounters.where(F.lower("encounter_class") == "inpatient")
    later = stays.select(
        "patient_key", F.col("start_at").alias("next_start"), F.col("encounter_id").alias("next_id")
    )
    readmitted = (
        stays.select("source_system", "encounter_id", "patient_key", "end_at")
        .join(later, "patient_key")
        .where(
            (F.col("next_id") != F.col("encounter_id"))
            & (F.col("next_start") > F.col("end_at"))
            & (F.col("next_start") <= F.col("end_at") + days(READMISSION_DAYS))
        )
        .groupBy("source_system", "encounter_id")
        .agg(F.min("next_start").alias("readmitted_at"))
    )
    return stays.join(readmitted, ["source_system", "encounter_id"], "left")


def readmission_outcomes(encounters: DataFrame, deaths: DataFrame, end: dt.datetime | None) -> DataFrame:
    """The inpatient stays of ``encounters`` (:func:`readmitted_stays`) with the patient's
    ``death_date`` (from ``deaths``: ``patient_key``, ``death_date``), ``excluded`` (why the stay
    cannot be judged, :func:`readmission_excluded`, or null) and ``readmitted``: 1 or 0, null where
    excluded. The label's values and the published rates' numerators, one definition."""
    stays = readmitted_stays(encounters).join(
        deaths.select("patient_key", "death_date"), "patient_key", "left"
    )
    return stays.withColumn("excluded", readmission_excluded(end)).withColumn(
        "readmitted", F.when(F.col("excluded").isNull(), F.col("readmitted_at").isNotNull().cast("int"))
    )


def readmission_excluded(end: dt.datetime | None) -> Column:
    """Why a stay (columns ``end_at``, ``death_date``) cannot count for or against a readmission,
    or null: no discharge time, died on or before discharge, or its 30 days run past ``end``."""
    return (
        F.when(F.col("end_at").isNull(), F.lit("no discharge time"))
        .when(F.col("death_date") <= F.to_date("end_at"), F.lit("died on or before discharge"))
        .when(F.col("end_at") + days(READMISSION_DAYS) > F.lit(end), F.lit(PAST_END))
    )
