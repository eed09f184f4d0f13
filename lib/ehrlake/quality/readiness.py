"""The readiness scorecard: is a source (or a region) fit for analysis? A 0-100 score and its parts.

Components, each a share from 0 to 1 (higher is better):

- ``completeness``: mean pass share (1 - failing share) of the completeness checks;
- ``conformance``: the same over conformance checks other than linkage and uniqueness (coding,
  formats, value sets);
- ``plausibility``: the same over plausibility checks;
- ``timeliness``: 1 when the newest encounter is at most a year old on the run date, falling
  linearly to 0 at five years;
- ``duplication``: the pass share of the uniqueness checks (one row per key);
- ``linkage``: the pass share of the reference checks (events whose patient_key resolves).

``score = 100 * weighted mean`` with weights 0.25, 0.20, 0.20, 0.10, 0.10, 0.15 in that order; a
component that cannot be computed for a row (e.g. no linkage checks per region) is left null and
the weights of the others are rescaled, so the number always means "share of what was measured".
Per region (state), completeness, conformance and plausibility come from the encounters and
patients of that state (fields present, class known, no quality flag).
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

WEIGHTS = {
    "completeness": 0.25,
    "conformance": 0.20,
    "plausibility": 0.20,
    "timeliness": 0.10,
    "duplication": 0.10,
    "linkage": 0.15,
}
TABLE = "gold.readiness"


def _timeliness(latest, today: dt.date):
    age_days = F.datediff(F.lit(today), F.to_date(latest))
    return F.when(latest.isNull(), F.lit(None)).otherwise(
        F.greatest(F.lit(0.0), F.least(F.lit(1.0), 1 - (age_days - 365) / (4 * 365.0)))
    )


def _score(df: DataFrame) -> DataFrame:
    weighted = sum(F.coalesce(F.col(c) * w, F.lit(0.0)) for c, w in WEIGHTS.items())
    present = sum(F.when(F.col(c).isNotNull(), F.lit(w)).otherwise(0.0) for c, w in WEIGHTS.items())
    return df.withColumn("score", F.round(100 * weighted / present, 1))


def by_source(lake, results: DataFrame, today: dt.date) -> DataFrame:
    passed = 1 - F.col("failed_share")
    parts = results.groupBy("source_system").agg(
        F.avg(F.when(F.col("category") == "completeness", passed)).alias("completeness"),
        F.avg(
            F.when(
                (F.col("category") == "conformance") & ~F.col("check_type").isin("references", "unique"),
                passed,
            )
        ).alias("conformance"),
        F.avg(F.when(F.col("category") == "plausibility", passed)).alias("plausibility"),
        F.avg(F.when(F.col("check_type") == "unique", passed)).alias("duplication"),
        F.avg(F.when(F.col("check_type") == "references", passed)).alias("linkage"),
    )
    latest = lake.read("silver.encounter").groupBy("source_system").agg(F.max("start_at").alias("_latest"))
    parts = parts.join(latest, "source_system", "left").withColumn(
        "timeliness", _timeliness(F.col("_latest"), today)
    )
    return _score(parts.drop("_latest")).select(
        F.lit("source").alias("level"), F.col("source_system").alias("name"), *WEIGHTS, "score"
    )


def by_region(lake, today: dt.date) -> DataFrame:
    enc = lake.read("silver.encounter").withColumn("region", F.coalesce("state", F.lit("(unknown)")))
    unflagged = (F.size("quality_flags") == 0).cast("double")
    parts = enc.groupBy("region").agg(
        F.avg(
            (F.col("end_at").isNotNull().cast("double") + F.col("organization_id").isNotNull().cast("double"))
            / 2
        ).alias("completeness"),
        F.avg((F.col("encounter_class") != "other").cast("double")).alias("conformance"),
        F.avg(unflagged).alias("plausibility"),
        F.avg((~F.array_contains("quality_flags", "unknown_patient")).cast("double")).alias("linkage"),
        F.max("start_at").alias("_latest"),
    )
    parts = parts.withColumn("timeliness", _timeliness(F.col("_latest"), today)).withColumn(
        "duplication", F.lit(None).cast("double")
    )
    return _score(parts.drop("_latest")).select(
        F.lit("region").alias("level"), F.col("region").alias("name"), *WEIGHTS, "score"
    )
