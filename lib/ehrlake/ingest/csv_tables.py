"""CSV sources into bronze: the parsing, typing and validation every CSV table shares.

A :class:`CsvCatalog` names a source's tables and which files feed each; a :class:`CsvTable` says how
one table is keyed and typed. Each file's header is read on the driver (one line per file), rows
are parsed in the JVM with ``from_csv`` against that header, so files of one table may differ in
column order and in which columns they have. Quoting is RFC 4180's (a quote inside a quoted field
is doubled; a quoted field may span lines: the reader joins them into one record, so a note's
text is one value). A row that cannot be typed is quarantined with its
reason; the whole original line is kept (sealed) in ``raw``.
"""

from __future__ import annotations

import csv
import fnmatch
import re
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.ingest.lineage import lineage, numbered
from ehrlake.ingest.quarantine import Reason, first_failure
from ehrlake.security.protection import TableProtection, declared

CORRUPT = "_corrupt"
# The same row content, re-read, must replace nothing; a changed row under the same key replaces it.
# CSV rows carry no version, so within a batch the later file / line wins (no ordering columns).
UPDATE_WHEN = "s.record_hash <> t.record_hash"


@dataclass(frozen=True)
class CsvTable:
    """One bronze table fed by CSV files: its columns (canonical lower-case names) and types.

    ``columns=None`` takes every column of each file's header, named by :func:`canonical` (hospital
    extracts, whose columns the platform does not fix); a declared tuple keeps only those (Synthea,
    whose schema it knows), and other header columns survive only in ``raw``.
    """

    table: str
    columns: tuple[str, ...] | None = None
    key_columns: tuple[str, ...] = ()  # unique per source system; none: the row content is the key
    dates: tuple[str, ...] = ()
    timestamps: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)  # header name (lower) -> canonical name
    missing: tuple[str, ...] = ()  # values meaning "no value" besides the empty field (e.g. "?")
    protection: TableProtection | None = None  # default: the declaration in security/protection.py

    @property
    def keys(self) -> list[str]:
        return ["source_system", *(self.key_columns or ("row_key",))]

    @property
    def protected(self) -> TableProtection:
        return self.protection or declared(self.table)

    def type_of(self, column: str) -> str:
        if column in self.dates:
            return "date"
        if column in self.timestamps:
            return "timestamp"
        if column in self.numbers:
            return "double"
        return "string"


@dataclass(frozen=True)
class CsvCatalog:
    """The tables of one CSV source and which file names feed each (globs over the file stem)."""

    name: str
    tables: dict[str, CsvTable]  # file stem (or table short name) -> table
    patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # short name -> stem globs
    ignored: tuple[str, ...] = ()  # stem globs of files that are not data (lookups, readmes)

    def spec_for(self, stem: str) -> CsvTable | None:
        if stem in self.tables and stem not in self.patterns:
            return self.tables[stem]
        for name, globs in self.patterns.items():
            if any(fnmatch.fnmatch(stem, g) for g in globs):
                return self.tables[name]
        return None

    def table_for(self, stem: str) -> str:
        """Bronze table of a CSV file stem; unknown stems get a name that only the quarantine uses."""
        spec = self.spec_for(stem)
        return spec.table if spec else f"(unknown:{stem})"

    def is_ignored(self, stem: str) -> bool:
        return any(fnmatch.fnmatch(stem, g) for g in self.ignored)

    def by_table(self, table: str) -> CsvTable | None:
        return next((t for t in self.tables.values() if t.table == table), None)


def parse_header(line: str) -> list[str]:
    return next(csv.reader([line]))


def canonical(name: str) -> str:
    """A header name as a column name any SQL reads without quoting: ``A1Cresult`` -> ``a1cresult``,
    ``glyburide-metformin`` -> ``glyburide_metformin``."""
    return re.sub(r"[^0-9a-z_]+", "_", name.strip().lower()).strip("_") or "column"


def column_name(spec: CsvTable | None, header_name: str) -> str:
    """The column a header name fills: declared tables match names case-insensitively (through
    their aliases); undeclared ones (``columns: None``) take every header under its canonical name."""
    low = header_name.strip().lower() if spec is None or spec.columns is not None else canonical(header_name)
    return spec.aliases.get(low, low) if spec else low


def _csv_schema(header: list[str]) -> str:
    fields = ",".join(f"`{h.replace('`', '')}` STRING" for h in header)
    return f"{fields}, {CORRUPT} STRING"


