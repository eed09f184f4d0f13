"""Finding input files, streaming them into Spark, and remembering which ones were ingested.

Files are read by Python tasks on the executors (``mapInArrow``), one task per file, streaming
lines in bounded Arrow batches: memory per task stays flat whatever the file size, gzip is handled,
and every record keeps its exact line number for lineage and quarantine.
"""

from __future__ import annotations

import enum
import gzip
import io
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import EnvironmentProblem

FILE_LOG = "ops.ingest_files"


class SourceKind(enum.Enum):
    FHIR_NDJSON = "fhir-ndjson"
    """FHIR R4 bulk export: one resource per line, ``.ndjson``/``.jsonl``, optionally gzipped."""
    FHIR_BUNDLES = "fhir-bundles"
    """FHIR R4 Bundles (transaction, collection, searchset, batch, document), ``.json``/``.json.gz``."""
    SYNTHEA_CSV = "synthea-csv"
    """Synthea CSV export: one file per table (``patients.csv``, ...), optionally gzipped."""
    CSV_EXTRACT = "csv-extract"
    """A hospital's CSV extract with its own shapes, declared in ``conf/extracts/<name>.yaml``."""
    IMAGES = "images"
    """Medical images: DICOM (``.dcm``), PNG (label = integer folder name) and NPZ image sets."""


