"""Ingest EHR dumps into bronze Delta tables; every bad record lands in ``ops.quarantine``.

``run(lake, SourceKind.FHIR_NDJSON, "dump/")`` reads only files not ingested before, types and
validates every record, merges the newest version of each record into its bronze table, and
returns an :class:`IngestReport` whose counts add up. Re-running after a crash gives the same tables:
every write is a keyed merge, and a file is marked as ingested only after all its tables committed.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.config import source_system_name
from ehrlake.errors import ConfigError
from ehrlake.ingest import extract as extracts
from ehrlake.ingest import fhir, fhir_views, images, quarantine, synthea
from ehrlake.ingest import fhir_model as model
from ehrlake.ingest.csv_tables import UPDATE_WHEN as CSV_UPDATE_WHEN
from ehrlake.ingest.csv_tables import CsvCatalog, column_drift, parse_header, type_rows
from ehrlake.ingest.lineage import keep_newest
from ehrlake.ingest.report import UNPARSED, EntityCounts, IngestReport
from ehrlake.ingest.sources import (
    FILE_LOG,
    FILE_LOG_KEYS,
    FILE_LOG_SCHEMA,
    UNREADABLE_INDEX,
    SourceKind,
    find_inputs,
    first_line,
    new_files,
    read_records,
    table_stem,
)
from ehrlake.lake.catalog import list_tables
from ehrlake.security.protection import Sealing, TableProtection
from ehrlake.views import ISSUES

__all__ = ["run", "SourceKind", "IngestReport", "EntityCounts"]

RUNS_TABLE = "ops.ingest_runs"
PARTITION_BY = ["source_system"]  # merges and re-ingests of one hospital touch only its partition


@dataclass
class _Output:
    """Typed rows for one bronze table (with ``_reason``/``_message``) and how to merge them."""

    table: str
    rows: DataFrame
    keys: list[str]
    update_when: str
    newest_first: list = field(default_factory=list)  # order among rows of one key; ties: later file/line
    quarantine_only: bool = False  # rows of an unknown CSV table: every one fails, nothing to load
    protection: TableProtection | None = None  # default: the declaration in security/protection.py

    def dedupe(self, rows: DataFrame) -> DataFrame:
        return keep_newest(rows, self.keys, self.newest_first)


def run(
    lake,
    kind: SourceKind,
    input_path: str,
    source_system: str | None = None,
    batch_lines: int = 5000,
    run_id: str | None = None,
    encrypt: bool = True,
    role: str | None = None,
    extract: str | None = None,
    follow_links: bool = False,
) -> IngestReport:
    """Ingest every new file of ``kind`` under ``input_path`` into the lake (see module docstring).

    ``extract`` names the declaration of a ``csv-extract`` source (``conf/extracts/<name>.yaml``, or
    a YAML path); its ``source_system`` is the default one. Otherwise the default is ``local``.
    A symbolic link leading out of ``input_path`` is skipped (and named in the report's notes)
    unless ``follow_links``.

    Identifiers and raw records are sealed with the lake's keys (``lake.security``), the ``role``
    (default: the configured one) must be allowed to write bronze and ops, and every table written
    is recorded in the audit log. ``encrypt=False`` exists only to measure what encryption costs
    (``bench/crypto.py``) and is refused on a lake that already holds sealed tables.
    """
    kind = SourceKind(kind)
    catalog = _catalog(kind, extract)
    if source_system is None:
        source_system = extracts.load(extract).source_system if extract else "local"
    source_system = source_system_name(source_system)
    protector = _protector(lake, encrypt)
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    run_id = run_id or f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    security = lake.security if encrypt else None
    inputs = find_inputs(input_path, kind, follow_links)
    args = (lake, kind, catalog, input_path, inputs, source_system, batch_lines, run_id, started, protector)
    if security is None:
        return _ingest(*args)
    with security.job("ingest", ["bronze", "ops"], role, run_id) as (_, written):
        report = _ingest(*args)
        written += [(name, json.dumps(asdict(c))) for name, c in sorted(report.entities.items())]
    return report


def _catalog(kind: SourceKind, extract: str | None) -> CsvCatalog | None:
    if kind is SourceKind.CSV_EXTRACT:
        if not extract:
            known = ", ".join(extracts.available())
            raise ConfigError(f"a csv-extract source needs its declaration (--extract NAME; known: {known})")
        return extracts.load(extract).catalog
    if extract:
        raise ConfigError(f"--extract applies to csv-extract sources, not {kind.value}")
    return synthea.CATALOG if kind is SourceKind.SYNTHEA_CSV else None


def _ingest(
    lake, kind, catalog, input_path, inputs, source_system, batch_lines, run_id, started, protector
) -> IngestReport:
    files = inputs.files
    if catalog is not None:
        files = [f for f in files if not catalog.is_ignored(table_stem(f.path))]
    todo = new_files(lake, kind, source_system, files)
    report = IngestReport(run_id, kind.value, source_system, input_path, lake.root, len(files), len(todo))
    if inputs.links_not_followed:
        report.notes.append(
            "link(s) leading out of the input folder, not followed (--follow-links to read them): "
            + ", ".join(inputs.links_not_followed)
        )
    if not todo:
        return report
    # the run is on record before it writes anything, so every row it writes names a known run;
    # a run killed midway stays "running" (its process gone), a failed one says "failed"
    commit_info = {"ehrlakeRunId": run_id, "ehrlakeJob": "ingest"}
    _record_run(lake, report, started, commit_info, RUNNING)
    try:
        _load(lake, kind, catalog, todo, source_system, batch_lines, run_id, started, protector, report)
    except Exception:
        _record_run(lake, report, started, commit_info, FAILED)
        raise
    _record_run(lake, report, started, commit_info, FINISHED)
    return report


def _load(lake, kind, catalog, todo, source_system, batch_lines, run_id, started, protector, report) -> None:
    """Read, type, merge and quarantine the new files ``todo``, filling ``report``."""
    spark = lake.spark
    now = F.lit(started).cast("timestamp")
    if kind is SourceKind.IMAGES:
        decoded = images.read_images(spark, todo, report.input, images.load_spec())
        records = images.type_rows(decoded, source_system, run_id, now).persist(StorageLevel.MEMORY_AND_DISK)
        outputs, early_bad = [_Output(images.TABLE, records, images.KEYS, images.UPDATE_WHEN)], None
    elif catalog is not None:
        records = read_records(spark, todo, whole_file=False, batch_lines=batch_lines)
        # line 1 is the header; a file that cannot be read is one row at UNREADABLE_INDEX
        records = records.where("record_index > 1 OR read_error IS NOT NULL").persist(
            StorageLevel.MEMORY_AND_DISK
        )
        outputs, early_bad = _csv_outputs(catalog, records, todo, source_system, run_id, now, report), None
    else:
        records = read_records(
            spark, todo, whole_file=kind is SourceKind.FHIR_BUNDLES, batch_lines=batch_lines
        )
        records = fhir.explode_bundles(records)  # NDJSON too: a Bundle exported as one line
        records = fhir.classify(records, source_system).persist(StorageLevel.MEMORY_AND_DISK)
        outputs = None  # built after the census, for the tables the input feeds
        early_bad = quarantine.rows(
            records.where("_reason IS NOT NULL"), kind.value, F.col("entity"), run_id, now
        )
    census = _census(records, catalog, kind)
    if census.unreadable:
        report.notes.append(f"file(s) that could not be read (quarantined): {', '.join(census.unreadable)}")
    if census.files is not None:
        report.empty_files = sorted(os.path.basename(f.path) for f in todo if f.path not in census.files)
    if report.empty_files:
        report.notes.append(
            f"file(s) without a single record (nothing to load): {', '.join(report.empty_files)}"
        )
    if outputs is None:
        outputs = _fhir_outputs(records, run_id, now, set(census.valid))
    report.records_read = census.total
    outputs = [out for out in outputs if out.table in census.valid]
    commit_info = {"ehrlakeRunId": run_id, "ehrlakeJob": "ingest"}
    bad_parts = [early_bad] if census.envelope_bad else []
    merged: dict[str, dict] = {}
    for out in outputs:  # cached by the outcome count, then reused by the merge and the quarantine
        out.rows = out.rows.persist(StorageLevel.MEMORY_AND_DISK)
    failed, with_issues = _outcomes(outputs)
    for out in outputs:
        if not out.quarantine_only:
            good = out.dedupe(out.rows.where("_reason IS NULL").drop("_reason", "_message"))
            good = _protect(protector, good, out.table, out.keys, out.protection)
            lake.create(out.table, good.schema, PARTITION_BY)
            result = lake.merge(
                good, out.table, out.keys, out.update_when, evolve_schema=True, commit_info=commit_info
            )
            merged[out.table] = result.metrics
        if failed.get(out.table):
            bad = out.rows.where("_reason IS NOT NULL")
            bad_parts.append(quarantine.rows(bad, kind.value, F.lit(out.table), run_id, now))
    quarantined = _quarantine(lake, protector, bad_parts, commit_info)
    _fill_report(report, census, merged, quarantined)
    for table, count in with_issues.items():
        report.entity(table).with_issues = count
    _mark_ingested(lake, kind, source_system, todo, run_id, now, commit_info)
    records.unpersist()
    for out in outputs:
        out.rows.unpersist()


def _outcomes(outputs: list[_Output]) -> tuple[dict[str, int], dict[str, int]]:
    """Per table, in one job: rows that failed typing (quarantined) and loaded rows with
    conformance issues. Only tables with failures then take part in the quarantine write."""
    if not outputs:
        return {}, {}
    parts = []
    for out in outputs:
        issue = F.size(ISSUES) > 0 if ISSUES in out.rows.columns else F.lit(False)
        parts.append(
            out.rows.select(
                F.lit(out.table).alias("table"),
                F.col("_reason").isNotNull().cast("int").alias("bad"),
                (F.col("_reason").isNull() & issue).cast("int").alias("issue"),
            )
        )
    rows = (
        _union(parts).groupBy("table").agg(F.sum("bad").alias("bad"), F.sum("issue").alias("issue")).collect()
    )
    return {r["table"]: int(r["bad"]) for r in rows}, {
        r["table"]: int(r["issue"]) for r in rows if r["issue"]
    }


@dataclass
class _Census:
    """Counted once, up front: records read, valid records per target table, envelope failures."""

    total: int
    valid: dict[str, int]
    envelope_bad: dict[str, int]
    files: set[str] | None = None  # files that gave at least one record (None: not counted per file)
    unreadable: list[str] = field(default_factory=list)  # files (or their rest) that could not be read


def _census(records: DataFrame, catalog: CsvCatalog | None, kind: SourceKind) -> _Census:
    if kind is SourceKind.IMAGES:  # one table; decoding failures are quarantined from it
        total = records.count()
        return _Census(total, {images.TABLE: total}, {})
    unreadable = (F.col("record_index") == UNREADABLE_INDEX).alias("unreadable")
    if catalog is not None:  # CSV: every line goes to its file's table; failures come later
        rows = records.groupBy("source_file", unreadable).count().collect()
        valid: dict[str, int] = defaultdict(int)
        for r in rows:
            valid[catalog.table_for(table_stem(r["source_file"]))] += r["count"]
        readable = {r["source_file"] for r in rows if not r["unreadable"]}
        return _Census(sum(r["count"] for r in rows), dict(valid), {}, readable, _names(rows))
    # files x tables rows reach the driver: bounded by the input's file count, never by its records
    rows = (
        records.groupBy("entity", F.col("_reason").isNull().alias("ok"), "source_file", unreadable)
        .count()
        .collect()
    )
    valid: dict[str, int] = defaultdict(int)
    bad: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["ok"]:
            valid[r["entity"]] += r["count"]
        else:
            bad[r["entity"] or UNPARSED] += r["count"]
    readable = {r["source_file"] for r in rows if not r["unreadable"]}
    return _Census(sum(r["count"] for r in rows), dict(valid), dict(bad), readable, _names(rows))


def _names(census_rows) -> list[str]:
    return sorted({os.path.basename(r["source_file"]) for r in census_rows if r["unreadable"]})


def _fill_report(
    report: IngestReport, census: _Census, merged: dict[str, dict], quarantined: dict[str, int]
) -> None:
    """records_in = valid + envelope failures; what was valid but failed typing is quarantined too."""
    for table in set(census.valid) | set(census.envelope_bad) | set(quarantined):
        counts = report.entity(table)
        counts.records_in = census.valid.get(table, 0) + census.envelope_bad.get(table, 0)
        counts.quarantined = quarantined.get(table, 0)
        metrics = merged.get(table, {"inserted": 0, "updated": 0, "unchanged": 0})
        counts.inserted, counts.updated, counts.unchanged = (
            metrics["inserted"],
            metrics["updated"],
            metrics["unchanged"],
        )
        counts.duplicate = counts.records_in - counts.quarantined - sum(metrics.values())


def _fhir_outputs(classified: DataFrame, run_id: str, now, tables: set[str]) -> list[_Output]:
    outputs = []
    for bronze in fhir_views.load().values():
        if bronze.table not in tables:
            continue
        valid = classified.where((F.col("entity") == bronze.table) & F.col("_reason").isNull())
        outputs.append(
            _Output(
                bronze.table,
                fhir.type_view(valid, bronze, run_id, now),
                fhir.ENTITY_KEYS,
                fhir.UPDATE_WHEN,
                fhir.newest_first(),
                protection=bronze.protection,
            )
        )
    other = classified.where((F.col("entity") == model.OTHER_TABLE) & F.col("_reason").isNull())
    outputs.append(
        _Output(
            model.OTHER_TABLE,
            fhir.type_other(other, run_id, now),
            fhir.OTHER_KEYS,
            fhir.UPDATE_WHEN,
            fhir.newest_first(),
        )
    )
    return outputs


def _csv_outputs(
    catalog: CsvCatalog, records: DataFrame, files, source_system: str, run_id: str, now, report: IngestReport
) -> list[_Output]:
    """Group files by (table, header) so each group parses with its own column layout; the report
    notes columns a declaration does not know (ignored) or misses (null)."""
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for f in files:
        line = first_line(f.path)
        if line is None:
            continue  # unreadable: the reader's row for it is quarantined below
        header = tuple(parse_header(line)) if line.strip() else ()
        groups[(table_stem(f.path), header)].append(f.path)
        unknown, missing = column_drift(catalog.spec_for(table_stem(f.path)), list(header))
        name = os.path.basename(f.path)
        if unknown:
            report.notes.append(f"{name}: column(s) not in the declaration, ignored: {', '.join(unknown)}")
        if missing:
            report.notes.append(f"{name}: declared column(s) missing, loaded as null: {', '.join(missing)}")
    by_table: dict[str, list[DataFrame]] = defaultdict(list)
    for (stem, header), paths in sorted(groups.items()):
        rows = records.where(F.col("source_file").isin(paths) & F.col("read_error").isNull())
        typed = type_rows(
            rows, catalog.spec_for(stem), list(header), run_id, now, source_system, catalog.name
        )
        by_table[catalog.table_for(stem)].append(typed)
    paths_by_table: dict[str, list[str]] = defaultdict(list)
    for f in files:
        paths_by_table[catalog.table_for(table_stem(f.path))].append(f.path)
    outputs = [  # the rows standing for files that could not be read, under the table they were for
        _Output(
            table,
            quarantine.unreadable(records.where(F.col("source_file").isin(paths)), source_system),
            [],
            "",
            quarantine_only=True,
        )
        for table, paths in sorted(paths_by_table.items())
    ]
    for table, parts in sorted(by_table.items()):
        frame = _union(parts)
        spec = catalog.by_table(table)
        if spec is None:  # unknown table: every row is quarantined with its reason
            outputs.append(_Output(table, frame, [], "", quarantine_only=True))
        else:
            outputs.append(_Output(table, frame, spec.keys, CSV_UPDATE_WHEN, protection=spec.protected))
    return outputs


def _union(parts: list[DataFrame]) -> DataFrame:
    return functools.reduce(DataFrame.unionByName, parts)


def _protector(lake, encrypt: bool):
    if not encrypt:
        if any(Sealing.of(lake.schema(str(t))) for t in list_tables(lake.root)):
            raise ConfigError(f"lake {lake.root} holds encrypted tables; refusing to add plaintext to it")
        return None
    if lake.security is None:
        raise ConfigError(
            "this lake was opened without keys (Lake(..., security=...)); ingest writes identifiers "
            "only encrypted"
        )
    return lake.security.protector


def _protect(protector, df: DataFrame, table: str, keys: list[str], spec=None) -> DataFrame:
    """``df`` sealed for ``table``, sealed columns marked in the schema (unchanged without a protector)."""
    return df if protector is None else protector.protect(df, table, keys, spec)[0]


def _quarantine(lake, protector, parts: list[DataFrame], commit_info: dict) -> dict[str, int]:
    """Merge every failed record into ops.quarantine (raw payloads sealed); returns counts per table."""
    if not parts:
        return {}
    frame = _union(parts).persist(StorageLevel.MEMORY_AND_DISK)
    per_entity = {r["entity"] or UNPARSED: r["count"] for r in frame.groupBy("entity").count().collect()}
    if per_entity:
        sealed = _protect(protector, frame, quarantine.TABLE, quarantine.KEYS)
        lake.create(quarantine.TABLE, sealed.schema, PARTITION_BY)
        lake.merge(sealed, quarantine.TABLE, quarantine.KEYS, "s.reason <> t.reason", commit_info=commit_info)
    frame.unpersist()
    return per_entity


def _mark_ingested(lake, kind, source_system, files, run_id, now, commit_info) -> None:
    """Last step: only now are these files skipped by later runs (a crash before this re-reads them)."""
    rows = [(kind.value, source_system, f.path, f.size, f.modified_ns, run_id) for f in files]
    frame = lake.spark.createDataFrame(
        rows,
        "source_kind string, source_system string, path string, size long, "
        "modified_ns long, ingest_run_id string",
    ).withColumn("ingested_at", now)
    lake.create(FILE_LOG, FILE_LOG_SCHEMA)
    lake.merge(
        frame.select(*FILE_LOG_SCHEMA.fieldNames()), FILE_LOG, FILE_LOG_KEYS, "false", commit_info=commit_info
    )


RUNNING, FINISHED, FAILED = "running", "finished", "failed"


def _record_run(lake, report: IngestReport, started: dt.datetime, commit_info: dict, status: str) -> None:
    """Insert or update the run's row in ``ops.ingest_runs`` (keyed by run id)."""
    done = status != RUNNING
    frame = lake.spark.createDataFrame(
        [
            (
                report.run_id,
                report.source_kind,
                report.source_system,
                report.input,
                status,
                started,
                dt.datetime.now(dt.UTC) if done else None,
                report.files_new,
                report.records_read,
                report.balanced if done else None,
                json.dumps(report.as_dict()) if done else None,
            )
        ],
        "run_id string, source_kind string, source_system string, input string, status string, "
        "started_at timestamp, finished_at timestamp, files int, records_read long, balanced boolean, "
        "report string",
    )
    lake.create(RUNS_TABLE, frame.schema)
    lake.merge(frame, RUNS_TABLE, ["run_id"], "true", evolve_schema=True, commit_info=commit_info)