def type_rows(
    rows: DataFrame,
    spec: CsvTable | None,
    header: list[str],
    run_id: str,
    ingested_at: Column,
    source_system: str,
    source_name: str = "CSV",
) -> DataFrame:
    """Data lines of files sharing one header -> typed bronze rows with ``_reason``/``_message``."""
    if not any(h.strip() for h in header):
        return _headerless(rows, source_system, run_id, ingested_at)
    by_canonical: dict[str, str] = {}
    for h in header:
        by_canonical.setdefault(column_name(spec, h), h.replace("`", ""))
    parsed = rows.withColumn(
        "r",
        F.from_csv(
            "text",
            _csv_schema(header),
            {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT, "escape": '"'},
        ),
    )

    def raw(col: str) -> Column:
        if col not in by_canonical:
            return F.lit(None).cast("string")
        value = F.col(f"r.`{by_canonical[col]}`")
        if spec and spec.missing:
            value = F.when(~value.isin(*spec.missing), value)
        return value

    checks = [
        (F.col("bad_utf8"), Reason.INVALID_UTF8, F.lit("record is not valid UTF-8")),
        (F.lit(spec is None), Reason.UNKNOWN_TABLE, F.lit(f"not a known {source_name} table (file name)")),
        (
            F.col(f"r.{CORRUPT}").isNotNull(),
            Reason.WRONG_FIELD_COUNT,
            F.lit(f"expected {len(header)} fields as in the header"),
        ),
    ]
    if spec is None:
        typed: list[Column] = []
    else:
        columns = spec.columns if spec.columns is not None else tuple(by_canonical)
        for key in spec.key_columns:
            checks.append(
                (raw(key).isNull() | (F.trim(raw(key)) == ""), Reason.MISSING_ID, F.lit(f"{key} is empty"))
            )
        for col in columns:
            kind = spec.type_of(col)
            if kind != "string" and col in by_canonical:
                bad = raw(col).isNotNull() & _cast(raw(col), kind).isNull()
                reason = Reason.UNPARSEABLE_NUMBER if kind == "double" else Reason.UNPARSEABLE_DATE
                # never the value: it may be anyone's name typed into the wrong field (raw is sealed)
                message = F.lit(f"{by_canonical[col]}: not a valid {kind} (the value is sealed in raw)")
                checks.append((bad, reason, message))
        typed = [
            (
                _cast(raw(c), spec.type_of(c)) if c in by_canonical else F.lit(None).cast(spec.type_of(c))
            ).alias(c)
            for c in columns
        ]
    reason, message = first_failure(checks)
    # identical lines of one file are kept apart by their place among them (a re-read, even of a
    # copy under another name, gives the same keys)
    parsed = numbered(parsed.withColumn("_hash", F.sha2("text", 256)), ["source_file", "_hash"], "_place")
    return parsed.select(
        F.lit(source_system).alias("source_system"),
        F.concat("_hash", F.lit("#"), F.col("_place").cast("string")).alias("row_key"),
        *typed,
        F.col("text").alias("raw"),
        F.col("_hash").alias("record_hash"),
        *lineage(run_id, ingested_at),
        reason.alias("_reason"),
        message.alias("_message"),
    )


def _headerless(rows: DataFrame, source_system: str, run_id: str, ingested_at: Column) -> DataFrame:
    """Lines of a file whose first line is blank: nothing names their fields, so all are quarantined."""
    hashed = F.sha2("text", 256)
    return rows.select(
        F.lit(source_system).alias("source_system"),
        F.concat(hashed, F.lit("#"), F.col("record_index").cast("string")).alias("row_key"),
        F.col("text").alias("raw"),
        hashed.alias("record_hash"),
        *lineage(run_id, ingested_at),
        F.lit(Reason.MISSING_HEADER.value).alias("_reason"),
        F.lit("the file's first line (its header) is blank").alias("_message"),
    )


def column_drift(spec: CsvTable | None, header: list[str]) -> tuple[list[str], list[str]]:
    """(header columns the declaration does not know, declared columns the header lacks): the first
    are ignored, the second loaded as null; the ingest report names both."""
    if spec is None or spec.columns is None or not any(h.strip() for h in header):
        return [], []
    names = {column_name(spec, h) for h in header}
    unknown = [h for h in header if column_name(spec, h) not in spec.columns]
    missing = [c for c in spec.columns if c not in names]
    return unknown, missing


def _cast(value: Column, kind: str) -> Column:
    """``value`` as ``kind``; null where it does not parse (the checks quarantine those rows)."""
    return value if kind == "string" else value.try_cast(kind)
