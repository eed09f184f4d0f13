"""The quarantine: where every record that cannot be loaded goes, with a machine-readable reason.

Nothing is dropped silently: a record ends in exactly one bronze table or in ``ops.quarantine``.
``record_index`` locates it in its file: the 1-based line for NDJSON and CSV, the 1-based entry for
a bundle (line x 1,000,000 + entry for a Bundle on an NDJSON line), 0 for a whole file (e.g. a
bundle that is not valid JSON), -1 for a file (or the rest of one) that cannot be read.
"""

from __future__ import annotations

import enum

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

TABLE = "ops.quarantine"
KEYS = ["source_system", "source_file", "record_index"]


class Reason(enum.Enum):
    UNREADABLE_FILE = "unreadable_file"
    """A file, or the rest of one, that cannot be read: a dangling link, not gzip although named
    ``.gz``, a compressed stream cut short. The lines read before the fault are records as usual."""
    INVALID_UTF8 = "invalid_utf8"
    """The bytes are not UTF-8; the payload is kept with replacement characters."""
    MALFORMED_JSON = "malformed_json"
    """Not parseable as a JSON object."""
    TOO_DEEP = "too_deep"
    """JSON nested deeper than the parser allows (1,000 levels): no real record nests so deep."""
    MISSING_RESOURCE_TYPE = "missing_resource_type"
    """A FHIR resource without ``resourceType``."""
    UNKNOWN_RESOURCE_TYPE = "unknown_resource_type"
    """``resourceType`` is not a FHIR R4 resource type."""
    MISSING_ID = "missing_id"
    """A FHIR resource, or a CSV row of a table keyed by Id, without an id."""
    MISSING_SUBJECT = "missing_subject"
    """A FHIR resource of a patient-level type (Condition, Observation, ...) that names no patient."""
    MISSING_RESOURCE = "missing_resource"
    """A bundle entry with no ``resource``."""
    UNPARSEABLE_DATE = "unparseable_date"
    """A CSV date field that is not a valid (partial) ISO-8601 date. (A FHIR field that cannot be
    read is not a reason: it is null in bronze and listed in the row's ``conformance_issues``.)"""
    UNPARSEABLE_NUMBER = "unparseable_number"
    """A numeric CSV field that is not a number."""
    MISSING_HEADER = "missing_header"
    """A CSV line of a file whose first line is blank: without a header its fields cannot be named."""
    WRONG_FIELD_COUNT = "wrong_field_count"
    """A CSV row with more or fewer fields than its header."""
    UNKNOWN_TABLE = "unknown_table"
    """A CSV file whose name is not a known table of the source format."""
    UNREADABLE_IMAGE = "unreadable_image"
    """An image file that is not valid DICOM / PNG / NPZ, or whose pixels cannot be decoded."""


SCHEMA = T.StructType(
    [
        T.StructField("source_kind", T.StringType()),
        T.StructField("source_system", T.StringType()),
        T.StructField("source_file", T.StringType()),
        T.StructField("record_index", T.LongType()),
        T.StructField("entity", T.StringType()),
        T.StructField("reason", T.StringType()),
        T.StructField("message", T.StringType()),
        T.StructField("raw", T.StringType()),
        T.StructField("ingest_run_id", T.StringType()),
        T.StructField("quarantined_at", T.TimestampType()),
    ]
)


def first_failure(checks: list[tuple[Column, Reason, Column]]) -> tuple[Column, Column]:
    """(reason, message) columns for the first failing check, null when all pass.

    ``checks`` are (failed?, reason, message) in priority order, so a record gets exactly one reason.
    """
    reason = F.lit(None).cast("string")
    message = F.lit(None).cast("string")
    for failed, code, text in reversed(checks):
        reason = F.when(failed, F.lit(code.value)).otherwise(reason)
        message = F.when(failed, text).otherwise(message)
    return reason, message


def rows(df: DataFrame, source_kind: str, entity: Column | str | None, run_id: str, now: Column) -> DataFrame:
    """Shape failed records (with ``_reason``, ``_message``, ``raw`` and lineage) as quarantine rows."""
    entity_col = entity if isinstance(entity, Column) else F.lit(entity).cast("string")
    return df.select(
        F.lit(source_kind).alias("source_kind"),
        F.col("source_system"),
        F.col("source_file"),
        F.col("record_index").cast("long"),
        entity_col.alias("entity"),
        F.col("_reason").alias("reason"),
        F.col("_message").alias("message"),
        F.col("raw"),
        F.lit(run_id).alias("ingest_run_id"),
        now.alias("quarantined_at"),
    )


def unreadable(records: DataFrame, source_system: str) -> DataFrame:
    """The rows standing for files that could not be read (``read_error``), as failed records."""
    return records.where(F.col("read_error").isNotNull()).select(
        F.lit(source_system).alias("source_system"),
        "source_file",
        "record_index",
        F.lit(None).cast("string").alias("raw"),
        F.lit(Reason.UNREADABLE_FILE.value).alias("_reason"),
        F.col("read_error").alias("_message"),
    )
