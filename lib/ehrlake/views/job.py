"""``ehrlake view run``: a ViewDefinition over FHIR files or over the sealed records of a lake table.

Files (NDJSON lines, Bundle documents, single resources) are read as text; bundles give one resource
per entry. A lake table is read through its sealed ``raw_deid`` column (each record without its
direct identifiers, see :mod:`ehrlake.security.deidentify`), which only a job may open: the role must
be allowed to write the output's layer, the opening and the write are audited, and the view's columns
tagged ``ehrlake/sealed`` are sealed in the output like any identifier. A view that selects names
over a lake table therefore gets empty columns; the names themselves are in the typed tables, sealed
to the reveal key.
"""

from __future__ import annotations

from collections.abc import Callable

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.errors import ConfigError, EnvironmentProblem
from ehrlake.views import definition, runner
from ehrlake.views.compiler import VARIANTS


def read_resources(spark, input_path: str) -> DataFrame:
    """Every resource under ``input_path`` as ``(source_file, resource)`` with ``resource`` VARIANT:
    NDJSON line by line, ``.json`` files whole; a Bundle contributes its entries' resources."""
    import os

    from ehrlake.ingest.sources import SourceKind, discover

    files = []
    for kind in (SourceKind.FHIR_NDJSON, SourceKind.FHIR_BUNDLES):
        try:
            files += discover(input_path, kind)
        except EnvironmentProblem:
            if not os.path.exists(input_path):
                raise
    if not files:
        raise ConfigError(f"no FHIR files (.ndjson, .json, optionally .gz) under {input_path}")
    lines = [f.path for f in files if ".ndjson" in os.path.basename(f.path)]
    docs = [f.path for f in files if ".ndjson" not in os.path.basename(f.path)]
    parts = []
    if lines:
        parts.append(spark.read.text(lines))
    if docs:
        parts.append(spark.read.text(docs, wholetext=True))
    text = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])
    parsed = text.select(F.input_file_name().alias("source_file"), F.try_parse_json("value").alias("r"))
    parsed = parsed.where(F.col("r").isNotNull())
    is_bundle = F.variant_get("r", "$.resourceType", "string") == "Bundle"
    entries = F.try_variant_get("r", "$.entry", VARIANTS)
    exploded = parsed.select(
        "source_file",
        F.explode(
            F.when(
                is_bundle,
                F.transform(
                    F.coalesce(entries, F.array().cast(VARIANTS)),
                    lambda e: F.variant_get(e, "$.resource", "variant"),
                ),
            ).otherwise(F.array("r"))
        ).alias("resource"),
    )
    return exploded.where(F.col("resource").isNotNull())


def write_output(lake, out: str, role: str | None, source: str, rows: Callable[[], DataFrame]) -> int:
    """Overwrite lake table ``out`` with ``rows()`` as one job: refused up front unless the role may
    write its layer, ``rows`` built inside it (so opening sealed records is part of the audited job),
    the write audited; returns the rows written."""
    from ehrlake.lake.catalog import TableName
    from ehrlake.lake.modes import WriteMode

    with lake.security.job("view", [TableName.parse(out).layer], role) as (_, written):
        # the table is what the overwrite wrote: its commit's rows, not a count of it read again
        count = lake.write(
            rows(), out, mode=WriteMode.OVERWRITE, commit_info={"ehrlakeJob": "view"}
        ).rows_written
        written.append((out, f"{source}: {count} rows"))
    return count


def run_on_table(lake, view: definition.ViewDefinition, table: str, out: str, role: str | None) -> int:
    """The view over ``table``'s sealed records, written to ``out`` (overwritten); returns rows written."""
    source = f"view {view.name or view.resource} over {table}"
    return write_output(lake, out, role, source, lambda: _flatten_sealed(lake, view, table, out))


def _records_column(table: str, columns: list[str], sealing) -> str:
    """Which column of ``table`` holds the whole records a job may open: the processing copy, or
    (tables written before it existed, or not sealed at all) ``raw`` when it is not sealed to the
    reveal key."""
    from ehrlake.security.protection import RAW, RAW_DEID

    if RAW_DEID in columns:
        return RAW_DEID
    if RAW not in columns:
        raise ConfigError(f"{table} has no raw column: a view runs on whole FHIR records")
    if sealing and RAW in sealing.to_reveal:
        raise ConfigError(
            f"{table} keeps its records only sealed to the reveal key, which jobs do not hold (it has "
            "no raw_deid column: not FHIR records, or written before it existed; rebuild it from its sources)"
        )
    return RAW


def _flatten_sealed(lake, view: definition.ViewDefinition, table: str, out: str) -> DataFrame:
    """The view's rows over ``table``'s opened records, sealed for ``out`` as the view's tags say."""
    from ehrlake.security.protection import Sealing

    protector = lake.security.protector
    records = lake.read(table)
    sealing = Sealing.of(lake.schema(table))
    column = _records_column(table, records.columns, sealing)
    if sealing and column in sealing.columns:
        records = protector.open(records, table, sealing.only([column]))
    keep = tuple(c for c in ("source_system",) if c in records.columns)
    frame = runner.run(view, records, column, keep=keep)
    keys = [*keep, *[c for c in frame.columns if c == "id"]] or list(frame.columns[:1])
    spec = definition.protection(view.columns(), "patient_id" if "patient_id" in frame.columns else None)
    return protector.protect(frame, out, keys, spec)[0]
