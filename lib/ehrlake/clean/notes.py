"""``silver.note`` and ``silver.note_concept``: clinical notes de-identified, split into sections,
and their mentions of the lake's codes with ConText flags.

Sources are the bronze tables whose records carry notes (``DocumentReference``, ``Composition``):
ingest kept each record's notes as a processing copy under the table's data key (``note_text``,
:mod:`ehrlake.security.copies`) and each patient's identifiers as keyed fingerprints
(``id_prints`` of ``bronze.fhir_patient``), so this job de-identifies without any identifier in
the clear. Per note, in one Python pass on the executors (:mod:`ehrlake.notes`):

- ``text_deid``: the patient's own identifiers and the identifying patterns replaced by typed
  placeholders, dates moved by the patient's own offset (:func:`ehrlake.notes.deid.date_offset`
  under a secret derived from the linkage secret); readable by analysts;
- ``text``: the note as sent, sealed to the reveal key like every identifier;
- ``sections`` (title and offsets into ``text_deid``) and the concepts found in ``text_deid``:
  display names of the codes the lake's silver tables hold (so each maps to a code), with
  negated / historical / family / hypothetical flags and the section.

A record whose attachment holds no text (a PDF report) is a note row with ``no_text`` saying why:
kept, not dropped. Both tables are rebuilt from bronze on every clean (the same input gives the
same tables). The code list reaches the driver (one row per distinct code and name), the notes
never do.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.lake import WriteMode
from ehrlake.notes import concepts, deid
from ehrlake.security import copies
from ehrlake.security.columns import KeyRef
from ehrlake.security.protection import Sealing, TableProtection

NOTE, CONCEPT = "silver.note", "silver.note_concept"
SOURCES = ("bronze.fhir_document_reference", "bronze.fhir_composition")
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
SKIPPED_HEADER = ("date", "type_code_display")
SEALED_TEXT = TableProtection(("text",))  # the note as sent: to the reveal key
_COPY = (
    "struct<notes:array<struct<note_id:string,encounter:string,date:string,kind:string,"
    "author_role:string,text:string>>,skipped:array<struct<note_id:string,reason:string>>>"
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
_RESULT_DDL = (
    "struct<text_deid:string,sections:array<struct<title:string,start:int,end:int>>,"
    "mentions:array<struct<kind:string,code_system:string,code:string,display:string,start:int,end:int,"
    + ",".join(f"{flag}:boolean" for flag in concepts.FLAGS)
    + ",section:string>>>"
)


def _opened(lake, table: str, column: str) -> DataFrame | None:
    """``table`` with its sealed processing copy ``column`` opened; None where the table has none
    (written before ingest kept it: re-ingest its files to read its notes)."""
    df = lake.read(table)
    sealing = Sealing.of(df.schema)
    if sealing is None or column not in sealing.columns:
        return None
    return lake.security.protector.open(df, table, sealing.only([column]))


def _note_rows(lake) -> tuple[DataFrame | None, list[str]]:
    """One row per note (or per record without readable text), with the text as sent; the
    source tables read."""
    parts, read = [], []
    for table in SOURCES:
        if not lake.exists(table):
            continue
        df = _opened(lake, table, copies.NOTE_TEXT)
        if df is None:
            continue
        read.append(table)
        copy = F.from_json(copies.NOTE_TEXT, _COPY)
        base = ["source_system", "id", "patient_key", F.lit(table).alias("source_table")]
        found = df.select(*base, F.explode(copy["notes"]).alias("n")).select(
            *base[:-1],
            "source_table",
            "n.note_id",
            "n.encounter",
            "n.date",
            "n.kind",
            "n.author_role",
            "n.text",
            F.lit(None).cast("string").alias("no_text"),
        )
        # a record without text keeps its header from the typed columns
        encounter = "encounter_ids[0]" if "encounter_ids" in df.columns else "encounter_id"
        skipped = df.select(
            *base,
            *SKIPPED_HEADER,
            F.expr(encounter).alias("encounter"),
            F.explode(copy["skipped"]).alias("s"),
        ).select(
            *base[:-1],
            "source_table",
            "s.note_id",
            "encounter",
            F.col("date").cast("string").alias("date"),
            F.col("type_code_display").alias("kind"),
            F.lit(None).cast("string").alias("author_role"),
            F.lit(None).cast("string").alias("text"),
            F.col("s.reason").alias("no_text"),
        )
        parts += [found, skipped]
    if not parts:
        return None, read
    rows = parts[0]
    for part in parts[1:]:
        rows = rows.unionByName(part)
    # the record's key (document-scoped where ingest made it so), with the attachment's position
    note_id = F.concat(F.col("id"), F.regexp_extract("note_id", r"(#\d+)$", 1))
    return rows.withColumn("note_id", note_id).drop("id"), read


def _prints(lake) -> DataFrame | None:
    """patient_key -> the patient's identifier fingerprints (their ``id_prints`` copy)."""
    if not lake.exists(PATIENTS):
        return None
    df = _opened(lake, PATIENTS, copies.ID_PRINTS)
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
        out = []
        columns = (patients.to_pylist(), texts.to_pylist(), prints.to_pylist())
        for patient, text, copy in zip(*columns, strict=True):
            if text is None:
                out.append(None)
                continue
            offset = deid.date_offset(patient, shift) if patient else 0
            clean = deid.deidentify(text, copies.read_prints(copy, secret), offset).text
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


def refresh(lake, run_id: str) -> dict[str, tuple[int, list[str]]] | None:
    """Rewrite both tables from bronze; (rows, sources) per table name, None without note sources."""
    rows, read = _note_rows(lake)
    if rows is None:
        return None
    prints = _prints(lake)
    if prints is None:
        rows = rows.withColumn(copies.ID_PRINTS, F.lit(None).cast("string"))
    else:
        rows = rows.join(prints, "patient_key", "left")
    protector = lake.security.protector
    reader = _reader(protector.ref, protector.store.linkage_id(), targets(lake))
    done = rows.withColumn("_r", reader("patient_key", "text", copies.ID_PRINTS)).persist()
    try:
        note = done.select(
            "source_system",
            "note_id",
            "patient_key",
            F.regexp_extract("encounter", r"([^/:]+)$", 1).alias("encounter_id"),
            F.expr("try_cast(date AS TIMESTAMP)").alias("date"),
            F.col("kind").alias("note_type"),
            "author_role",
            "source_table",
            "no_text",
            "text",
            "_r.text_deid",
            "_r.sections",
        ).withColumn("encounter_id", F.nullif("encounter_id", F.lit("")))
        note, _ = protector.protect(note, NOTE, NOTE_KEYS, SEALED_TEXT)
        written_at = F.expr("try_cast(date AS TIMESTAMP)").alias("date")
        mentions = done.select(
            "source_system", "note_id", "patient_key", written_at, F.explode("_r.mentions").alias("m")
        ).select("source_system", "note_id", "patient_key", "date", "m.*")
        commit = {"ehrlakeJob": "clean", "ehrlakeRunId": run_id}
        lake.write(note, NOTE, mode=WriteMode.OVERWRITE, commit_info=commit)
        lake.write(mentions, CONCEPT, mode=WriteMode.OVERWRITE, commit_info=commit)
        counts = {
            NOTE: lake.read(NOTE).count(),
            CONCEPT: lake.read(CONCEPT).count(),
        }
    finally:
        done.unpersist()
    return {table.split(".", 1)[1]: (n, read) for table, n in counts.items()}
