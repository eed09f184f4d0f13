"""Observations with their estimates: what ``lake.read("silver.observation", include_estimates=True)``
returns. The estimates are written by the record update (``ehrlake.estimates``); this read only
places them beside the observations, each row saying where it came from."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

ESTIMATES = "silver.observation_estimates"
OBSERVATIONS = "silver.observation"


def with_estimates(lake, observed: DataFrame, role: str | None = None) -> DataFrame:
    """``observed`` (silver.observation rows) with ``provenance = observed``, and the active
    estimates as observation rows with ``provenance = estimated``, their interval and model."""
    observed = observed.withColumn("provenance", F.lit("observed"))
    if not lake.exists(ESTIMATES):
        return observed
    est = (lake.read(ESTIMATES, role=role) if role else lake.read(ESTIMATES)).where(~F.col("superseded"))
    as_rows = est.select(
        F.col("estimate_id").alias("observation_id"), "patient_key", F.lit("ehrlake").alias("source_system"),
        F.lit("estimated").alias("source"), "code_system", "code", "display",
        F.col("value").alias("value_number"), "unit", F.col("as_of").alias("effective_at"),
        F.lit("estimated").alias("provenance"), F.col("low").alias("estimate_low"),
        F.col("high").alias("estimate_high"), F.col("model_id").alias("estimate_model_id"),
        F.col("model_version").alias("estimate_model_version"),
    )  # fmt: skip
    return observed.unionByName(as_rows, allowMissingColumns=True)
