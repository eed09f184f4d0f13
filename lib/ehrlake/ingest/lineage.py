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


# Keys that repeat are collected on the driver for a broadcast join up to this many; beyond it the
# whole frame is numbered by a window (a shuffle of every row, but bounded memory)
BROADCAST_REPEATS = 100_000


def by_repeats(df: DataFrame, keys: list[str]) -> tuple[DataFrame, DataFrame] | None:
    """``(rows whose key is unique, rows whose key repeats)``, or None when no key repeats.

    Repeats are found with a narrow aggregation over the key columns only, so a batch without
    them never shuffles whole rows; when they are few the split is a broadcast join (no shuffle of
    ``df`` either). With very many repeats, ``(empty, df)``: every row goes through the caller's
    window.
    """
    repeated = df.groupBy(*keys).count().where("count > 1").drop("count")
    found = repeated.limit(BROADCAST_REPEATS + 1).count()
    if found == 0:
        return None
    if found > BROADCAST_REPEATS:
        return df.limit(0), df
    repeated = F.broadcast(repeated)
    return df.join(repeated, keys, "left_anti"), df.join(repeated, keys, "left_semi")


def keep_newest(df: DataFrame, keys: list[str], newest_first: list[Column]) -> DataFrame:
    """One row per key: the first by ``newest_first``, ties broken by the later file and position,
    so the choice is deterministic whatever the partitioning. Only rows whose key repeats go
    through the sort (:func:`by_repeats`)."""
    split = by_repeats(df, keys)
    if split is None:
        return df
    unique, colliding = split
    order = [*newest_first, F.col("source_file").desc(), F.col("record_index").desc()]
    window = Window.partitionBy(*keys).orderBy(*order)
    newest = colliding.withColumn("_rank", F.row_number().over(window)).where("_rank = 1").drop("_rank")
    return unique.unionByName(newest)


def numbered(df: DataFrame, keys: list[str], column: str) -> DataFrame:
    """``df`` with ``column``: each row's place (1, 2, ...) among the rows of its ``keys`` in the
    order of ``record_index``; 1 for a key seen once. Only repeated keys are sorted (:func:`by_repeats`)."""
    split = by_repeats(df, keys)
    if split is None:
        return df.withColumn(column, F.lit(1))
    unique, colliding = split
    place = F.row_number().over(Window.partitionBy(*keys).orderBy("record_index"))
    return unique.withColumn(column, F.lit(1)).unionByName(colliding.withColumn(column, place))
