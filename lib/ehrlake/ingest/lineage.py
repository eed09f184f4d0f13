"""Lineage and versioning columns shared by every bronze table, and newest-wins deduplication."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

LINEAGE_COLUMNS = ["source_file", "record_index", "ingest_run_id", "ingested_at"]


def lineage(run_id: str, ingested_at: Column) -> list[Column]:
    """Where a row came from: file, position in it, and the run that loaded it."""
    return [
        F.col("source_file"),
        F.col("record_index").cast("long").alias("record_index"),
        F.lit(run_id).alias("ingest_run_id"),
        ingested_at.alias("ingested_at"),
    ]


def keep_newest(df: DataFrame, keys: list[str], newest_first: list[Column]) -> DataFrame:
    """One row per key: the first by ``newest_first``, ties broken by the later file and position,
    so the choice is deterministic whatever the partitioning.

    Duplicate keys are found with a narrow aggregation over the key columns only; just the rows
    whose key repeats go through the sort, so a batch without duplicates never shuffles whole rows.
    """
    repeated = df.groupBy(*keys).count().where("count > 1").drop("count")
    if repeated.isEmpty():
        return df
    order = [*newest_first, F.col("source_file").desc(), F.col("record_index").desc()]
    window = Window.partitionBy(*keys).orderBy(*order)
    colliding = df.join(repeated, keys, "left_semi")
    newest = colliding.withColumn("_rank", F.row_number().over(window)).where("_rank = 1").drop("_rank")
    return df.join(repeated, keys, "left_anti").unionByName(newest)
