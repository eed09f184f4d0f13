"""``silver.note`` and ``silver.note_concept``: clinical notes de-identified, split into sections,
and their mentions of the lake's codes with ConText flags.

Sources are the bronze tables whose records carry notes (``DocumentReference``, ``Composition``,
and the note tables CSV extracts declare): ingest kept each record's notes as a processing copy
under the table's data key (``note_text``, :mod:`ehrlake.security.copies`) and each patient's
identifiers as keyed fingerprints (``id_prints`` of ``bronze.fhir_patient``), so this job
de-identifies without any identifier in the clear. Per note, in one Python pass on the
executors (:mod:`ehrlake.notes`):

- ``text_deid``: the patient's own identifiers and the identifying patterns replaced by typed
  placeholders, dates moved by the patient's own offset (:func:`ehrlake.notes.deid.date_offset`
  under a secret derived from the linkage secret); readable by analysts;
- ``text``: the note as sent, sealed to the reveal key like every identifier;
- ``sections`` (title and offsets into ``text_deid``) and the concepts found in ``text_deid``:
  display names of the codes the lake's silver tables hold (so each maps to a code), with
  negated / historical / family / hypothetical flags and the section.

A record whose attachment holds no text (a PDF report) is a note row with ``no_text`` saying why:
kept, not dropped. Both tables are rebuilt from bronze (the same input gives the same tables), or,
in an incremental clean, only the patients whose note records or identifiers changed since the
versions the last run read are recomputed and their rows replaced (:mod:`ehrlake.lake.increments`);
a changed code list (the concepts' targets), changed code, a changed note without a patient or
too many patients changed rebuild instead. The code list reaches the driver (one row per distinct
code and name), the notes never do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_type

from ehrlake.lake import WriteMode, increments, watermarks
from ehrlake.lake.catalog import list_tables
from ehrlake.lake.increments import REBUILT, UNCHANGED
from ehrlake.notes import concepts, deid
from ehrlake.security import copies
from ehrlake.security.columns import KeyRef
from ehrlake.security.protection import Sealing, TableProtection

NOTE, CONCEPT = "silver.note", "silver.note_concept"
# FHIR's note tables and the resource type of their records: a note id names the type, since a
# document bundle may give a Composition and a DocumentReference the same id (ABDM's do)
SOURCES = {"bronze.fhir_document_reference": "DocumentReference", "bronze.fhir_composition": "Composition"}
PATIENTS = "bronze.fhir_patient"
# silver tables whose codes are looked for in notes, and the kind a mention of one has
CODED = {
    "condition": "silver.condition",
    "medication": "silver.medication",
    "procedure": "silver.procedure",
    "immunization": "silver.immunization",
    "allergy": "silver.allergy",
}
NOTE_KEYS = ["source_system", "note_id"]
CONCEPT_KEYS = [*NOTE_KEYS, "kind", "code_system", "code", "display", "start", "end"]  # a mention
POPULATION = "silver.patient"  # the share of patients changed is taken of it
SEALED_TEXT = TableProtection(("text",))  # the note as sent: to the reveal key
_COPY = (
    "struct<notes:array<struct<note_id:string,encounter:string,date:string,kind:string,"
    "author_role:string,text:string>>,skipped:array<struct<note_id:string,reason:string,"
    "encounter:string,date:string,kind:string>>>"
)
_SECTION = pa.struct([("title", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
_MENTION = pa.struct(
    [
        ("kind", pa.string()),
        ("code_system", pa.string()),
        ("code", pa.string()),
        ("display", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        *[(flag, pa.bool_()) for flag in concepts.FLAGS],
        ("section", pa.string()),
    ]
)
_RESULT = pa.struct(
    [("text_deid", pa.string()), ("sections", pa.list_(_SECTION)), ("mentions", pa.list_(_MENTION))]
)
_RESULT_DDL = from_arrow_type(_RESULT).simpleString()  # the same type, for Spark


def _opened(lake, table: str, column: str, version: int | None = None) -> DataFrame | None:
    """``table`` (at ``version``) with its sealed processing copy ``column`` opened; None where the
    table has none (written before ingest kept it: re-ingest its files to read its notes)."""
    df = lake.read(table, version=version)
    sealing = Sealing.of(df.schema)
    if sealing is None or column not in sealing.columns:
        return None
    return lake.security.protector.open(df, table, sealing.only([column]))


def sources(lake) -> list[str]:
    """The bronze tables with a ``note_text`` copy: FHIR's note resources, then any declared note
    table of a CSV extract (found by its sealed copy, so a declaration outside ``conf/extracts``
    counts too). A FHIR table written before ingest kept the copy has none: re-ingest its files."""
    found = []
    for table in [*[t for t in SOURCES if lake.exists(t)], *sorted(str(n) for n in list_tables(lake.root))]:
        if table.startswith("bronze.") and table not in found:
            sealing = Sealing.of(lake.schema(table))
            if sealing is not None and copies.NOTE_TEXT in sealing.columns:
                found.append(table)
    return found


def _header(df: DataFrame, name: str) -> F.Column:
    """A record's own typed header column where its table has it (FHIR's), else null."""
    return F.col(name).cast("string") if name in df.columns else F.lit(None).cast("string")


def _note_rows(lake, tables: list[str], read_at: dict[str, int]) -> DataFrame:
    """One row per note (or per record without readable text), with the text as sent, from the
    note ``tables`` at their versions in ``read_at``."""
    parts = []
    for table in tables:
        df = _opened(lake, table, copies.NOTE_TEXT, read_at[table])
        copy = F.from_json(copies.NOTE_TEXT, _COPY)
        # a FHIR record's type and key (document-scoped where ingest made it so) name its notes
        if table in SOURCES:
            record = F.concat(F.lit(SOURCES[table] + "/"), F.col("id"))
        else:
            record = F.lit(None).cast("string")
        base = ["source_system", "patient_key", record.alias("_record"), F.lit(table).alias("source_table")]
        names = ["source_system", "patient_key", "_record", "source_table"]
        found = df.select(*base, F.explode(copy["notes"]).alias("n")).select(
            *names,
            *[f"n.{f}" for f in copies.NOTE_FIELDS],
            F.lit(None).cast("string").alias("no_text"),
        )
        # a record without text keeps its header: the copy's (a declared table's), else the
        # record's typed columns (a FHIR table's)
        if "encounter_ids" in df.columns:
            encounter = F.get("encounter_ids", 0)  # null where the record names none
        else:
            encounter = _header(df, "encounter_id")
        typed = {
            "encounter": encounter,
            "date": _header(df, "date"),
            "kind": _header(df, "type_code_display"),
        }
        skipped = df.select(
            *base, *[v.alias(f"_{k}") for k, v in typed.items()], F.explode(copy["skipped"]).alias("s")
        ).select(
            *names,
            "s.note_id",
            *[F.coalesce(f"s.{k}", f"_{k}").alias(k) for k in typed],
            F.lit(None).cast("string").alias("author_role"),
            F.lit(None).cast("string").alias("text"),
            F.col("s.reason").alias("no_text"),
        )
        parts += [found, skipped]
    rows = parts[0]
    for part in parts[1:]:
        rows = rows.unionByName(part)
    # with the attachment's position where a record has several
    note_id = F.concat(F.col("_record"), F.regexp_extract("note_id", r"(#\d+)$", 1))
    return rows.withColumn("note_id", F.coalesce(note_id, "note_id")).drop("_record")


def _prints(lake, read_at: dict[str, int]) -> DataFrame | None:
    """patient_key -> the patient's identifier fingerprints (their ``id_prints`` copy)."""
    if PATIENTS not in read_at:
        return None
    df = _opened(lake, PATIENTS, copies.ID_PRINTS, read_at[PATIENTS])
    if df is None:
        return None
    return df.select("patient_key", copies.ID_PRINTS).dropDuplicates(["patient_key"])


