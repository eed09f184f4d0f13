"""FHIR R4 (bulk NDJSON and Bundles) into typed bronze rows: pure DataFrame -> DataFrame transforms.

Flow: records (one JSON text each) -> :func:`classify` (envelope: resourceType, id, meta; the first
failing check gives the quarantine reason) -> :func:`type_view` per bronze table (the table's
ViewDefinition in ``conf/views/``, run tolerantly: a field that cannot be read becomes null and is
listed in ``conformance_issues``) -> newest version per key (``lineage.keep_newest``). Only a record
without a usable resource type, id or (for patient-level types) subject is quarantined.

A ``document`` Bundle (FHIR documents, e.g. ABDM health records) is a self-contained snapshot whose
entries often carry ids local to the document (``Patient/1`` in every document of a hospital). Such
entries (relative or missing ``fullUrl``) are keyed by the document: ``<scope>.<local id>``, where the
scope is a hash of ``Bundle.identifier`` (else ``Bundle.id``, else the document's text), and their
relative references are read the same way, so two documents never overwrite each other's records
and a document's Observation still points at its own Patient. ``raw`` keeps the entry as sent.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake import views
from ehrlake.ingest import fhir_model as model
from ehrlake.ingest.fhir_views import BronzeView, load
from ehrlake.ingest.lineage import lineage
from ehrlake.ingest.quarantine import Reason, first_failure
from ehrlake.security import copies

CORRUPT = "_corrupt"
JSON_OPTIONS = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}
ENVELOPE = (
    f"struct<resourceType:string,id:string,meta:struct<versionId:string,lastUpdated:string>,{CORRUPT}:string>"
)
BUNDLE = (
    "struct<resourceType:string,type:string,id:string,identifier:struct<system:string,value:string>,"
    f"entry:array<struct<fullUrl:string,resource:string>>,{CORRUPT}:string>"
)
DOCUMENT_SCOPED = ("document",)  # Bundle.type whose relative ids are local to the bundle
SCOPE_HEX = 20  # 80 bits of the document's identity: no collision among billions of documents
RELATIVE_URL = r"^[A-Za-z]+/[A-Za-z0-9\-.]{1,64}$"
# a relative reference ("Patient/1", "Patient\/1/_history/2") inside a document-scoped entry
RELATIVE_REFERENCE = r'("reference"\s*:\s*"[A-Za-z]+\\?/)([A-Za-z0-9\-.]{1,64}(?:\\?/_history\\?/[^"]*)?")'

ENTITY_KEYS = ["source_system", "id"]
OTHER_KEYS = ["source_system", "resource_type", "id"]

# A stored row is replaced only by a newer version of the same resource: later meta.lastUpdated, then
# a higher numeric meta.versionId; the same version with different content counts as a correction.
UPDATE_WHEN = (
    "coalesce(s.last_updated > t.last_updated, s.last_updated IS NOT NULL AND t.last_updated IS NULL) "
    "OR ((s.last_updated <=> t.last_updated) AND ("
    "coalesce(try_cast(s.version_id AS BIGINT) > try_cast(t.version_id AS BIGINT), "
    "s.version_id IS NOT NULL AND t.version_id IS NULL) "
    "OR ((s.version_id <=> t.version_id) AND s.record_hash <> t.record_hash)))"
)


def newest_first() -> list[Column]:
    """Newest version first within a batch (see :data:`UPDATE_WHEN` for across batches)."""
    return [
        F.col("last_updated").desc_nulls_last(),
        F.expr("try_cast(version_id AS BIGINT)").desc_nulls_last(),
    ]


def single_json_value(text: Column) -> Column:
    """True when ``text`` holds exactly one JSON value (Spark's JSON readers stop after the first
    value and silently drop what follows, e.g. a second resource on the same NDJSON line). Jackson
    counts the elements of ``[text, 0]`` while skipping their content: 2 means one value."""
    return F.coalesce(F.json_array_length(F.concat(F.lit("["), text, F.lit("\n,0]"))) == 2, F.lit(False))


MAX_DEPTH = 1000  # Jackson's nesting limit in Spark's JSON readers
# one JSON string, unrolled with possessive quantifiers (a plain alternation recurses per character
# in java.util.regex and overflows the stack on long strings)
JSON_STRING = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'


def nesting_depth(text: Column) -> Column:
    """How deep objects and arrays nest in ``text`` (brackets inside strings ignored). Costly per
    character: evaluate it only for records that failed to parse."""
    brackets = F.regexp_replace(F.regexp_replace(text, JSON_STRING, ""), r"[^\[\]{}]", "")
    steps = F.transform(F.split(brackets, ""), lambda c: F.when(c.isin("[", "{"), 1).otherwise(-1))
    start = F.struct(F.lit(0).alias("depth"), F.lit(0).alias("deepest"))
    walk = F.aggregate(
        steps,
        start,
        lambda acc, step: F.struct(
            (acc["depth"] + step).alias("depth"),
            F.greatest(acc["deepest"], acc["depth"] + step).alias("deepest"),
        ),
    )
    return walk["deepest"]


def explode_bundles(docs: DataFrame) -> DataFrame:
    """Records holding a Bundle -> one record per bundle entry; other records stay as they are.

    Used for whole-file documents (``record_index`` 0: an entry's index is its 1-based position) and
    for NDJSON lines (a Bundle exported on line L: entry E gets ``L * ENTRY_STRIDE + E``, so each
    entry keeps a place of its own in lineage and quarantine). A record that is not a Bundle (a
    single resource, or malformed JSON) stays one record, for :func:`classify` to load or quarantine.
    Only records mentioning ``"Bundle"`` are parsed as one, so NDJSON lines of resources cost a scan.
    """
    maybe = F.col("text").contains('"Bundle"')
    parsed = docs.withColumn("_b", F.when(maybe, F.from_json("text", BUNDLE, JSON_OPTIONS)))
    is_bundle = (
        (F.col("_b.resourceType") == "Bundle")
        & F.col(f"_b.{CORRUPT}").isNull()
        & single_json_value(F.col("text"))
    )
    full_url = F.col("entry.fullUrl")
    relative = full_url.rlike(RELATIVE_URL)
    entries = (
        parsed.where(is_bundle)
        # per bundle, before the explode: a column computed beside it from ``text`` would keep the
        # whole bundle's text on every entry's row (a patient export of 300 entries x 1 MB each)
        .select(
            "source_file",
            "record_index",
            "bad_utf8",
            _document_scope().alias("_scope"),
            F.when(_has_composition(), F.col("text")).alias("_bundle"),
            "_b",
        )
        .select(
            "source_file",
            "record_index",
            "bad_utf8",
            "_scope",
            "_bundle",
            F.posexplode("_b.entry").alias("pos", "entry"),
        )
        .select(
            "source_file",
            (F.col("record_index") * ENTRY_STRIDE + F.col("pos") + 1).cast("long").alias("record_index"),
            F.col("entry.resource").alias("text"),
            "bad_utf8",
            F.lit(None).cast("string").alias("read_error"),
            F.to_json(F.struct(full_url.alias("fullUrl"))).alias("_entry_stub"),
            F.when(full_url.isNull() | relative, F.col("_scope")).alias("_doc_scope"),
            F.when(F.col("_scope").isNotNull() & relative, F.regexp_extract(full_url, "/(.+)$", 1)).alias(
                "_doc_local"
            ),
            _note_context(F.col("entry.resource"), F.col("_bundle")).alias(NOTE_CONTEXT),
        )
    )
    singles = parsed.where(~is_bundle | is_bundle.isNull()).select(
        "source_file",
        "record_index",
        "text",
        "bad_utf8",
        "read_error",
        *[F.lit(None).cast("string").alias(c) for c in ENTRY_COLUMNS],
    )
    return entries.unionByName(singles)


NOTE_CONTEXT = copies.NOTE_CONTEXT
ENTRY_COLUMNS = ("_entry_stub", "_doc_scope", "_doc_local", NOTE_CONTEXT)
ENTRY_STRIDE = 1_000_000  # entries per Bundle on one NDJSON line that keep distinct record indexes


def _is_composition(resource: Column) -> Column:
    named = F.get_json_object(resource, "$.resourceType") == "Composition"
    return resource.contains('"Composition"') & named


def _has_composition() -> Column:
    """Whether the bundle holds a ``Composition`` (a FHIR document): only its entries carry the
    bundle's text until :func:`_note_context` (a patient's export of thousands of entries does not)."""
    held = F.exists("_b.entry", lambda e: _is_composition(e["resource"]))
    return F.col("text").contains('"Composition"') & held


def _note_context(resource: Column, bundle: Column) -> Column:
    """For a ``Composition`` entry: ``{"resource": ..., "bundle": ...}``, the entry with its whole
    bundle, whose other entries its sections point at (:func:`ehrlake.notes.documents.notes`); the
    ``note_text`` copy is made from it at sealing (:mod:`ehrlake.security.copies`), and it is never
    written. Null for every other entry."""
    return F.when(
        bundle.isNotNull() & _is_composition(resource),
        F.concat(F.lit('{"resource":'), resource, F.lit(',"bundle":'), bundle, F.lit("}")),
    )


def _document_scope() -> Column:
    """A ``document`` Bundle's identity as a short hash (null for other bundle types)."""
    ident = F.col("_b.identifier")
    identity = F.coalesce(
        F.when(
            ident["value"].isNotNull(),
            F.concat_ws("|", F.coalesce(ident["system"], F.lit("")), ident["value"]),
        ),
        F.when(F.col("_b.id").isNotNull(), F.concat(F.lit("Bundle/"), F.col("_b.id"))),
        F.col("text"),
    )
    return F.when(F.col("_b.type").isin(*DOCUMENT_SCOPED), F.substring(F.sha2(identity, 256), 1, SCOPE_HEX))


