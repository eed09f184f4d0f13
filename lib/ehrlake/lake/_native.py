"""The native engine: Delta Lake's own Spark integration (``io.delta`` on the classpath).

Chosen automatically on clusters that ship the Delta JARs (``--packages io.delta:delta-spark_2.13:...``);
it gives the same tables and the same :class:`CommitResult` as the delta-rs engine, so jobs do not
care which one runs. The JARs cannot be fetched on the development machines, so this module is
exercised only where they exist; engine selection itself is tested everywhere.
"""

from __future__ import annotations

from datetime import datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from ehrlake.errors import CommitConflict, SchemaMismatch, TableNotFound
from ehrlake.lake.modes import CommitResult, WriteMode


def available(spark: SparkSession) -> bool:
    """True when the Delta Lake classes are loadable in the driver JVM."""
    try:
        spark._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:  # py4j raises a generic Py4JJavaError for ClassNotFoundException
        return False


class NativeDeltaEngine:
    name = "native"

    def __init__(self, spark: SparkSession):
        from delta.tables import DeltaTable  # delta-spark's Python API, shipped with the JARs

        self.spark = spark
        self._DeltaTable = DeltaTable

    def exists(self, path: str) -> bool:
        return self._DeltaTable.isDeltaTable(self.spark, path)

    def _table(self, path: str):
        if not self.exists(path):
            raise TableNotFound(f"no Delta table at {path}")
        return self._DeltaTable.forPath(self.spark, path)

    def schema(self, path: str) -> T.StructType:
        return self._table(path).toDF().schema

    def version(self, path: str) -> int:
        return int(self._table(path).history(1).collect()[0]["version"])

    def history(self, path: str, limit: int | None = None) -> list[dict]:
        frame = self._table(path).history(limit) if limit else self._table(path).history()
        return [row.asDict(recursive=True) for row in frame.collect()]

    def row_count(self, path: str) -> int:
        return self._table(path).toDF().count()

    def read(self, path: str, version: int | datetime | None = None) -> DataFrame:
        reader = self.spark.read.format("delta")
        if isinstance(version, datetime):
            reader = reader.option("timestampAsOf", version.isoformat())
        elif version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(path)

    def create(self, path, schema, partition_by, description=None) -> None:
        builder = self._DeltaTable.createIfNotExists(self.spark).location(path).addColumns(schema)
        if partition_by:
            builder = builder.partitionedBy(*partition_by)
        if description:
            builder = builder.comment(description)
        builder.execute()

    def write(self, df, path, table, mode, partition_by, where, evolve, commit_info) -> CommitResult:
        writer = df.write.format("delta").mode(mode.value).option("mergeSchema", str(evolve).lower())
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        if where:
            if mode is not WriteMode.OVERWRITE:
                raise SchemaMismatch("where= selects partitions to replace; it needs mode=OVERWRITE")
            writer = writer.option("replaceWhere", " AND ".join(f"`{k}` = '{v}'" for k, v in where.items()))
        writer = writer.option("userMetadata", str(commit_info))
        try:
            writer.save(path)
        except Exception as exc:  # Delta's concurrency exceptions arrive as py4j errors
            _raise_known(exc, table)
            raise
        last = self.history(path, 1)[0]
        rows = int((last.get("operationMetrics") or {}).get("numOutputRows", 0))
        return CommitResult(table, int(last["version"]), mode.value.upper(), rows_written=rows)

    def merge(self, df, path, table, keys, update_when, evolve, commit_info) -> CommitResult:
        if not self.exists(path):
            result = self.write(df, path, table, WriteMode.APPEND, None, None, evolve, commit_info)
            return CommitResult(
                table,
                result.version,
                "MERGE",
                rows_written=result.rows_written,
                metrics={"inserted": result.rows_written, "updated": 0, "unchanged": 0},
            )
        if evolve:
            self.spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", "true")
        on = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        builder = self._table(path).alias("t").merge(df.alias("s"), on)
        builder = (
            builder.whenMatchedUpdateAll(condition=update_when)
            if update_when
            else builder.whenMatchedUpdateAll()
        )
        try:
            builder.whenNotMatchedInsertAll().execute()
        except Exception as exc:
            _raise_known(exc, table)
            raise
        last = self.history(path, 1)[0]
        m = last.get("operationMetrics") or {}
        inserted, updated = int(m.get("numTargetRowsInserted", 0)), int(m.get("numTargetRowsUpdated", 0))
        total = int(m.get("numSourceRows", inserted + updated))
        return CommitResult(
            table,
            int(last["version"]),
            "MERGE",
            rows_written=int(m.get("numOutputRows", 0)),
            metrics={"inserted": inserted, "updated": updated, "unchanged": total - inserted - updated},
        )

    def vacuum(self, path: str, retention_hours: int, dry_run: bool) -> list[str]:
        self.spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        if dry_run:
            frame = self.spark.sql(f"VACUUM delta.`{path}` RETAIN {retention_hours} HOURS DRY RUN")
            return [r[0] for r in frame.collect()]
        self._table(path).vacuum(retention_hours)
        return []


def _raise_known(exc: Exception, table: str) -> None:
    text = str(exc)
    if "ConcurrentAppendException" in text or "ConcurrentDeleteReadException" in text or "Concurrent" in text:
        raise CommitConflict(
            f"{table}: another writer committed a conflicting change first ({text[:200]})"
        ) from exc
    if "AnalysisException" in text and "schema" in text.lower():
        raise SchemaMismatch(f"cannot write to {table}: {text[:300]}") from exc


__all__ = ["NativeDeltaEngine", "available"]
