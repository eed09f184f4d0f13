"""One adapter per source kind: how its files are chosen, read, counted and turned into bronze outputs.

The run loop (:mod:`ehrlake.ingest.runner`) is the same for every kind: find new files, ``read``
them, take the ``census`` (what each table receives), build the ``outputs``, merge, quarantine,
mark the files ingested. What differs lives here: FHIR records are classified by resource type into
the tables of their views; CSV lines go to the table of their file's name under their header's
column layout; images are decoded into one table.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from dataclasses import dataclass, field

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.errors import ConfigError
from ehrlake.ingest import extract as extracts
from ehrlake.ingest import fhir, fhir_views, images, quarantine, synthea
from ehrlake.ingest import fhir_model as model
from ehrlake.ingest.csv_tables import UPDATE_WHEN as CSV_UPDATE_WHEN
from ehrlake.ingest.csv_tables import CsvCatalog, column_drift, parse_header, type_rows
from ehrlake.ingest.lineage import keep_newest
from ehrlake.ingest.report import UNPARSED, IngestReport
from ehrlake.ingest.sources import UNREADABLE_INDEX, SourceKind, first_line, read_records, table_stem
from ehrlake.security.protection import TableProtection

# How a run keeps what it reads more than once (records; typed rows; failures). A task holds all the
# records of its files (a gzip file is read by one task), and a cached partition is one block: in
# memory, a 300,000-patient export's ~1 GB partitions ran the executors out of heap while being
# unrolled. On disk a block is written and read back as a stream, so memory stays flat with size.
CACHE = StorageLevel.DISK_ONLY


@dataclass
class Output:
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


@dataclass
class Census:
    """Counted once, up front: records read, valid records per target table, envelope failures."""

    total: int
    valid: dict[str, int]
    envelope_bad: dict[str, int]
    files: set[str] | None = None  # files that gave at least one record (None: not counted per file)
    unreadable: list[str] = field(default_factory=list)  # files (or their rest) that could not be read


@dataclass(frozen=True)
class Context:
    """What every step of one run knows about it."""

    input_path: str
    source_system: str
    batch_lines: int
    run_id: str
    now: Column  # the run's start, as a timestamp literal (lineage)
    report: IngestReport

    def shown(self, path: str) -> str:
        """A file as the run's notes name it: its path under the input folder (two exports in
        one input may both hold a ``patients.csv.gz``), else its name."""
        root = os.path.abspath(self.input_path)
        full = os.path.abspath(path)
        if os.path.isdir(root) and full.startswith(root + os.sep):
            return os.path.relpath(full, root)
        return os.path.basename(path)


def union(parts: list[DataFrame]) -> DataFrame:
    return functools.reduce(DataFrame.unionByName, parts)


class Adapter:
    """A source kind. ``read`` returns the records persisted (the census and the outputs reuse
    them); ``envelope_failures`` are records that failed before they had a table (FHIR only)."""

    kind: SourceKind

    def files(self, files: list) -> list:
        """The discovered files this source reads (all of them, unless a declaration ignores some)."""
        return files

    def read(self, spark, todo: list, ctx: Context) -> DataFrame:
        raise NotImplementedError

    def census(self, records: DataFrame) -> Census:
        raise NotImplementedError

    def outputs(self, records: DataFrame, census: Census, todo: list, ctx: Context) -> list[Output]:
        raise NotImplementedError

    def envelope_failures(self, records: DataFrame, ctx: Context) -> DataFrame | None:
        return None

    def release(self, records: DataFrame) -> None:
        """Drop what ``read`` cached."""
        records.unpersist()


def _names(census_rows) -> list[str]:
    return sorted({os.path.basename(r["source_file"]) for r in census_rows if r["unreadable"]})


def _unreadable() -> Column:
    """Whether a record row stands for a file (or its rest) that could not be read."""
    return (F.col("record_index") == UNREADABLE_INDEX).alias("unreadable")


# Input bytes per partition of the cached FHIR records. Every table's typing runs one task per
# partition, and each task reads its stage's plan (a view's plan is large): the 42 sample bundles
# (1.9 MB) in 8 partitions took 37 s to ingest, in 2 partitions 30 s.
BYTES_PER_PARTITION = 32 * 2**20
GZIP_RATIO = 8  # a gzipped FHIR file counts as this many times its size (JSON compresses ~8-15x)


def record_partitions(spark, todo: list) -> int:
    """How many partitions the run's records are spread over: by input size, at least one per core
    (every core types), at most ``spark.sql.shuffle.partitions`` (as before, for large inputs)."""
    size = sum(f.size * (GZIP_RATIO if f.path.endswith(".gz") else 1) for f in todo)
    most = int(spark.conf.get("spark.sql.shuffle.partitions"))
    least = min(most, spark.sparkContext.defaultParallelism)
    return max(least, min(most, -(-size // BYTES_PER_PARTITION)))


class FhirSource(Adapter):
    """FHIR NDJSON (a Bundle on a line is opened too) or Bundle documents, classified by resource
    type into the typed tables of ``conf/views/`` and ``bronze.fhir_other``."""

    def __init__(self, kind: SourceKind):
        self.kind = kind

    def read(self, spark, todo, ctx):
        whole = self.kind is SourceKind.FHIR_BUNDLES
        records = read_records(spark, todo, whole_file=whole, batch_lines=ctx.batch_lines)
        records = fhir.explode_bundles(records)  # NDJSON too: a Bundle exported as one line
        # A bulk export is one file per resource type, and a file is read by one task: spread every
        # type over all partitions (by a hash of where each record came from: the same on a retry),
        # or typing Observations, the largest type, is one task's work while the other cores idle.
        records = fhir.classify(records, ctx.source_system).repartition(
            record_partitions(spark, todo), "source_file", "record_index"
        )
        # in memory, as before: each resource table filters this one cache by type, which batch
        # statistics make cheap in memory and a full read on disk (CSV caches per table instead)
        return records.persist(StorageLevel.MEMORY_AND_DISK)

    def envelope_failures(self, records, ctx):
        failed = records.where("_reason IS NOT NULL")
        return quarantine.rows(failed, self.kind.value, F.col("entity"), ctx.run_id, ctx.now)

    def census(self, records):
        # files x tables rows reach the driver: bounded by the input's file count, never by its records
        rows = (
            records.groupBy("entity", F.col("_reason").isNull().alias("ok"), "source_file", _unreadable())
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
        return Census(sum(r["count"] for r in rows), dict(valid), dict(bad), readable, _names(rows))

    def outputs(self, records, census, todo, ctx):
        """One output per table the input feeds (a view's typed columns, or the whole record)."""
        outputs = []
        for bronze in fhir_views.load().values():
            if bronze.table not in census.valid:
                continue
            valid = records.where((F.col("entity") == bronze.table) & F.col("_reason").isNull())
            typed = fhir.type_view(valid, bronze, ctx.run_id, ctx.now)
            outputs.append(
                Output(
                    bronze.table, typed, fhir.ENTITY_KEYS, fhir.UPDATE_WHEN, fhir.newest_first(),
                    protection=bronze.protection,
                )
            )  # fmt: skip
        if model.OTHER_TABLE in census.valid:
            other = records.where((F.col("entity") == model.OTHER_TABLE) & F.col("_reason").isNull())
            typed = fhir.type_other(other, ctx.run_id, ctx.now)
            outputs.append(
                Output(model.OTHER_TABLE, typed, fhir.OTHER_KEYS, fhir.UPDATE_WHEN, fhir.newest_first())
            )
        return outputs


class CsvSource(Adapter):
    """CSV tables declared by a catalog (Synthea's, or a hospital extract's in ``conf/extracts``):
    every line goes to its file's table; typing failures are found per row, later."""

    def __init__(self, kind: SourceKind, catalog: CsvCatalog):
        self.kind, self.catalog = kind, catalog
        self.cached: dict[str, DataFrame] = {}  # table -> its files' records (``read``)

    def files(self, files):
        return [f for f in files if not self.catalog.is_ignored(table_stem(f.path))]

    def read(self, spark, todo, ctx):
        """The records of all files, as the union of one cache per table: each table's outputs then
        read only its own files' cache (filtering one shared cache by file name made every table
        scan every table's records: 308 GB read from disk at 300,000 patients)."""
        by_table: dict[str, list] = defaultdict(list)
        for f in todo:
            by_table[self.catalog.table_for(table_stem(f.path))].append(f)
        self.cached = {}
        for table, files in sorted(by_table.items()):
            records = read_records(spark, files, whole_file=False, batch_lines=ctx.batch_lines, quoted=True)
            # line 1 is the header; a file that cannot be read is one row at UNREADABLE_INDEX
            self.cached[table] = records.where("record_index > 1 OR read_error IS NOT NULL").persist(CACHE)
        return union(list(self.cached.values()))

    def release(self, records):
        for cached in self.cached.values():
            cached.unpersist()

    def census(self, records):
        rows = records.groupBy("source_file", _unreadable()).count().collect()
        valid: dict[str, int] = defaultdict(int)
        for r in rows:
            valid[self.catalog.table_for(table_stem(r["source_file"]))] += r["count"]
        readable = {r["source_file"] for r in rows if not r["unreadable"]}
        return Census(sum(r["count"] for r in rows), dict(valid), {}, readable, _names(rows))

    def outputs(self, records, census, todo, ctx):
        """Group files by (table, header) so each group parses with its own column layout; the
        report notes columns a declaration does not know (ignored) or misses (null)."""
        catalog, report = self.catalog, ctx.report
        groups: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
        for f in todo:
            line = first_line(f.path)
            if line is None:
                continue  # unreadable: the reader's row for it is quarantined below
            header = tuple(parse_header(line)) if line.strip() else ()
            groups[(table_stem(f.path), header)].append(f.path)
            unknown, missing = column_drift(catalog.spec_for(table_stem(f.path)), list(header))
            name = ctx.shown(f.path)
            if unknown:
                report.notes.append(
                    f"{name}: column(s) not in the declaration, ignored: {', '.join(unknown)}"
                )
            if missing:
                report.notes.append(
                    f"{name}: declared column(s) missing, loaded as null: {', '.join(missing)}"
                )
        by_table: dict[str, list[DataFrame]] = defaultdict(list)
        for (stem, header), paths in sorted(groups.items()):
            rows = self.cached[catalog.table_for(stem)].where(
                F.col("source_file").isin(paths) & F.col("read_error").isNull()
            )
            typed = type_rows(
                rows,
                catalog.spec_for(stem),
                list(header),
                ctx.run_id,
                ctx.now,
                ctx.source_system,
                catalog.name,
            )
            by_table[catalog.table_for(stem)].append(typed)
        outputs = [  # the rows standing for files that could not be read, under the table they were for
            Output(
                table,
                quarantine.unreadable(self.cached[table], ctx.source_system),
                [],
                "",
                quarantine_only=True,
            )
            for table in sorted(self.cached)
        ]
        for table, parts in sorted(by_table.items()):
            frame = union(parts)
            spec = catalog.by_table(table)
            if spec is None:  # unknown table: every row is quarantined with its reason
                outputs.append(Output(table, frame, [], "", quarantine_only=True))
            else:
                outputs.append(Output(table, frame, spec.keys, CSV_UPDATE_WHEN, protection=spec.protected))
        return outputs


class ImageSource(Adapter):
    """DICOM, PNG and NPZ images, decoded into ``bronze.images``; decoding failures are
    quarantined from that one table."""

    kind = SourceKind.IMAGES

    def read(self, spark, todo, ctx):
        decoded = images.read_images(spark, todo, ctx.input_path, images.load_spec())
        typed = images.type_rows(decoded, ctx.source_system, ctx.run_id, ctx.now)
        return typed.persist(CACHE)

    def census(self, records):
        total = records.count()
        return Census(total, {images.TABLE: total}, {})

    def outputs(self, records, census, todo, ctx):
        return [Output(images.TABLE, records, images.KEYS, images.UPDATE_WHEN)]


def adapter_for(kind: SourceKind, extract: str | None = None) -> Adapter:
    """The adapter of ``kind``; ``extract`` names a csv-extract's declaration (and only that)."""
    if extract and kind is not SourceKind.CSV_EXTRACT:
        raise ConfigError(f"--extract applies to csv-extract sources, not {kind.value}")
    if kind is SourceKind.CSV_EXTRACT:
        if not extract:
            known = ", ".join(extracts.available())
            raise ConfigError(f"a csv-extract source needs its declaration (--extract NAME; known: {known})")
        return CsvSource(kind, extracts.load(extract).catalog)
    if kind is SourceKind.SYNTHEA_CSV:
        return CsvSource(kind, synthea.CATALOG)
    if kind is SourceKind.IMAGES:
        return ImageSource()
    return FhirSource(kind)
