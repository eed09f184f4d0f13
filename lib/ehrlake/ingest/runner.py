"""The ingest run: one loop for every source kind (its differences are in :mod:`~ehrlake.ingest.adapters`).

``run(lake, SourceKind.FHIR_NDJSON, "dump/")`` reads only files not ingested before, types and
validates every record, merges the newest version of each record into its bronze table, and
returns an :class:`IngestReport` whose counts add up. Re-running after a crash gives the same tables:
every write is a keyed merge, and a file is marked as ingested only after all its tables committed.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.config import source_system_name
from ehrlake.errors import ConfigError
from ehrlake.ingest import extract as extracts
from ehrlake.ingest import generated, quarantine
from ehrlake.ingest.adapters import CACHE, Adapter, Census, Context, Output, adapter_for, union
from ehrlake.ingest.report import UNPARSED, IngestReport
from ehrlake.ingest.sources import (
    FILE_LOG,
    FILE_LOG_KEYS,
    FILE_LOG_SCHEMA,
    SourceKind,
    find_inputs,
    new_files,
)
from ehrlake.lake.catalog import list_tables
from ehrlake.security.copies import NOTE_CONTEXT
from ehrlake.security.protection import Sealing
from ehrlake.session import side_by_side
from ehrlake.views import ISSUES

RUNS_TABLE = "ops.ingest_runs"
PARTITION_BY = ["source_system"]  # merges and re-ingests of one hospital touch only its partition


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
    adapter = adapter_for(kind, extract)
    if source_system is None:
        source_system = extracts.load(extract).source_system if extract else "local"
    source_system = source_system_name(source_system)
    protector = _protector(lake, encrypt)
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    run_id = run_id or f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    security = lake.security if encrypt else None
    inputs = find_inputs(input_path, kind, follow_links)
    files = adapter.files(inputs.files)
    todo = new_files(lake, kind, source_system, files)
    report = IngestReport(run_id, kind.value, source_system, input_path, lake.root, len(files), len(todo))
    ctx = Context(input_path, source_system, batch_lines, run_id, F.lit(started).cast("timestamp"), report)
    if inputs.links_not_followed:
        report.notes.append(
            "link(s) leading out of the input folder, not followed (--follow-links to read them): "
            + ", ".join(inputs.links_not_followed)
        )
    if security is None:
        return _ingest(lake, adapter, ctx, todo, started, protector)
    with security.job("ingest", ["bronze", "ops"], role, run_id) as (_, written):
        report = _ingest(lake, adapter, ctx, todo, started, protector)
        written += [(name, json.dumps(asdict(c))) for name, c in sorted(report.entities.items())]
    return report


def _ingest(
    lake, adapter: Adapter, ctx: Context, todo: list, started: dt.datetime, protector
) -> IngestReport:
    report = ctx.report
    if not todo:
        return report
    # the run is on record before it writes anything, so every row it writes names a known run;
    # a run killed midway stays "running" (its process gone), a failed one says "failed"
    commit_info = {"ehrlakeRunId": ctx.run_id, "ehrlakeJob": "ingest"}
    _record_run(lake, report, started, commit_info, RUNNING)
    try:
        _load(lake, adapter, ctx, todo, protector, commit_info)
    except Exception:
        _record_run(lake, report, started, commit_info, FAILED)
        raise
    _record_run(lake, report, started, commit_info, FINISHED)
    return report


def _load(lake, adapter: Adapter, ctx: Context, todo: list, protector, commit_info: dict) -> None:
    """Read, type, merge and quarantine the new files ``todo``, filling the run's report."""
    report = ctx.report
    records = adapter.read(lake.spark, todo, ctx)
    census = adapter.census(records)
    if census.unreadable:
        report.notes.append(f"file(s) that could not be read (quarantined): {', '.join(census.unreadable)}")
    if census.files is not None:
        report.empty_files = sorted(ctx.shown(f.path) for f in todo if f.path not in census.files)
    if report.empty_files:
        report.notes.append(
            f"file(s) without a single record (nothing to load): {', '.join(report.empty_files)}"
        )
    report.records_read = census.total
    outputs = [out for out in adapter.outputs(records, census, todo, ctx) if out.table in census.valid]
    early_bad = adapter.envelope_failures(records, ctx) if census.envelope_bad else None
    bad_parts = [early_bad] if early_bad is not None else []
    for out in outputs:  # cached by the outcome count, then reused by the merge and the quarantine
        out.rows = out.rows.persist(CACHE)
    # a table's count and merge are several small Spark jobs: tables load side by side
    loaded = side_by_side(
        lambda out: _load_table(lake, out, protector, adapter, ctx, commit_info), outputs, "ingest-table"
    )
    merged = {out.table: r.merged for out, r in zip(outputs, loaded, strict=True) if r.merged is not None}
    bad_parts += [result.failed for result in loaded if result.failed is not None]
    quarantined = _quarantine(lake, protector, bad_parts, commit_info)
    _fill_report(report, census, merged, quarantined)
    with_issues: dict[str, int] = defaultdict(int)  # a CSV table may have two outputs (unreadable files)
    for out, result in zip(outputs, loaded, strict=True):
        with_issues[out.table] += result.with_issues
    for table, count in with_issues.items():
        if count:
            report.entity(table).with_issues = count
    copies = generated.load(lake, protector, ctx, commit_info)
    if copies:
        report.notes.append(f"{copies:,} generated patients linked to their templates -> {generated.TABLE}")
    _mark_ingested(lake, adapter.kind, ctx.source_system, todo, ctx.run_id, ctx.now, commit_info)
    adapter.release(records)
    for out in outputs:
        out.rows.unpersist()


