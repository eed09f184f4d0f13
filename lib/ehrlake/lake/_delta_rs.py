"""The delta-rs commit engine: Spark writes Parquet, the driver commits it to the Delta log.

Why: the Delta Lake JARs cannot be fetched on every machine, but ``deltalake`` (delta-rs) can commit
files that Spark wrote. A write goes in two phases:

1. **stage**: Spark writes the rows as Parquet under ``<table>/_staging/<txn>/``, then the driver
   moves each file to its final place (``<table>/<col>=<value>/part-...``) and reads its footer for
   Delta statistics. Files placed but not yet committed are invisible orphans; ``vacuum`` removes them.
2. **commit**: one Delta transaction with the AddActions (and RemoveActions for overwrite/merge),
   based on the snapshot version the write was planned against. If another writer committed a
   conflicting change meanwhile, delta-rs refuses and we raise :class:`CommitConflict`.

A merge reads the table to decide insert or update, so it may commit only on the very snapshot it
read: its commit is never rebased (delta-rs would rebase a merge's adds like a blind append, and two
concurrent ingests of the same patients would both insert them). When another writer got there
first, the merge is planned again on the new snapshot, up to :data:`MERGE_ATTEMPTS` times.

The driver handles file names and footers only, never rows, so its memory stays flat as data grows.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable, Field, Schema
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, CommitProperties, RemoveAction
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import CommitConflict, SchemaMismatch, TableNotFound
from ehrlake.lake import _schema
from ehrlake.lake.modes import CommitResult, WriteMode, check_write
from ehrlake.lake.stats import parquet_options, stats_json

_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_FILE_COL = "_ehrlake_source_file"
_GONE = "_ehrlake_deleted"  # a merge's row to delete, not to update
_UPDATES = "_ehrlake_updates"  # a merge's source row that matched and meets update_when
MERGE_ATTEMPTS = 8  # a merge that keeps losing the race to other writers gives up after this many
APPEND_RETRIES = 5  # blind appends and overwrites may be rebased onto newer snapshots


class DeltaRsEngine:
    """Standard Delta tables written by Spark and committed with delta-rs."""

    name = "delta-rs"

    def __init__(self, spark: SparkSession):
        self.spark = spark

    # ----------------------------------------------------------------- table state
    def exists(self, path: str) -> bool:
        return DeltaTable.is_deltatable(path)

    def _open(self, path: str, version: int | datetime | None = None) -> DeltaTable:
        try:
            table = DeltaTable(path)
        except TableNotFoundError as exc:
            raise TableNotFound(f"no Delta table at {path}") from exc
        if version is not None:
            table.load_as_version(version)
        return table

    def schema(self, path: str) -> T.StructType:
        return _schema.from_delta_json(self._open(path).schema().to_json())

    def version(self, path: str) -> int:
        return self._open(path).version()

    def history(self, path: str, limit: int | None = None) -> list[dict]:
        return self._open(path).history(limit)

    def row_count(self, path: str) -> int:
        """Rows in the current snapshot, summed from file statistics (no data is read)."""
        return sum(int(a["num_records"] or 0) for a in _add_actions(self._open(path)))

    # ----------------------------------------------------------------- reads
    def read(self, path: str, version: int | datetime | None = None) -> DataFrame:
        return self._scan(self._open(path, version), path)

    def _scan(self, table: DeltaTable, path: str, with_file: bool = False) -> DataFrame:
        """The snapshot's rows in table column order, optionally tagged with their data file."""
        schema = _schema.from_delta_json(table.schema().to_json())
        files = table.file_uris()
        if not files:
            return self.spark.createDataFrame([], schema)
        df = self.spark.read.schema(schema).option("basePath", path).parquet(*files)
        columns = [F.col(f"`{n}`") for n in schema.fieldNames()]
        if with_file:
            columns.append(F.col("_metadata.file_path").alias(_FILE_COL))
        return df.select(*columns)

    def _read_with_file(self, table: DeltaTable, path: str) -> tuple[DataFrame, dict[str, dict]]:
        """The snapshot's rows tagged with their data file, plus each file's add-action facts."""
        by_abs = {_norm(os.path.join(path, urllib.parse.unquote(a["path"]))): a for a in _add_actions(table)}
        return self._scan(table, path, with_file=True), by_abs

    # ----------------------------------------------------------------- writes
    def create(
        self, path: str, schema: T.StructType, partition_by: list[str], description: str | None = None
    ) -> None:
        """Create an empty table; a no-op when it exists already (so jobs can call it every run, and
        two jobs creating it at once both go on with the one that won)."""
        missing = [c for c in partition_by if c not in schema.fieldNames()]
        if missing:
            raise SchemaMismatch(f"partition columns {missing} are not in the schema of {path}")
        try:
            DeltaTable.create(
                path,
                Schema.from_json(_schema.to_delta_json(schema)),
                partition_by=partition_by or None,
                mode="ignore",
                description=description,
            )
        except CommitFailedError:
            if not self.exists(path):
                raise

    def write(
        self,
        df: DataFrame,
        path: str,
        table: str,
        mode: WriteMode,
        partition_by: list[str] | None,
        where: dict[str, str] | None,
        evolve: bool,
        commit_info: dict,
    ) -> CommitResult:
        if not self.exists(path):
            self.create(path, df.schema, list(partition_by or []))
        dt, df = self._prepare(df, path, table, evolve)
        parts = dt.metadata().partition_columns
        check_write(table, parts, mode, partition_by, where)
        adds = self._stage(df, path, parts)
        if where:
            stray = [
                a.path for a in adds if any(a.partition_values.get(k) != str(v) for k, v in where.items())
            ]
            if stray:
                self._discard(path, adds)
                raise SchemaMismatch(f"rows outside the partition {where} were given to overwrite {table}")
        filters = [(k, "=", str(v)) for k, v in where.items()] if where else None
        operation = "OVERWRITE" if mode is WriteMode.OVERWRITE else "APPEND"
        version = self._commit(dt, path, table, adds, [], mode.value, filters, operation, commit_info)
        return CommitResult(
            table=table,
            version=version,
            operation=operation,
            files_added=len(adds),
            rows_written=_rows(adds),
        )

    def merge(
        self,
        df: DataFrame,
        path: str,
        table: str,
        keys: list[str],
        update_when: str | None,
        evolve: bool,
        commit_info: dict,
        delete: DataFrame | None = None,
    ) -> CommitResult:
        """Upsert by key with copy-on-write: only files holding rows to update or delete are rewritten.

        Contract: ``df`` has at most one row per key (callers deduplicate first). ``update_when`` is
        a SQL condition over aliases ``t`` (target) and ``s`` (source); matched rows where it is
        false stay as they are, unmatched source rows are inserted. Safe against concurrent writers
        (see the module docstring): planned again when another commit lands first.
        """
        if not self.exists(path):
            self.create(path, df.schema, [])
        return _planned_again(
            lambda: self._merge_once(df, path, table, keys, update_when, evolve, commit_info, delete)
        )

    def _merge_once(self, df, path, table, keys, update_when, evolve, commit_info, delete) -> CommitResult:
        dt, source = self._prepare(df, path, table, evolve)
        parts = dt.metadata().partition_columns
        if not dt.file_uris():  # empty table: every row is an insert, counted from file stats
            adds = self._stage(source, path, parts)
            version = self._commit(
                dt, path, table, adds, [], "append", None, "MERGE", commit_info, strict=True
            )
            metrics = {"inserted": _rows(adds), "updated": 0, "unchanged": 0, "deleted": 0}
            return CommitResult(table, version, "MERGE", len(adds), 0, _rows(adds), metrics)
        source, found, to_update = source.persist(), None, None
        try:
            source_rows = source.count()
            target, by_abs = self._read_with_file(dt, path)
            t, s = target.alias("t"), source.alias("s")
            on = [F.col(f"t.`{k}`").eqNullSafe(F.col(f"s.`{k}`")) for k in keys]
            # the table is joined once, for the source rows it holds (their file, whether they
            # update): an inner join, so a small source can be broadcast and the table is read
            # without a shuffle. The inserts are the source rows not among those found, a join of
            # two small sides; an anti-join of the source with the whole table read it again.
            updates = F.coalesce(F.expr(update_when), F.lit(False)) if update_when else F.lit(True)
            found = t.join(s, on, "inner").select(
                F.col(f"t.{_FILE_COL}").alias(_FILE_COL),
                updates.alias(_UPDATES),
                *[F.col(f"s.`{n}`").alias(n) for n in source.columns],
            )
            found = found.persist()
            to_update = found.where(F.col(_UPDATES)).select(
                _FILE_COL, F.lit(False).alias(_GONE), *[F.col(f"`{n}`") for n in source.columns]
            )
            if delete is not None:  # rows to delete ride along, marked, with nulls for their values
                gone = t.join(
                    delete.alias("d"), [F.col(f"t.`{k}`").eqNullSafe(F.col(f"d.`{k}`")) for k in keys]
                )
                to_update = to_update.unionByName(
                    gone.select(
                        F.col(f"t.{_FILE_COL}").alias(_FILE_COL),
                        F.lit(True).alias(_GONE),
                        *[
                            F.col(f"t.`{n}`").alias(n)
                            if n in keys
                            else F.lit(None).cast(source.schema[n].dataType).alias(n)
                            for n in source.columns
                        ],
                    )
                )
                # the deletions' join read once for the count below and the rewrite; without
                # them, to_update is a filter of the cached found and is not cached again
                to_update = to_update.persist()
            # One row per touched data file: bounded by the file count, never by rows.
            per_file = to_update.groupBy(_FILE_COL).agg(
                F.sum((~F.col(_GONE)).cast("int")).alias("updated"),
                F.sum(F.col(_GONE).cast("int")).alias("deleted"),
            )
            touched_raw = {r[_FILE_COL]: (r["updated"], r["deleted"]) for r in per_file.collect()}
            touched = {_norm(raw): n for raw, n in touched_raw.items()}
            unknown = [f for f in touched if f not in by_abs]
            if unknown:
                raise CommitConflict(f"{table}: data files {unknown[:3]} are not in snapshot {dt.version()}")
            held = found.select(*[F.col(f"`{k}`") for k in keys]).alias("h")
            inserts = s.join(
                held, [F.col(f"s.`{k}`").eqNullSafe(F.col(f"h.`{k}`")) for k in keys], "left_anti"
            ).select(*[F.col(f"s.`{n}`") for n in source.columns])
            keep = (
                (
                    target.where(F.col(_FILE_COL).isin(list(touched_raw)))
                    .alias("t")
                    .join(
                        to_update.alias("u"),
                        [F.col(f"t.`{k}`").eqNullSafe(F.col(f"u.`{k}`")) for k in keys],
                        "left_anti",
                    )
                    .select(*[F.col(f"t.`{n}`") for n in source.columns])
                )
                if touched
                else None
            )
            out = inserts.unionByName(to_update.where(~F.col(_GONE)).drop(_FILE_COL, _GONE))
            if keep is not None:
                out = out.unionByName(keep)
            adds = self._stage(out, path, parts)
            removes = self._removes_for(dt, [by_abs[f] for f in touched])
            version = self._commit(
                dt, path, table, adds, removes, "append", None, "MERGE", commit_info, strict=True
            )
            updated = sum(u for u, _ in touched.values())
            deleted = sum(d for _, d in touched.values())
            rewritten = sum(int(by_abs[f]["num_records"] or 0) for f in touched)
            inserted = _rows(adds) - rewritten + deleted
            metrics = {
                "inserted": inserted,
                "updated": updated,
                "unchanged": source_rows - inserted - updated,
                "deleted": deleted,
            }
            return CommitResult(table, version, "MERGE", len(adds), len(removes), _rows(adds), metrics)
        finally:  # a conflict retries: what this attempt cached goes either way
            source.unpersist()
            for cached in (found, to_update):
                if cached is not None:
                    cached.unpersist()

    def merge_rows(
        self,
        rows: list[tuple],
        schema: T.StructType,
        path: str,
        table: str,
        keys: list[str],
        evolve: bool,
        commit_info: dict,
    ) -> CommitResult:
        """Upsert a few rows the driver holds (at most one per key) with delta-rs's own merge, in
        Arrow on the driver: no Spark job. A job's watermark or a model's drift figures took ~1.1 s
        as a Spark merge (ten jobs for one row), ~0.03 s so. Keys match null-safely; matched rows
        are updated, the rest inserted. Planned again when another writer committed first."""
        if not self.exists(path):
            self.create(path, schema, [])
        on = " AND ".join(f'(t."{k}" IS NOT DISTINCT FROM s."{k}")' for k in keys)  # DataFusion SQL
        named = [dict(zip(schema.fieldNames(), r, strict=True)) for r in rows]
        return _planned_again(
            lambda: self._merge_rows_once(named, schema, path, table, on, evolve, commit_info)
        )

    def _merge_rows_once(self, named, schema, path, table, on, evolve, commit_info) -> CommitResult:
        dt = self._open(path)
        new = _schema.new_columns(schema, _schema.from_delta_json(dt.schema().to_json()), table, evolve)
        if new:
            dt = self._add_columns(dt, path, new)
        source = pa.Table.from_pylist(named, schema=pa.schema(dt.schema().to_arrow()))
        props = CommitProperties(custom_metadata=_custom_metadata("MERGE", commit_info), max_commit_retries=0)
        try:
            done = (
                dt.merge(source, on, source_alias="s", target_alias="t", commit_properties=props)
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
        except CommitFailedError as exc:
            raise CommitConflict(
                f"{table}: another writer committed a conflicting change first; this MERGE was not "
                f"committed and can be retried ({exc})"
            ) from exc
        metrics = {
            "inserted": int(done["num_target_rows_inserted"]),
            "updated": int(done["num_target_rows_updated"]),
            "unchanged": 0,  # every matched row is written again
            "deleted": 0,
        }
        return CommitResult(
            table,
            self._open(path).version(),
            "MERGE",
            int(done["num_target_files_added"]),
            int(done["num_target_files_removed"]),
            int(done["num_output_rows"]),
            metrics,
        )

    def optimize(self, path: str, zorder: list[str], commit_info: dict) -> tuple[int, int]:
        """Small files bin-packed into larger ones (or all rewritten Z-ordered on ``zorder``) by
        delta-rs, in one commit that changes no data; (files removed, files added)."""
        table = self._open(path)
        props = CommitProperties(custom_metadata=_custom_metadata("OPTIMIZE", commit_info))
        if zorder:
            metrics = table.optimize.z_order(zorder, commit_properties=props)
        else:
            metrics = table.optimize.compact(commit_properties=props)
        return int(metrics["numFilesRemoved"]), int(metrics["numFilesAdded"])

    def set_properties(self, path: str, properties: dict[str, str]) -> None:
        self._open(path).alter.set_table_properties(properties)

    def vacuum(self, path: str, retention_hours: int, dry_run: bool) -> list[str]:
        """Delete files not in the current snapshot and older than the retention (orphans included)."""
        table = self._open(path)
        removed = table.vacuum(
            retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False, full=True
        )
        staging = os.path.join(path, "_staging")
        if os.path.isdir(staging):
            cutoff = time.time() - retention_hours * 3600
            for entry in os.listdir(staging):
                full = os.path.join(staging, entry)
                if os.path.getmtime(full) <= cutoff:
                    removed.append(os.path.join("_staging", entry))
                    if not dry_run:
                        self._hadoop_fs(full).delete(self._jpath(full), True)
        return removed

    # ----------------------------------------------------------------- internals
    def _prepare(self, df: DataFrame, path: str, table: str, evolve: bool) -> tuple[DeltaTable, DataFrame]:
        dt = self._open(path)
        table_schema = _schema.from_delta_json(dt.schema().to_json())
        aligned, new_fields = _schema.align(df, table_schema, table, evolve)
        if new_fields:
            dt = self._add_columns(dt, path, new_fields)
        return dt, aligned

    def _add_columns(self, dt: DeltaTable, path: str, fields: list[T.StructField]) -> DeltaTable:
        """The table with ``fields`` added (schema evolution), opened again."""
        dt.alter.add_columns([Field.from_json(json.dumps(f.jsonValue())) for f in fields])
        return self._open(path)

    def _stage(self, df: DataFrame, path: str, partition_by: list[str]) -> list[AddAction]:
        """Phase 1: write Parquet with Spark, move files into the table, return their AddActions."""
        staging = os.path.join(path, "_staging", uuid.uuid4().hex)
        writer = df.write.mode("overwrite").options(**parquet_options(df.schema))
        if partition_by:
            writer = writer.partitionBy(*partition_by)
        writer.parquet(staging)
        fs = self._hadoop_fs(staging)
        files = []
        iterator = fs.listFiles(self._jpath(staging), True)
        while iterator.hasNext():
            status = iterator.next()
            name = status.getPath().getName()
            if name.endswith(".parquet") and not name.startswith(("_", ".")):
                full = _norm(status.getPath().toUri().getPath())
                files.append((full, os.path.relpath(full, staging), status.getLen()))
        with ThreadPoolExecutor(max_workers=8) as pool:
            metas = list(pool.map(lambda f: _footer(f[0]), files))
        adds = []
        now = int(time.time() * 1000)
        for (full, rel, size), meta in zip(files, metas, strict=True):
            if meta.num_rows == 0:
                continue
            target = os.path.join(path, rel)
            fs.mkdirs(self._jpath(os.path.dirname(target)))
            if not fs.rename(self._jpath(full), self._jpath(target)):
                raise CommitConflict(f"could not move staged file {full} into {path}")
            adds.append(
                AddAction(
                    path=urllib.parse.quote(rel, safe="/="),
                    size=size,
                    partition_values=_partition_values(rel, partition_by),
                    modification_time=now,
                    data_change=True,
                    stats=stats_json(meta),
                )
            )
        fs.delete(self._jpath(staging), True)
        return adds

    def _commit(
        self, dt, path, table, adds, removes, mode, filters, operation, commit_info, strict: bool = False
    ) -> int:
        """Phase 2: one Delta transaction; a conflict discards our staged files and raises.
        ``strict``: commit only as the version right after ``dt``'s (a merge, planned on ``dt``)."""
        if not adds and not removes and mode == "append":
            return dt.version()  # nothing to commit: no empty versions in the log
        info = _custom_metadata(operation, commit_info)
        retries = 0 if strict else APPEND_RETRIES
        try:
            dt.create_write_transaction(
                adds + removes,
                mode=mode,
                schema=dt.schema(),
                partition_by=dt.metadata().partition_columns or None,
                partition_filters=filters,
                commit_properties=CommitProperties(custom_metadata=info, max_commit_retries=retries),
            )
        except CommitFailedError as exc:
            self._discard(path, adds)
            raise CommitConflict(
                f"{table}: another writer committed a conflicting change first; this {operation} was not "
                f"committed and can be retried ({exc})"
            ) from exc
        return self._open(path).version()

    @staticmethod
    def _removes_for(dt: DeltaTable, actions: list[dict]) -> list[RemoveAction]:
        """RemoveActions for snapshot files (dicts as :func:`_add_actions` returns them)."""
        parts = dt.metadata().partition_columns
        now = int(time.time() * 1000)
        return [
            RemoveAction(
                path=a["path"],
                data_change=True,
                deletion_timestamp=now,
                size=a["size_bytes"],
                partition_values={k: a.get(f"partition.{k}") for k in parts} or None,
            )
            for a in actions
        ]

    def _discard(self, path: str, adds: list[AddAction]) -> None:
        for add in adds:
            full = os.path.join(path, urllib.parse.unquote(add.path))
            self._hadoop_fs(full).delete(self._jpath(full), False)

    def _jpath(self, path: str):
        return self.spark._jvm.org.apache.hadoop.fs.Path(path)

    def _hadoop_fs(self, path: str):
        conf = self.spark._jsc.hadoopConfiguration()
        return self._jpath(path).getFileSystem(conf)


def _planned_again(attempt: Callable[[], CommitResult]) -> CommitResult:
    """``attempt()`` (a merge planned on the snapshot it reads), again on a newer snapshot each time
    it loses to another writer (:class:`CommitConflict`), up to :data:`MERGE_ATTEMPTS` times."""
    for n in range(1, MERGE_ATTEMPTS + 1):
        try:
            return attempt()
        except CommitConflict:
            if n == MERGE_ATTEMPTS:
                raise
            time.sleep(random.uniform(0.05, 0.25) * n)  # jitter: racing writers spread out
    raise AssertionError("unreachable")


def _norm(uri: str) -> str:
    """Comparable local path for a URI or path Spark or delta-rs printed."""
    parsed = urllib.parse.urlparse(uri)
    return os.path.normpath(urllib.parse.unquote(parsed.path if parsed.scheme else uri))


def _custom_metadata(operation: str, commit_info: dict) -> dict[str, str]:
    """ehrlake's commit information as a delta-rs commit carries it (``Lake.history`` reads it)."""
    return {"ehrlakeOperation": operation, **{k: str(v) for k, v in commit_info.items()}}


def _add_actions(table: DeltaTable) -> list[dict]:
    """The snapshot's add actions (one dict per data file: path, size_bytes, num_records, partition.*)."""
    return pa.table(table.get_add_actions(flatten=True)).to_pylist()


def _footer(path: str) -> pq.FileMetaData:
    fs, inner = pafs.FileSystem.from_uri(path if "://" in path else "file://" + os.path.abspath(path))
    with fs.open_input_file(inner) as handle:
        return pq.ParquetFile(handle).metadata


def _partition_values(rel: str, partition_by: list[str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for part in rel.split("/")[:-1]:
        key, _, value = part.partition("=")
        value = urllib.parse.unquote(value)
        values[key] = None if value == _HIVE_NULL else value
    return {k: values.get(k) for k in partition_by}


def _rows(adds: list[AddAction]) -> int:
    return sum(json.loads(a.stats)["numRecords"] for a in adds)