def classify(records: DataFrame, source_system: str) -> DataFrame:
    """Add the envelope (resource_type, id, version_id, last_updated), the target ``entity`` table and,
    for records that cannot be loaded, ``_reason``/``_message``. Keeps ``raw`` = the record text."""
    for c in ("read_error", *ENTRY_COLUMNS):
        if c not in records.columns:
            records = records.withColumn(c, F.lit(None).cast("string"))
    env = F.from_json("text", ENVELOPE, JSON_OPTIONS)
    scope = F.col("_doc_scope")
    df = records.select(
        F.lit(source_system).alias("source_system"),
        "source_file",
        "record_index",
        "bad_utf8",
        "read_error",
        F.coalesce("text", "_entry_stub").alias("raw"),
        F.col("text").isNull().alias("_no_resource"),
        F.col("_entry_stub").isNotNull().alias("_entry"),
        env.alias("_env"),
        "_doc_scope",
        "_doc_local",
        NOTE_CONTEXT,
        F.when(
            scope.isNotNull(),
            F.regexp_replace("text", RELATIVE_REFERENCE, F.concat(F.lit("$1"), scope, F.lit(".$2"))),
        ).alias("_typed_text"),
    )
    rtype, local_id = F.col("_env.resourceType"), F.col("_env.id")
    rid = F.when(
        scope.isNotNull(), F.concat(scope, F.lit("."), F.coalesce("_doc_local", local_id))
    ).otherwise(local_id)
    last_updated_raw = F.col("_env.meta.lastUpdated")
    known = rtype.isin(list(model.R4_RESOURCE_TYPES))
    checks = [
        (F.col("read_error").isNotNull(), Reason.UNREADABLE_FILE, F.col("read_error")),
        (F.col("bad_utf8"), Reason.INVALID_UTF8, F.lit("record is not valid UTF-8")),
        (F.col("_no_resource"), Reason.MISSING_RESOURCE, F.lit("bundle entry has no resource")),
        (
            F.col(f"_env.{CORRUPT}").isNotNull() & (nesting_depth(F.col("raw")) > MAX_DEPTH),
            Reason.TOO_DEEP,
            F.lit(f"JSON nested deeper than {MAX_DEPTH} levels"),
        ),
        (F.col(f"_env.{CORRUPT}").isNotNull(), Reason.MALFORMED_JSON, F.lit("not a parseable JSON object")),
        (
            ~F.col("_entry") & ~single_json_value(F.col("raw")),  # entries are re-serialized: one value
            Reason.MALFORMED_JSON,
            F.lit("more than one JSON value in the record (or text after it): one resource per line"),
        ),
        (rtype.isNull(), Reason.MISSING_RESOURCE_TYPE, F.lit("resourceType is missing")),
        # the value is not quoted: it is input text (anyone's name could be there); raw keeps it sealed
        (
            ~known,
            Reason.UNKNOWN_RESOURCE_TYPE,
            F.lit("not a FHIR R4 resource type (the value is sealed in raw)"),
        ),
        (rid.isNull() | (F.trim(rid) == ""), Reason.MISSING_ID, F.concat(rtype, F.lit(" without id"))),
    ]
    reason, message = first_failure(checks)
    entity = F.lit(model.OTHER_TABLE)
    for bronze in load().values():
        entity = F.when(rtype == bronze.resource_type, F.lit(bronze.table)).otherwise(entity)
    last_updated = F.expr("try_cast(_env.meta.lastUpdated AS TIMESTAMP)")
    return df.select(
        "source_system",
        "source_file",
        "record_index",
        "raw",
        rtype.alias("resource_type"),
        rid.alias("id"),
        F.col("_env.meta.versionId").alias("version_id"),
        last_updated.alias("last_updated"),
        # an unreadable lastUpdated orders the record as unversioned; the problem is kept with the row
        F.when(
            last_updated_raw.isNotNull() & last_updated.isNull(),
            F.lit("meta.lastUpdated: not a valid instant (read as absent)"),
        )
        .when(
            F.col("_doc_local") != local_id,
            F.lit("id: differs from the bundle entry's fullUrl (keyed by the fullUrl)"),
        )
        .alias("_envelope_issue"),
        "_typed_text",
        NOTE_CONTEXT,
        F.when(known, entity).alias("entity"),
        reason.alias("_reason"),
        message.alias("_message"),
    )