@dataclass
class _Loaded:
    """What loading one table's output gave: merge metrics (None: nothing to merge), its rows that
    failed typing (None: none failed) and how many loaded rows carry conformance issues."""

    merged: dict | None
    failed: DataFrame | None
    with_issues: int


def _load_table(lake, out: Output, protector, adapter: Adapter, ctx: Context, commit_info: dict) -> _Loaded:
    """Count the output's outcomes (one job, which fills its cache), merge its good rows, and
    hand back its failures for the one quarantine write."""
    issue = F.size(ISSUES) > 0 if ISSUES in out.rows.columns else F.lit(False)
    counts = out.rows.select(
        F.coalesce(F.sum(F.col("_reason").isNotNull().cast("int")), F.lit(0)).alias("bad"),
        F.coalesce(F.sum((F.col("_reason").isNull() & issue).cast("int")), F.lit(0)).alias("issue"),
    ).first()
    merged = None
    if not out.quarantine_only:
        good = out.dedupe(out.rows.where("_reason IS NULL").drop("_reason", "_message"))
        good = _protect(protector, good, out.table, out.keys, out.protection)
        lake.create(out.table, good.schema, PARTITION_BY)
        merged = lake.merge(
            good, out.table, out.keys, out.update_when, evolve_schema=True, commit_info=commit_info
        ).metrics
    failed = None
    if counts["bad"]:
        bad = out.rows.where("_reason IS NOT NULL")
        failed = quarantine.rows(bad, adapter.kind.value, F.lit(out.table), ctx.run_id, ctx.now)
    return _Loaded(merged, failed, int(counts["issue"]))


def _fill_report(
    report: IngestReport, census: Census, merged: dict[str, dict], quarantined: dict[str, int]
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
    """``df`` sealed for ``table``, sealed columns marked in the schema (unchanged without a protector,
    but for the sealing's input :data:`~ehrlake.security.copies.NOTE_CONTEXT`, never written)."""
    return df.drop(NOTE_CONTEXT) if protector is None else protector.protect(df, table, keys, spec)[0]


def _quarantine(lake, protector, parts: list[DataFrame], commit_info: dict) -> dict[str, int]:
    """Merge every failed record into ops.quarantine (raw payloads sealed); returns counts per table."""
    if not parts:
        return {}
    frame = union(parts).persist(CACHE)
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
    row = (
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
    schema = (
        "run_id string, source_kind string, source_system string, input string, status string, "
        "started_at timestamp, finished_at timestamp, files int, records_read long, balanced boolean, "
        "report string"
    )
    lake.merge_rows([row], schema, RUNS_TABLE, ["run_id"], evolve_schema=True, commit_info=commit_info)