def targets(lake) -> list[concepts.Target]:
    """The display name of every code in the lake's coded silver tables (one row per distinct
    code and name reaches the driver: bounded by the code lists, not by the patients)."""
    out = []
    for kind, table in CODED.items():
        if not lake.exists(table):
            continue
        rows = (
            lake.read(table)
            .where(F.col("display").isNotNull() & F.col("code").isNotNull())
            .select("code_system", "code", "display")
            .distinct()
            .collect()
        )
        out += [concepts.Target(r.display, r.code_system or "", r.code, kind) for r in rows]
    return sorted(out, key=lambda t: (t.kind, t.phrase, t.code))


def _reader(ref: KeyRef, linkage_id: str, found: list[concepts.Target]):
    """The Arrow UDF that de-identifies each note and finds its sections and concepts (the linkage
    secret is read where it runs, never put in the plan)."""

    @F.arrow_udf(_RESULT_DDL)
    def read(patients: pa.Array, texts: pa.Array, prints: pa.Array) -> pa.Array:
        secret = ref.key(linkage_id).material
        shift = copies.shift_secret(secret)
        matcher = concepts.Matcher(found)
        keep = deid.vocabulary(t.phrase for t in found)  # "Parkinson's disease" is no one's name
        out = []
        columns = (patients.to_pylist(), texts.to_pylist(), prints.to_pylist())
        for patient, text, copy in zip(*columns, strict=True):
            if text is None:
                out.append(None)
                continue
            offset = deid.date_offset(patient, shift) if patient else 0
            clean = deid.deidentify(text, copies.read_prints(copy, secret), offset, keep).text
            mentions = [
                {
                    "kind": m.target.kind,
                    "code_system": m.target.system,
                    "code": m.target.code,
                    "display": m.target.phrase,
                    "start": m.start,
                    "end": m.end,
                    **{flag: getattr(m, flag) for flag in concepts.FLAGS},
                    "section": m.section,
                }
                for m in matcher.find(clean)
            ]
            sections = [{"title": t, "start": s, "end": e} for t, s, e in concepts.sections(clean)]
            out.append({"text_deid": clean, "sections": sections, "mentions": mentions})
        return pa.array(out, type=_RESULT)

    return read