_SUFFIXES = {
    SourceKind.FHIR_NDJSON: (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz"),
    SourceKind.FHIR_BUNDLES: (".json", ".json.gz"),
    SourceKind.SYNTHEA_CSV: (".csv", ".csv.gz"),
    SourceKind.CSV_EXTRACT: (".csv", ".csv.gz"),
    SourceKind.IMAGES: (".dcm", ".dicom", ".png", ".npz"),
}


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    modified_ns: int


@dataclass
class Discovery:
    """The files of one kind under an input path, and the symbolic links that were not followed."""

    files: list[InputFile]
    links_not_followed: list[str]


def discover(input_path: str, kind: SourceKind, follow_links: bool = False) -> list[InputFile]:
    """Every file of this kind under ``input_path`` (a file or a directory), sorted by path."""
    return find_inputs(input_path, kind, follow_links).files


HIDDEN = (".", "_")  # names of files and folders that are not input (_manifest.json, _lineage/)


def find_inputs(input_path: str, kind: SourceKind, follow_links: bool = False) -> Discovery:
    """Every file of this kind under ``input_path``, sorted by path. A link whose target lies
    outside the input folder is not followed unless ``follow_links`` (a dump should not pull in
    files from elsewhere unasked); a dangling link is kept, so the reader quarantines it by name."""
    if not os.path.lexists(input_path):
        raise EnvironmentProblem(f"input path {input_path} does not exist")
    if os.path.isdir(input_path):
        candidates = []
        for d, folders, files in os.walk(input_path):  # hidden as Spark hides them: "." and "_"
            folders[:] = [f for f in folders if not f.startswith(HIDDEN)]
            candidates += [os.path.join(d, f) for f in files if not f.startswith(HIDDEN)]
        root = os.path.realpath(input_path)
    else:
        candidates, root = [input_path], None
    found, skipped = [], []
    for path in sorted(candidates):
        if not path.lower().endswith(_SUFFIXES[kind]):
            continue
        if root and os.path.islink(path) and not follow_links:
            target = os.path.realpath(path)
            if os.path.commonpath([root, target]) != root:
                skipped.append(os.path.relpath(path, input_path))
                continue
        try:
            st = os.stat(path)
        except FileNotFoundError:  # a dangling link: the reader reports it as an unreadable file
            st = os.lstat(path)
        found.append(InputFile(os.path.abspath(path), st.st_size, st.st_mtime_ns))
    if not found:
        links = f"; {len(skipped)} link(s) leading out of it not followed (--follow-links)" if skipped else ""
        raise EnvironmentProblem(
            f"no {kind.value} files ({', '.join(_SUFFIXES[kind])}) under {input_path}{links}"
        )
    return Discovery(found, skipped)


def table_stem(path: str) -> str:
    """``/x/patients.csv.gz`` -> ``patients``."""
    name = os.path.basename(path).lower()
    for suffix in (".gz", ".csv", ".ndjson", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


LINES_SCHEMA = T.StructType(
    [
        T.StructField("source_file", T.StringType()),
        T.StructField("record_index", T.LongType()),
        T.StructField("text", T.StringType()),
        T.StructField("bad_utf8", T.BooleanType()),
        T.StructField("read_error", T.StringType()),
    ]
)
_ARROW_LINES = pa.schema(
    [
        ("source_file", pa.string()),
        ("record_index", pa.int64()),
        ("text", pa.large_string()),
        ("bad_utf8", pa.bool_()),
        ("read_error", pa.string()),
    ]
)
MAX_RECORD_LINES = 5000  # a CSV record's quoted fields span at most this many lines (a long note)
UNREADABLE_INDEX = -1  # record_index of the row that stands for a file (or its rest) that cannot be read
READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


def _open(path: str) -> io.BufferedIOBase:
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned wrapper
    return gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw


def _decode(data: bytes) -> tuple[str, bool]:
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def _stream(
    batches: Iterator[pa.RecordBatch], whole_file: bool, batch_lines: int, quoted: bool = False
) -> Iterator[pa.RecordBatch]:
    """Executor side: turn batches of file paths into batches of (file, index, text) records.

    ``quoted`` (CSV): a line that leaves a quoted field open (an odd count of ``"``, doubled
    quotes counting twice) continues on the next lines, so a note's text over many lines is one
    record, numbered by its first line; a quote never closed ends its record after
    :data:`MAX_RECORD_LINES` lines or at the end of the file, and the typing quarantines it.
    A file that cannot be read (missing, not gzip, cut short) ends with one row at
    :data:`UNREADABLE_INDEX` saying why and after which line; the lines read before stay records.
    """
    for batch in batches:
        for path in batch.column("path").to_pylist():
            files, indexes, texts, bad, errors = [], [], [], [], []

            def flush():
                out = pa.RecordBatch.from_arrays(
                    [
                        pa.array(files, pa.string()),
                        pa.array(indexes, pa.int64()),
                        pa.array(texts, pa.large_string()),
                        pa.array(bad, pa.bool_()),
                        pa.array(errors, pa.string()),
                    ],
                    schema=_ARROW_LINES,
                )
                files.clear(), indexes.clear(), texts.clear(), bad.clear(), errors.clear()
                return out

            def add(index: int, text: str | None, was_bad: bool = False, error: str | None = None):
                files.append(path), indexes.append(index), texts.append(text), bad.append(was_bad)
                errors.append(error)

            number, open_lines, first, quotes = 0, [], 0, 0
            try:
                with _open(path) as handle:
                    if whole_file:
                        add(0, *_decode(handle.read()))
                    else:
                        for number, line in enumerate(handle, start=1):  # noqa: B007 - read after the loop
                            line = line.rstrip(b"\r\n")
                            if open_lines:  # inside a quoted field: blank lines are its text
                                open_lines.append(line)
                                quotes += line.count(b'"')  # running parity: each line counted once
                                if quotes % 2 == 0 or len(open_lines) >= MAX_RECORD_LINES:
                                    add(first, *_decode(b"\n".join(open_lines)))
                                    open_lines = []
                            elif not line.strip():
                                continue  # blank lines are not records
                            elif quoted and line.count(b'"') % 2:
                                open_lines, first, quotes = [line], number, 1
                                continue
                            else:
                                add(number, *_decode(line))
                            if len(files) >= batch_lines:
                                yield flush()
                        if open_lines:  # a quote left open at the end of the file
                            add(first, *_decode(b"\n".join(open_lines)))
            except READ_ERRORS as exc:
                add(UNREADABLE_INDEX, None, False, read_error(exc, number))
            if files:
                yield flush()


def read_error(exc: BaseException, lines_read: int) -> str:
    """Why a file could not be read, without quoting its content (the OS and zlib messages do not)."""
    kind = type(exc).__name__
    what = {
        "FileNotFoundError": "file not found (a dangling link?)",
        "PermissionError": "permission denied",
        "IsADirectoryError": "a directory",
        "BadGzipFile": "not a gzip file",
        "EOFError": "compressed stream cut short",
    }.get(kind, f"cannot be read ({kind}: {getattr(exc, 'strerror', None) or exc})")
    return what + (f" after line {lines_read}" if lines_read else "")


def read_records(
    spark: SparkSession, files: list[InputFile], whole_file: bool, batch_lines: int, quoted: bool = False
) -> DataFrame:
    """One row per line (or per file with ``whole_file``; per CSV record, over the lines of its
    quoted fields, with ``quoted``): source_file, record_index, text, bad_utf8."""
    # A few tasks per core, each streaming several files: one task per file would make every later
    # stage schedule thousands of tiny tasks. Largest files first, dealt round-robin, to balance bytes.
    slots = max(1, min(len(files), spark.sparkContext.defaultParallelism * 2))
    ordered = sorted(files, key=lambda f: -f.size)
    rows = [(i % slots, f.path) for i, f in enumerate(ordered)]
    frame = spark.createDataFrame(rows, "slot int, path string").repartition(slots, "slot").select("path")
    return frame.mapInArrow(lambda it: _stream(it, whole_file, batch_lines, quoted), LINES_SCHEMA)


def first_line(path: str) -> str | None:
    """The header line of a CSV file (read on the driver: one line per file, not per row); None when
    the file cannot be read."""
    try:
        with _open(path) as handle:
            line, _ = _decode(handle.readline().rstrip(b"\r\n"))
    except READ_ERRORS:  # e.g. a .gz that is not gzip, or cut short: the reader quarantines the file
        return None
    return line.lstrip("\ufeff")


FILE_LOG_SCHEMA = T.StructType(
    [
        T.StructField("source_kind", T.StringType()),
        T.StructField("source_system", T.StringType()),
        T.StructField("path", T.StringType()),
        T.StructField("size", T.LongType()),
        T.StructField("modified_ns", T.LongType()),
        T.StructField("ingest_run_id", T.StringType()),
        T.StructField("ingested_at", T.TimestampType()),
    ]
)
FILE_LOG_KEYS = ["source_kind", "source_system", "path", "size", "modified_ns"]


def new_files(lake, kind: SourceKind, system: str, files: list[InputFile]) -> list[InputFile]:
    """The files not yet recorded as ingested (same path, size and modification time)."""
    if not lake.exists(FILE_LOG):
        return files
    done = {
        (r.path, r.size, r.modified_ns)
        for r in lake.read(FILE_LOG)
        .where((F.col("source_kind") == kind.value) & (F.col("source_system") == system))
        .select("path", "size", "modified_ns")
        .toLocalIterator()
    }
    return [f for f in files if (f.path, f.size, f.modified_ns) not in done]
