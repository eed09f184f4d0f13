"""One obvious entry to storage: read, write, merge, history and vacuum of Delta tables by logical name.

::

    from ehrlake import lake
    lk = lake.open("./lake")
    lk.write(df, "bronze.fhir_patient", mode=lake.WriteMode.APPEND)
    lk.merge(df, "bronze.fhir_patient", keys=["source_system", "id"])
    lk.read("bronze.fhir_patient", version=3)

Two commit engines sit behind this API (see ``_delta_rs`` and ``_native``); both produce standard
Delta tables readable by any Delta reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from ehrlake.errors import ConfigError, EnvironmentProblem
from ehrlake.lake.catalog import LAYERS, TableName, list_tables, table_path
from ehrlake.lake.changes import file_changes
from ehrlake.lake.modes import CommitResult, WriteMode
from ehrlake.session import LAKE_ROOT_SETTING

__all__ = ["Lake", "open", "WriteMode", "CommitResult", "TableName", "TableInfo", "LAYERS"]


@dataclass(frozen=True)
class TableInfo:
    """One line of ``ehrlake lake show``."""

    name: str
    layer: str
    path: str
    version: int
    rows: int
    last_operation: str
    last_commit: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Lake:
    """A lake root, the commit engine that writes to it and, optionally, its keys, policy and audit
    log (:class:`ehrlake.security.Security`; without it nothing can be sealed, opened or read by role)."""

    def __init__(self, root: str, spark: SparkSession, engine: str = "auto", security=None):
        self.root = os.path.abspath(root)
        self.spark = spark
        self.engine = _choose_engine(spark, engine)
        self.security = security

    def use_in_sql(self) -> Lake:
        """Make ``silver.condition`` in this session's SQL and ``spark.table`` name this lake's table
        (the session catalog, session.LAKE_CATALOG). :func:`open` does it for the lake a job or
        notebook opens; a lake built with the constructor (a scratch lake beside it, a test's lake)
        leaves the session's catalog where it was."""
        self.spark.conf.set(LAKE_ROOT_SETTING, self.root)
        return self

    # --------------------------------------------------------------- paths
    def path(self, table: str | TableName) -> str:
        return table_path(self.root, table)

    def exists(self, table: str | TableName) -> bool:
        return self.engine.exists(self.path(table))

    # --------------------------------------------------------------- reads
    def read(
        self,
        table: str,
        version: int | None = None,
        timestamp: datetime | str | None = None,
        role: str | None = None,
        include_estimates: bool = False,
    ) -> DataFrame:
        """The table at its latest version, or as of a version number or a timestamp (time travel).

        With ``role``, the access policy applies: a table the role may not read raises
        :class:`~ehrlake.errors.AccessDenied`, hidden columns are dropped, and the read is audited.
        Sealed identifier columns are never opened by a read (see :meth:`reveal`).
        ``include_estimates`` (silver.observation only): the ANN's active estimates of missing labs
        as rows too, every row with a ``provenance`` of ``observed`` or ``estimated``.
        """
        if include_estimates:
            from ehrlake.lake import provenance

            if str(TableName.parse(table)) != provenance.OBSERVATIONS:
                raise ConfigError(f"include_estimates is for {provenance.OBSERVATIONS}, not {table}")
            return provenance.with_estimates(self, self.read(table, version, timestamp, role), role)
        if role is not None:
            return self._guard().access.read(self, table, role, version=version, timestamp=timestamp)
        if version is not None and timestamp is not None:
            raise ConfigError("give version or timestamp, not both")
        if isinstance(timestamp, str):
            timestamp = datetime.fromisoformat(timestamp)
        return self.engine.read(self.path(table), version if version is not None else timestamp)

    def snapshot(self, table: str) -> DataFrame:
        """``table`` as it is now, pinned to its current version: what a job that goes on to write
        the table must read. A native Delta write rebuilds the cached frames that read the written
        table (Spark 4 invalidates caches by table, SPARK-53732); one read at the latest version
        then holds the job's own new rows, one read at a version the same rows as before."""
        return self.read(table, version=self.version(table))

    def reveal(self, table: str, patient_key: str, role: str, purpose: str) -> DataFrame:
        """One patient's rows with identifiers opened, for a role allowed to reveal; always audited."""
        return self._guard().access.reveal(self, table, role, patient_key, purpose)

    def _guard(self):
        if self.security is None:
            raise ConfigError("this lake was opened without security (keys, access policy, audit log)")
        return self.security

    def schema(self, table: str) -> T.StructType:
        return self.engine.schema(self.path(table))

    def version(self, table: str) -> int:
        return self.engine.version(self.path(table))

    def history(self, table: str, limit: int | None = None) -> list[dict]:
        """Commits, newest first, as the Delta log records them."""
        return self.engine.history(self.path(table), limit)

    def row_count(self, table: str) -> int:
        return self.engine.row_count(self.path(table))

    def tables(self) -> list[TableInfo]:
        """Every table under the root with version, rows and last operation (from the log, not data)."""
        infos = []
        for name in list_tables(self.root):
            path = self.path(name)
            last = self.history(str(name), 1)[0]  # a listed table has at least its create commit
            ts = last.get("timestamp")
            when = (
                datetime.fromtimestamp(ts / 1000).isoformat(timespec="seconds")
                if isinstance(ts, (int, float))
                else str(ts or "")
            )
            infos.append(
                TableInfo(
                    name=str(name),
                    layer=name.layer,
                    path=path,
                    version=int(last["version"]),
                    rows=self.row_count(str(name)),
                    last_operation=str(last.get("ehrlakeOperation") or last.get("operation") or ""),
                    last_commit=when,
                )
            )
        return infos

    # --------------------------------------------------------------- writes
    def create(
        self,
        table: str,
        schema: T.StructType,
        partition_by: list[str] | None = None,
        description: str | None = None,
    ) -> None:
        """Create an empty table with this schema (field metadata included); a no-op if it exists."""
        self.engine.create(self.path(table), schema, list(partition_by or []), description)

    def write(
        self,
        df: DataFrame,
        table: str,
        mode: WriteMode = WriteMode.APPEND,
        partition_by: list[str] | None = None,
        where: dict[str, str] | None = None,
        evolve_schema: bool = False,
        commit_info: dict | None = None,
    ) -> CommitResult:
        """Append or overwrite (the whole table, or the partition ``where={col: value}``) in one commit."""
        if not isinstance(mode, WriteMode):
            raise ConfigError(f"mode must be a WriteMode, not {mode!r}")
        name = str(TableName.parse(table))
        return self.engine.write(
            df, self.path(name), name, mode, partition_by, where, evolve_schema, _commit_info(commit_info)
        )

    def merge(
        self,
        df: DataFrame,
        table: str,
        keys: list[str],
        update_when: str | None = None,
        evolve_schema: bool = False,
        commit_info: dict | None = None,
        delete: DataFrame | None = None,
    ) -> CommitResult:
        """Upsert ``df`` by ``keys``: update matched rows (where ``update_when`` over ``t``/``s`` holds),
        insert the rest; and, in the same commit, delete the rows whose keys ``delete`` holds (a
        frame of the key columns, none of them also in ``df``). ``df`` holds at most one row per key."""
        name = str(TableName.parse(table))
        if delete is not None:
            delete = delete.select(*[f"`{k}`" for k in keys])
        return self.engine.merge(
            df,
            self.path(name),
            name,
            list(keys),
            update_when,
            evolve_schema,
            _commit_info(commit_info),
            delete,
        )

    def merge_rows(
        self,
        rows: list[tuple],
        schema: T.StructType | str,
        table: str,
        keys: list[str],
        evolve_schema: bool = False,
        commit_info: dict | None = None,
    ) -> CommitResult:
        """:meth:`merge` for a few rows the driver holds (``rows``: tuples in ``schema``'s order, at
        most one per key; ``schema`` a StructType or DDL), creating the table where it is absent:
        a job's watermark, a model's drift figures. The delta-rs engine merges them in Arrow
        without a Spark job, reading the table on the driver: for bookkeeping tables of thousands
        of rows, not a patient table; the native engine runs its MERGE."""
        name = str(TableName.parse(table))
        struct = T.DataType.fromDDL(schema) if isinstance(schema, str) else schema
        return self.engine.merge_rows(
            list(rows), struct, self.path(name), name, list(keys), evolve_schema, _commit_info(commit_info)
        )

    def changed_rows(
        self,
        table: str,
        since: int,
        columns: list[str] | None = None,
        until: int | None = None,
        added_only: bool = False,
        appends_only: bool = False,
    ) -> DataFrame | None:
        """``columns`` (default all) of every row in the data files that commits after version
        ``since`` (up to ``until``, default the latest) added or removed: a superset of the rows
        that changed (:mod:`ehrlake.lake.changes`); ``added_only``: of the files added, which are
        rows of the table at ``until``. ``None`` when the log no longer holds that range; with
        ``appends_only``, also when a file the table held at ``since`` was removed, so that the
        rows given (of the files added) are all the table gained and none of what it held changed."""
        until = self.version(table) if until is None else until
        changes = file_changes(self.path(table), since, until)
        if changes is None or (added_only or appends_only) and changes.deletion_vectors:
            return None
        if appends_only and changes.removed:
            return None
        added_only = added_only or appends_only
        columns = self.schema(table).fieldNames() if columns is None else columns
        wanted = T.StructType([f for f in self.schema(table).fields if f.name in columns])
        unknown = set(columns) - set(wanted.fieldNames())
        if unknown:
            raise ConfigError(f"{table} has no columns {sorted(unknown)}")
        files = changes.added if added_only else changes.files
        if not files:
            return self.spark.createDataFrame([], wanted)
        # partition columns come from the files' folder names (col=value), as a table scan's do
        frame = self.spark.read.schema(wanted).option("basePath", self.path(table)).parquet(*files)
        return frame.select(*[f"`{c}`" for c in wanted.fieldNames()])  # discovery adds all partition columns

    def optimize(self, table: str, zorder: list[str] | None = None, commit_info: dict | None = None):
        """Compact small files (or rewrite all of them Z-ordered on ``zorder``) in one commit that
        changes no row; (files removed, files added)."""
        return self.engine.optimize(self.path(table), list(zorder or []), _commit_info(commit_info))

    def set_properties(self, table: str, properties: dict[str, str]) -> None:
        """Set Delta table properties (``delta.logRetentionDuration`` and the like)."""
        self.engine.set_properties(self.path(table), properties)

    def vacuum(self, table: str, retention_hours: int = 168, dry_run: bool = False) -> list[str]:
        """Delete unreferenced files (removed by later commits, or orphans of crashed writers)."""
        return self.engine.vacuum(self.path(table), retention_hours, dry_run)


def _commit_info(extra: dict | None) -> dict:
    from ehrlake.security.grants import current_user  # the uid's user, as the audit log records it

    info = {"ehrlakeUser": current_user()}
    info.update(extra or {})
    return info


def _choose_engine(spark: SparkSession, engine: str):
    from ehrlake.lake import _native

    if engine not in ("auto", "delta-rs", "native"):
        raise ConfigError(f"lake.engine must be auto, delta-rs or native, not {engine!r}")
    # auto is delta-rs until the native engine passes the whole suite (issue 18); native is chosen
    if engine == "native" and _native.available(spark):
        return _native.NativeDeltaEngine(spark)
    if engine == "native":
        raise EnvironmentProblem(
            "lake.engine is native but Delta Lake is not on Spark's class path: `make setup` fetches its "
            "JARs (scripts/delta_jars.sh), or submit with --packages io.delta:delta-spark_4.2_2.13:4.4.0"
        )
    from ehrlake.lake._delta_rs import DeltaRsEngine

    return DeltaRsEngine(spark)


def open(root: str | None = None, spark: SparkSession | None = None, config=None) -> Lake:  # noqa: A001
    """Open the lake at ``root`` (default: the configured root) with the configuration's engine and
    security, building a session if needed: the one way jobs, the CLI and benchmarks get a lake.
    A root that exists but cannot be used, or cannot be created, is a one-line error up front."""
    from ehrlake import config as config_module
    from ehrlake.security import Security
    from ehrlake.session import get_spark

    config = config or config_module.load()
    root = str(root or config.lake.root)
    parent = os.path.dirname(os.path.abspath(root))
    if os.path.exists(root) and not (os.path.isdir(root) and os.access(root, os.R_OK | os.W_OK | os.X_OK)):
        raise ConfigError(f"lake root {root} is not a readable and writable directory")
    if not os.path.exists(root) and not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot create the lake root {root}: {parent} is not writable")
    spark = spark or get_spark(config)
    return Lake(root, spark, config.lake.engine, Security.from_config(config.security, root)).use_in_sql()