def refresh(
    lake, run_id: str, incremental: float = 0.0, job: str = "clean"
) -> dict[str, tuple[int, list[str], str]] | None:
    """Bring both tables up to date with bronze: (rows, sources, what was done) per table name;
    None without note sources. ``incremental``: the share of the patients changed above which to
    rebuild (0: always rebuild); ``job``: whose watermarks (``ops.watermarks``) say what was read."""
    tables = sources(lake)
    if not tables:
        return None
    read_at = {t: lake.version(t) for t in [*tables, *([PATIENTS] if lake.exists(PATIENTS) else [])]}
    found = targets(lake)
    fp = watermarks.fingerprint(found, watermarks.code(sys.modules[__name__], Path(concepts.__file__).parent))
    patients = _changed(lake, read_at, fp, incremental, job)
    commit = {"ehrlakeJob": job, "ehrlakeRunId": run_id}
    try:
        if patients is not None and patients.isEmpty():
            how = dict.fromkeys((NOTE, CONCEPT), UNCHANGED)
        else:
            how = _write(lake, tables, read_at, found, patients, commit)
        watermarks.record(lake, [watermarks.Watermark(job, t, read_at, fp, run_id) for t in how], commit)
    finally:
        if patients is not None:
            patients.unpersist()
    return {t.split(".", 1)[1]: (lake.row_count(t), tables, how[t]) for t in how}


def _changed(lake, read_at: dict[str, int], fp: str, share: float, job: str) -> DataFrame | None:
    """The patients (persisted) whose note records or identifiers changed since the versions the
    last run read, when an incremental run can bring the tables up to date with them; else None."""
    if not share or not (lake.exists(NOTE) and lake.exists(CONCEPT)):
        return None
    mark = watermarks.read(lake, job).get(NOTE)
    changed = increments.changed_patients(lake, mark, read_at, fp, unkeyed_rebuilds=True)
    if changed is None:
        return None
    changed = changed.persist()
    if increments.too_many(lake, changed, POPULATION, share):
        changed.unpersist()
        return None
    return changed


def _write(lake, tables, read_at, found, patients: DataFrame | None, commit: dict) -> dict[str, str]:
    """Compute the notes of ``patients`` (None: of everyone) and write them: replaced patient by
    patient, or the tables rewritten; what was done to each table."""
    rows = _note_rows(lake, tables, read_at)
    prints = _prints(lake, read_at)
    if patients is not None:
        rows = rows.join(F.broadcast(patients), "patient_key", "left_semi")
    if prints is None:
        rows = rows.withColumn(copies.ID_PRINTS, F.lit(None).cast("string"))
    else:
        rows = rows.join(prints, "patient_key", "left")
    protector = lake.security.protector
    reader = _reader(protector.ref, protector.store.linkage_id(), found)
    done = (
        rows.withColumn("_r", reader("patient_key", "text", copies.ID_PRINTS))
        .withColumn("date", F.expr("try_cast(date AS TIMESTAMP)"))
        .persist()
    )
    try:
        note = done.select(
            "source_system",
            "note_id",
            "patient_key",
            F.regexp_extract("encounter", r"([^/:]+)$", 1).alias("encounter_id"),
            "date",
            F.col("kind").alias("note_type"),
            "author_role",
            "source_table",
            "no_text",
            "text",
            "_r.text_deid",
            "_r.sections",
        ).withColumn("encounter_id", F.nullif("encounter_id", F.lit("")))
        note, _ = protector.protect(note, NOTE, NOTE_KEYS, SEALED_TEXT)
        head = ["source_system", "note_id", "patient_key", "date"]
        mentions = (
            done.select(*head, F.explode("_r.mentions").alias("m"))
            .select(*head, "m.*")
            .dropDuplicates(CONCEPT_KEYS)  # one row per mention: the merge's key
        )
        if patients is None:
            lake.write(note, NOTE, mode=WriteMode.OVERWRITE, commit_info=commit)
            lake.write(mentions, CONCEPT, mode=WriteMode.OVERWRITE, commit_info=commit)
            return dict.fromkeys((NOTE, CONCEPT), REBUILT)
        # the sealed text is sealed afresh (a new nonce): a recomputed note is rewritten, a concept
        # only where it differs
        merged = {
            table: increments.replace_patients(lake, frame, table, keys, patients, commit)
            for table, frame, keys in ((NOTE, note, NOTE_KEYS), (CONCEPT, mentions, CONCEPT_KEYS))
        }
        return {table: increments.describe(counts) for table, counts in merged.items()}
    finally:
        done.unpersist()