def type_view(valid: DataFrame, bronze: BronzeView, run_id: str, ingested_at: Column) -> DataFrame:
    """Records of one resource type -> bronze rows typed by the table's view, with
    ``conformance_issues``; ``_reason``/``_message`` for records that name no patient although
    their type is about one (they cannot be linked, so they are quarantined)."""
    keep = (
        "source_system",
        "_key",  # the envelope's id (document-scoped where needed), not the view's own id column
        "version_id",
        "last_updated",
        "raw",
        "source_file",
        "record_index",
        "_envelope_issue",
        "_v",
        NOTE_CONTEXT,
    )
    parsed = valid.withColumn("_v", F.try_parse_json(F.coalesce("_typed_text", "raw"))).withColumn(
        "_key", F.col("id")
    )
    typed = views.run(bronze.view, parsed, "_v", keep=keep, tolerant=True, drift=bronze.drift)
    issues = F.concat(
        F.filter(F.array(F.col("_envelope_issue")), lambda i: i.isNotNull()), F.col(views.ISSUES)
    ).alias(views.ISSUES)
    checks = [
        (
            F.col("_v").isNull(),
            Reason.MALFORMED_JSON,
            F.lit("not readable as one JSON document (nested too deep, or a duplicate key)"),
        )
    ]
    if bronze.patient_column:
        checks.append(
            (
                F.col(bronze.patient_column).isNull(),
                Reason.MISSING_SUBJECT,
                F.lit(f"{bronze.resource_type} names no patient (subject/patient reference)"),
            )
        )
    reason, message = first_failure(checks)
    return typed.select(
        "source_system",
        F.col("_key").alias("id"),
        "version_id",
        "last_updated",
        *[c.name for c in bronze.columns],
        issues,
        "raw",
        F.sha2("raw", 256).alias("record_hash"),
        *lineage(run_id, ingested_at),
        *([NOTE_CONTEXT] if copies.NOTE_TEXT in bronze.protection.copies else []),  # dropped at sealing
        reason.alias("_reason"),
        message.alias("_message"),
    )


def type_other(valid: DataFrame, run_id: str, ingested_at: Column) -> DataFrame:
    """Valid FHIR R4 resources of types not modelled above: kept whole, keyed by type and id."""
    patient_ref = F.expr(
        "from_json(coalesce(_typed_text, raw), "
        "'struct<subject:struct<reference:string>,patient:struct<reference:string>>')"
    )
    ref = F.coalesce(patient_ref["subject"]["reference"], patient_ref["patient"]["reference"])
    return valid.select(
        "source_system",
        "resource_type",
        "id",
        "version_id",
        "last_updated",
        F.when(
            ref.like("%Patient/%") | ref.startswith("urn:uuid:"), F.regexp_extract(ref, r"([^/:]+)$", 1)
        ).alias("patient_id"),
        F.filter(F.array(F.col("_envelope_issue")), lambda i: i.isNotNull()).alias(views.ISSUES),
        "raw",
        F.sha2("raw", 256).alias("record_hash"),
        *lineage(run_id, ingested_at),
        F.lit(None).cast("string").alias("_reason"),
        F.lit(None).cast("string").alias("_message"),
    )
