"""The native engine: Delta Lake's own Spark integration (``io.delta`` on Spark's class path).

``make setup`` fetches the JARs (scripts/delta_jars.sh) and the session puts them on the class path
(``session.delta_jars``); on a cluster, ``--packages io.delta:delta-spark_4.2_2.13:4.4.0`` does. It
keeps the lake layer's contract exactly as the delta-rs engine does (the lake tests run on both):
the same tables, the same :class:`CommitResult`, the same errors, and the same rule that text
columns carry no statistics (``stats.stats_columns`` becomes ``delta.dataSkippingStatsColumns``).

Concurrency: Delta's optimistic commits refuse a merge whose snapshot another writer changed; the
merge is then planned again, up to :data:`MERGE_ATTEMPTS` times, as the delta-rs engine does. Two
first writes at once both create the table: the one that loses waits for the other's first commit.
Within one process, tables are written side by side (ingest's and an incremental clean's): a merge's
commit metadata is a session setting, so each merge runs in its own clone of the session, and each
commit is found again by the token in it to report its own version, not a racing writer's.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from datetime import datetime

from deltalake import DeltaTable as DeltaLog
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import CommitConflict, SchemaMismatch, TableNotFound
from ehrlake.lake import _schema
from ehrlake.lake.modes import CommitResult, WriteMode, check_write
from ehrlake.lake.stats import parquet_options, stats_columns

MERGE_ATTEMPTS = 8
CREATE_WAIT_S = 10.0
_CREATING = "DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION"  # another writer's create is under way
_CONFLICTS = (
    "ConcurrentAppendException",
    "ConcurrentDeleteReadException",
    "ConcurrentDeleteDeleteException",
    "ConcurrentTransactionException",
    "MetadataChangedException",
    "ProtocolChangedException",
)
_USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
_TOKEN = "ehrlakeCommit"
_GONE = "_ehrlake_deleted"  # a merge's source row that deletes its target row


def available(spark: SparkSession) -> bool:
    """True when the Delta Lake classes are loadable in the driver JVM (by Spark's class loader, which
    sees ``--jars`` and ``--packages``) and its Python API is installed."""
    from ehrlake.session import delta_loaded

    try:
        import delta.tables  # noqa: F401
    except ImportError:
        return False
    return delta_loaded(spark._jvm)


class NativeDeltaEngine:
    name = "native"

    def __init__(self, spark: SparkSession):
        from delta.tables import DeltaTable

        self.spark = spark
        self._DeltaTable = DeltaTable

    # ----------------------------------------------------------------- table state
    def exists(self, path: str) -> bool:
        """A table with a committed version. Delta's own ``isDeltaTable`` only looks for a
        ``_delta_log`` folder, which a writer creating the table makes before its first commit: two
        first writes at once then saw a table that was not there yet (DELTA_TABLE_NOT_FOUND)."""
        return DeltaLog.is_deltatable(path)

    def _table(self, path: str, session: SparkSession | None = None):
        if not self.exists(path):
            raise TableNotFound(f"no Delta table at {path}")
        return self._DeltaTable.forPath(session or self.spark, path)

    def _own_session(self) -> SparkSession:
        """A clone of the session (its settings, ~3 ms) for one command that passes its commit
        metadata as a session setting: a MERGE has no per-command option for it, and two merges of
        two tables at once in one session would each commit the other's (both measured)."""
        return type(self.spark)(self.spark.sparkContext, self.spark._jsparkSession.cloneSession())

    def schema(self, path: str) -> T.StructType:
        return self._table(path).toDF().schema

    def version(self, path: str) -> int:
        return int(self.history(path, 1)[0]["version"])

    def history(self, path: str, limit: int | None = None) -> list[dict]:
        """Commits, newest first, each with ehrlake's commit information (kept by Delta as the
        commit's ``userMetadata``) spread into it, as the delta-rs engine's commits carry it. Read
        from the log's commit files directly (delta-rs: ~2 ms; DeltaTable.history runs a Spark job)."""
        if not self.exists(path):
            raise TableNotFound(f"no Delta table at {path}")
        out = []
        for commit in DeltaLog(path).history(limit):
            try:
                extra = json.loads(commit.get("userMetadata") or "{}")
            except ValueError:
                extra = {}
            out.append({**commit, **(extra if isinstance(extra, dict) else {})})
        return out

    def row_count(self, path: str) -> int:
        return self._table(path).toDF().count()

    # ----------------------------------------------------------------- reads
    def read(self, path: str, version: int | datetime | None = None) -> DataFrame:
        if not self.exists(path):
            raise TableNotFound(f"no Delta table at {path}")
        reader = self.spark.read.format("delta")
        if isinstance(version, datetime):
            reader = reader.option("timestampAsOf", version.isoformat())
        elif version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(path)

    # ----------------------------------------------------------------- writes
    def create(self, path, schema, partition_by, description=None) -> None:
        """Create an empty table (a no-op when it exists, also when another writer just made it)."""
        missing = [c for c in partition_by if c not in schema.fieldNames()]
        if missing:
            raise SchemaMismatch(f"partition columns {missing} are not in the schema of {path}")
        if self.exists(path):
            return
        columns = T.StructType(
            [T.StructField(f.name, _schema.nullable(f.dataType), True, f.metadata) for f in schema]
        )
        builder = (
            self._DeltaTable.createIfNotExists(self.spark)
            .location(path)
            .addColumns(columns)
            .property(
                "delta.dataSkippingStatsColumns",
                ",".join(f"`{c}`" for c in stats_columns(schema, booleans=False)),
            )
        )
        if partition_by:
            builder = builder.partitionedBy(*partition_by)
        if description:
            builder = builder.comment(description)
        try:
            builder.execute()
        except Exception as exc:
            if not ((_is_conflict(exc) or _CREATING in str(exc)) and self._created_by_another(path)):
                raise

    def _created_by_another(self, path: str, wait_s: float = CREATE_WAIT_S) -> bool:
        """Whether another writer's first commit of the table lands within ``wait_s``: a create that
        lost the race finds the log folder made but not yet committed to. A folder that stays
        without a commit is no Delta table, and the create's own error stands."""
        deadline = time.monotonic() + wait_s
        while not self.exists(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def write(self, df, path, table, mode, partition_by, where, evolve, commit_info) -> CommitResult:
        self.create(path, df.schema, list(partition_by or []))  # a no-op when the table exists
        current = self._table(path)
        # from the log's metadata: DeltaTable.detail() would also count files and bytes, a Spark job
        # that took 3 s a write (bench/engines.py)
        parts = list(DeltaLog(path).metadata().partition_columns)
        check_write(table, parts, mode, partition_by, where)
        aligned, new_fields = _schema.align(df, current.toDF().schema, table, evolve)
        token, operation = uuid.uuid4().hex, "OVERWRITE" if mode is WriteMode.OVERWRITE else "APPEND"
        empty_at = _empty_version(path) if mode is WriteMode.OVERWRITE and not where else None
        commit = self._save(
            aligned, path, table, mode, where, new_fields, commit_info, operation, token, empty_at
        )
        if empty_at is not None and int(commit["version"]) != empty_at + 1:
            # another writer committed between the look and the append: overwrite after it, as a
            # serial order of the two writes would
            token = uuid.uuid4().hex
            commit = self._save(aligned, path, table, mode, where, new_fields, commit_info, operation, token)
        metrics = commit.get("operationMetrics") or {}
        return CommitResult(
            table,
            int(commit["version"]),
            operation,
            files_added=int(metrics.get("numFiles", 0)),
            rows_written=int(metrics.get("numOutputRows", 0)),
        )

    def _save(
        self, aligned, path, table, mode, where, new_fields, commit_info, operation, token, empty_at=None
    ) -> dict:
        """One Delta write of ``aligned``; its commit. An overwrite of a table that holds no file
        (``empty_at``: its version) is written as an append, which replaces the same nothing
        without the overwrite's reconstruction of the table's state (6 Spark jobs against 2, ~0.5 s
        a write on 2 cores, paid by every table of a new lake)."""
        writer = (
            aligned.write.format("delta")
            .mode("append" if empty_at is not None else mode.value)
            .options(**parquet_options(aligned.schema))
            .option("mergeSchema", str(bool(new_fields)).lower())
            .option("userMetadata", _metadata(commit_info, operation, token))
        )
        if where:
            writer = writer.option("replaceWhere", " AND ".join(f"`{k}` = '{v}'" for k, v in where.items()))
        try:
            writer.save(path)
        except Exception as exc:
            if where and "DELTA_REPLACE_WHERE_MISMATCH" in str(exc):
                raise SchemaMismatch(
                    f"rows outside the partition {where} were given to overwrite {table}"
                ) from None
            _raise_known(exc, table)
            raise
        return self._commit_of(path, token)

    def merge_rows(self, rows, schema, path, table, keys, evolve, commit_info) -> CommitResult:
        """A few rows the driver holds, merged as a frame by Delta's MERGE."""
        df = self.spark.createDataFrame(rows, schema)
        return self.merge(df, path, table, keys, None, evolve, commit_info)

    def merge(self, df, path, table, keys, update_when, evolve, commit_info, delete=None) -> CommitResult:
        """Upsert by key (``df`` has at most one row per key), planned again when another writer
        committed first; matched rows are updated where ``update_when`` (over ``t``/``s``) holds."""
        if not self.exists(path):
            self.create(path, df.schema, [])
        for attempt in range(1, MERGE_ATTEMPTS + 1):
            try:
                return self._merge_once(df, path, table, keys, update_when, evolve, commit_info, delete)
            except Exception as exc:
                if not _is_conflict(exc):
                    _raise_known(exc, table)
                    raise
                if attempt == MERGE_ATTEMPTS:
                    raise CommitConflict(
                        f"{table}: {MERGE_ATTEMPTS} attempts lost to other writers' conflicting changes"
                    ) from exc
                time.sleep(random.uniform(0.05, 0.25) * attempt)
        raise AssertionError("unreachable")

    def _merge_once(self, df, path, table, keys, update_when, evolve, commit_info, delete) -> CommitResult:
        """One MERGE; into a table holding no file, an insert-only MERGE. Delta's full MERGE
        materialises its source before reading it again to write (100,000 rows keyed by a Python
        UDF: 4.84 s against 3.54 s insert-only), which every bronze table's first load paid on a new
        lake; an insert-only one reads its source once. Where another writer committed between
        the look and the merge, the rows it matched were left as they were: a full MERGE of the
        same rows follows, which finds the inserted ones unchanged and updates or deletes the rest."""
        empty_at = _empty_version(path)
        first = self._merge_planned(df, path, table, keys, update_when, evolve, commit_info, delete, empty_at)
        if empty_at is None or first.version == empty_at + 1:
            return first
        again = self._merge_planned(df, path, table, keys, update_when, evolve, commit_info, delete, None)
        inserted = first.metrics["inserted"]
        return CommitResult(
            table,
            again.version,
            "MERGE",
            files_added=first.files_added + again.files_added,
            files_removed=again.files_removed,
            rows_written=first.rows_written + again.rows_written,
            metrics={
                **again.metrics,
                "inserted": inserted + again.metrics["inserted"],
                "unchanged": again.metrics["unchanged"] - inserted,
            },
        )

    def _merge_planned(
        self, df, path, table, keys, update_when, evolve, commit_info, delete, empty_at
    ) -> CommitResult:
        session = self._own_session()
        target = self._table(path, session)
        source, new_fields = _schema.align(df, target.toDF().schema, table, evolve)
        if empty_at is not None:
            delete = None  # nothing to delete from a table without rows
        columns = source.columns
        if delete is not None:  # rows to delete ride in the source, marked, so one MERGE commits both
            source = source.withColumn(_GONE, F.lit(False)).unionByName(
                delete.select(
                    *[
                        F.col(f"`{n}`") if n in keys else F.lit(None).cast(source.schema[n].dataType).alias(n)
                        for n in columns
                    ],
                    F.lit(True).alias(_GONE),
                )
            )
        on = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
        builder = target.alias("t").merge(source.alias("s"), on)
        if new_fields:
            builder = builder.withSchemaEvolution()
        if empty_at is not None:
            builder = builder.whenNotMatchedInsertAll()
        elif delete is None:
            builder = (
                builder.whenMatchedUpdateAll(condition=update_when)
                if update_when
                else builder.whenMatchedUpdateAll()
            )
            builder = builder.whenNotMatchedInsertAll()
        else:
            values = {f"`{n}`": f"s.`{n}`" for n in columns}
            kept = f"NOT s.`{_GONE}`"
            builder = (
                builder.whenMatchedDelete(condition=f"s.`{_GONE}`")
                .whenMatchedUpdate(
                    condition=f"{kept} AND ({update_when})" if update_when else kept, set=values
                )
                .whenNotMatchedInsert(condition=kept, values=values)
            )
        token = uuid.uuid4().hex
        session.conf.set(_USER_METADATA, _metadata(commit_info, "MERGE", token))
        builder.execute()
        commit = self._commit_of(path, token)
        m = commit.get("operationMetrics") or {}
        inserted, updated = int(m.get("numTargetRowsInserted", 0)), int(m.get("numTargetRowsUpdated", 0))
        deleted = int(m.get("numTargetRowsDeleted", 0))
        # delete markers are source rows too; each found its target row (they come from the table)
        source_rows = int(m.get("numSourceRows", inserted + updated)) - deleted
        return CommitResult(
            table,
            int(commit["version"]),
            "MERGE",
            files_added=int(m.get("numTargetFilesAdded", 0)),
            files_removed=int(m.get("numTargetFilesRemoved", 0)),
            rows_written=int(m.get("numOutputRows", 0)),
            metrics={
                "inserted": inserted,
                "updated": updated,
                "unchanged": source_rows - inserted - updated,
                "deleted": deleted,
            },
        )

    def optimize(self, path: str, zorder: list[str], commit_info: dict) -> tuple[int, int]:
        """Delta's OPTIMIZE (ZORDER BY ``zorder`` where given), in one commit that changes no
        data; (files removed, files added)."""
        self._table(path)
        by = f" ZORDER BY ({', '.join(f'`{c}`' for c in zorder)})" if zorder else ""
        session = self._own_session()
        session.conf.set(_USER_METADATA, _metadata(commit_info, "OPTIMIZE", uuid.uuid4().hex))
        metrics = session.sql(f"OPTIMIZE delta.`{path}`{by}").first()["metrics"]
        return int(metrics["numFilesRemoved"]), int(metrics["numFilesAdded"])

    def set_properties(self, path: str, properties: dict[str, str]) -> None:
        listed = ", ".join(f"'{k}' = '{v}'" for k, v in properties.items())
        self.spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({listed})")

    def vacuum(self, path: str, retention_hours: int, dry_run: bool) -> list[str]:
        """Delete files not in the current snapshot and older than the retention; the files (those
        that would go, with ``dry_run``)."""
        self._table(path)
        session = self._own_session()
        session.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        # Delta lists the table's directories in a job of spark.sql.sources.parallelPartitionDiscovery
        # .parallelism tasks: Spark's default, 10,000, made each VACUUM of even a one-file table ~20 s
        # of empty tasks on two cores. The cluster's own parallelism lists any table as fast.
        listing = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
        if self.spark.conf.get(listing, None) is None:
            session.conf.set(listing, str(self.spark.sparkContext.defaultParallelism))
        listed = session.sql(f"VACUUM delta.`{path}` RETAIN {retention_hours} HOURS DRY RUN")
        files = [r[0] for r in listed.collect()]
        if not dry_run and files:
            session.sql(f"VACUUM delta.`{path}` RETAIN {retention_hours} HOURS").collect()
        return files

    # ----------------------------------------------------------------- internals
    def _commit_of(self, path: str, token: str) -> dict:
        """The commit carrying ``token``: the latest, unless other processes committed since."""
        latest = self.history(path, 1)
        if latest and latest[0].get(_TOKEN) == token:
            return latest[0]
        for commit in self.history(path, 50):
            if commit.get(_TOKEN) == token:
                return commit
        return self.history(path, 1)[0]  # a write of nothing commits nothing: the table as it is


def _empty_version(path: str) -> int | None:
    """The table's version when it holds no data file (read from its log: a few ms), else None."""
    log = DeltaLog(path)
    return None if log.file_uris() else log.version()


def _metadata(commit_info: dict, operation: str, token: str) -> str:
    """ehrlake's commit information as the delta-rs engine writes it, plus the commit's token."""
    return json.dumps(
        {"ehrlakeOperation": operation, **{k: str(v) for k, v in commit_info.items()}, _TOKEN: token}
    )


def _is_conflict(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(name in text for name in _CONFLICTS)


def _raise_known(exc: Exception, table: str) -> None:
    text = str(exc)
    if _is_conflict(exc):
        raise CommitConflict(
            f"{table}: another writer committed a conflicting change first ({text[:200]})"
        ) from exc
    if "DELTA_METADATA_MISMATCH" in text or "DELTA_FAILED_TO_MERGE_FIELDS" in text:
        raise SchemaMismatch(f"cannot write to {table}: {text.splitlines()[0][:300]}") from exc


__all__ = ["NativeDeltaEngine", "available"]
