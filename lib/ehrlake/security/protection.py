"""What is protected in which table, and the one step that protects a DataFrame before it is written.

Direct identifiers (names, addresses, telecom, identifiers such as MRN/SSN/ABHA/passport/driver's
licence, home coordinates, DICOM identifying tags) and the whole source record (``raw``, which
contains all of them) are sealed to the reveal public key (:mod:`ehrlake.security.reveal_key`), which
jobs do not hold. Birth year and region (city, district, state, country) stay in clear for analysis.
Every row that refers to a patient gets ``patient_key``, the pseudonymous linkage key.

Free text that may quote anyone (survey answers, claim notes, comments moved aside as
``<column>_text``) is sealed to the reveal key too. What the pipeline itself must read is sealed under
the table's data key instead: the exact birth date (clean computes ages) and, for FHIR tables,
``raw_deid``: the record with its direct identifiers taken out (:mod:`ehrlake.security.deidentify`),
which views over lake tables flatten. So the master key that every ingest machine holds opens no
name, phone or identifier number.

Each sealed column describes itself in the table's Delta schema (field metadata ``ehrlake.sealed``:
its original type and the key columns its ciphertext is bound to), so readers, the access policy
and re-encryption need no knowledge of how a table was produced, and any Spark reader sees which
columns are ciphertext.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.errors import SchemaMismatch
from ehrlake.lake.modes import WriteMode
from ehrlake.security.columns import KeyRef, key_errors, open_columns, row_id, seal_columns
from ehrlake.security.copies import (  # processing copies: raw_deid, the record without direct identifiers
    NOTE_CONTEXT,
    NOTE_TEXT,
    RAW_DEID,
    note_of_row,
)

SEALED = "ehrlake.sealed"  # field metadata: {"type": original DDL, "bound_to": [key columns], "to"?}
TO_REVEAL = "reveal"  # metadata "to": sealed to the reveal public key (absent: under the data key)
RAW = "raw"  # the record as sent (sealed to the reveal key)


@dataclass(frozen=True)
class TableProtection:
    """Sealed columns of one table (``raw`` is always sealed where present) and its patient reference."""

    identifiers: tuple[str, ...] = ()
    patient_id: str | None = None  # column holding the source patient id; None: no patient link
    birth_date: str | None = None  # sealed, with ``birth_year`` kept in clear
    # column -> SQL condition under which its value is free text (moved to sealed ``<column>_text``);
    # e.g. survey answers such as "What address do you live at?" stored beside numeric results
    free_text: tuple[tuple[str, str], ...] = ()
    fhir_records: bool = False  # ``raw`` holds FHIR resources: keep their processing copy ``raw_deid``
    copies: tuple[str, ...] = ()  # further processing copies of ``raw`` (ehrlake.security.copies)
    # a declared note table: (note field, column) pairs its ``note_text`` copy is made from
    note_from: tuple[tuple[str, str], ...] = ()


_FHIR_PATIENT_REF = TableProtection(patient_id="patient_id", fhir_records=True)

TABLES: dict[str, TableProtection] = {
    # the typed FHIR tables declare their sealed columns in their views (conf/views/, ingest/fhir_views.py)
    "bronze.fhir_other": _FHIR_PATIENT_REF,
    "bronze.synthea_patients": TableProtection(
        (
            "ssn",
            "drivers",
            "passport",
            "prefix",
            "first",
            "middle",
            "last",
            "suffix",
            "maiden",
            "birthdate",
            "birthplace",
            "address",
            "zip",
            "lat",
            "lon",
        ),  # fmt: skip
        patient_id="id",
        birth_date="birthdate",
    ),
    "bronze.synthea_providers": TableProtection(("name",)),
    "bronze.synthea_claims": TableProtection(patient_id="patientid"),
    "bronze.synthea_claims_transactions": TableProtection(("notes", "linenote"), patient_id="patientid"),
    "bronze.synthea_payer_transitions": TableProtection(("memberid", "ownername"), patient_id="patient"),
}
# DICOM's identifying tags (ingest/images.py); PatientID itself is sealed, patient_key links the image
TABLES["bronze.images"] = TableProtection(
    ("patient_id", "patient_name", "patient_birth_date", "institution_name", "referring_physician",
     "performing_physician", "accession_number"),
    patient_id="patient_id",
)  # fmt: skip
TABLES["bronze.synthea_observations"] = TableProtection(
    ("value_text",), patient_id="patient", free_text=(("value", "lower(type) = 'text'"),)
)
for _name in (
    "encounters", "conditions", "medications", "procedures", "immunizations",
    "allergies", "careplans", "imaging_studies", "devices", "supplies",
):  # fmt: skip
    TABLES[f"bronze.synthea_{_name}"] = TableProtection(patient_id="patient")


def declared(table: str) -> TableProtection:
    """The declaration for ``table``; tables not listed still get ``raw`` sealed."""
    return TABLES.get(table, TableProtection())


def _note_context_beside_raw(df: DataFrame, wanted: bool) -> tuple[DataFrame, dict[str, str]]:
    """Ingest's :data:`NOTE_CONTEXT` (a Composition with its bundle) as the ``note_text`` copy's
    source: moved beside ``raw`` and filled with it where null (so the copy keeps its place in the
    schema), as an input of the sealing only; dropped where the table makes no note copy."""
    if not wanted or RAW not in df.columns:
        return df.drop(NOTE_CONTEXT), {}
    order = [c for c in df.columns if c != NOTE_CONTEXT]
    at = order.index(RAW) + 1
    context = F.coalesce(NOTE_CONTEXT, RAW).alias(NOTE_CONTEXT)
    return df.select(*order[:at], context, *order[at:]), {NOTE_CONTEXT: "string"}


@dataclass(frozen=True)
class Sealing:
    """A table's sealed columns (name -> original Spark type) and the key columns they are bound to."""

    columns: dict[str, str]
    keys: tuple[str, ...]
    to_reveal: frozenset[str] = frozenset()  # of ``columns``: sealed to the reveal public key

    def mark(self, df: DataFrame) -> DataFrame:
        """Record the sealing in the schema's field metadata (it travels into the Delta schema)."""
        for name, ddl in self.columns.items():
            meta = {"type": ddl, "bound_to": list(self.keys)}
            df = df.withMetadata(name, {SEALED: meta | ({"to": TO_REVEAL} if name in self.to_reveal else {})})
        return df

    def only(self, names) -> Sealing:
        """The part of this sealing that covers ``names``."""
        names = set(names)
        return Sealing(
            {n: t for n, t in self.columns.items() if n in names}, self.keys, self.to_reveal & names
        )

    @property
    def under_data_key(self) -> Sealing:
        """The columns jobs can open (and re-encryption re-seals)."""
        return self.only(set(self.columns) - self.to_reveal)

    @classmethod
    def of(cls, schema) -> Sealing | None:
        """The sealing recorded in a table's schema; None when no column is sealed."""
        marked = {f.name: f.metadata[SEALED] for f in schema.fields if SEALED in (f.metadata or {})}
        if not marked:
            return None
        keys = {tuple(m["bound_to"]) for m in marked.values()}
        if len(keys) != 1:
            raise SchemaMismatch(f"sealed columns are bound to different key columns: {sorted(keys)}")
        to_reveal = frozenset(n for n, m in marked.items() if m.get("to") == TO_REVEAL)
        return cls({n: m["type"] for n, m in marked.items()}, keys.pop(), to_reveal)


class Protector:
    """Seals rows on their way into a table and opens them for roles allowed to read identifiers."""

    def __init__(self, ref: KeyRef, reveal_key_file: str | None = None):
        self.ref = ref
        self.store = ref.store()
        self.reveal_key_file = reveal_key_file  # where ``ehrlake reveal`` finds the private key

    def revealing(self) -> Protector:
        """A protector that also opens values sealed to the reveal key (for :meth:`Access.reveal`
        only; the key file is read on the executors of that one bounded query)."""
        ref = dataclasses.replace(self.ref, reveal_key_file=self.reveal_key_file)
        return Protector(ref, self.reveal_key_file)

    def patient_key(self, df: DataFrame, patient_id: str, source_system: Column, name: str) -> DataFrame:
        """``df`` with column ``name``: the pseudonymous key of patient ``patient_id`` of
        ``source_system``, the one ingest gives that patient's rows (nothing is sealed). ``df``
        has neither a ``patient_key`` nor a ``source_system`` column."""
        keyed = seal_columns(
            df.withColumn("source_system", source_system),
            self.ref,
            "",
            {},
            F.lit(""),
            (self.store.linkage_id(), patient_id),
        )
        return keyed.withColumnRenamed("patient_key", name).drop("source_system")

    @staticmethod
    def sealing(spec: TableProtection, schema, keys: list[str]) -> Sealing:
        """Which columns of ``schema`` are sealed (the declared identifiers, plus ``raw`` and its
        processing copies: ``raw_deid`` for FHIR records, the spec's ``copies``, a note table's
        ``note_text``), and which of them to the reveal key: all but what the pipeline reads itself
        (the copies, the birth date)."""
        types = {f.name: f.dataType.simpleString() for f in schema.fields}
        made = ((RAW_DEID,) if spec.fhir_records else ()) + spec.copies
        if RAW in types:
            types |= dict.fromkeys(made, "string")
        of_columns = (NOTE_TEXT,) if spec.note_from else ()
        wanted = [*spec.identifiers, RAW, RAW_DEID, *spec.copies, *of_columns]
        columns = {c: types[c] for c in wanted if c in types}
        read_by_jobs = {RAW_DEID, *spec.copies, *of_columns, spec.birth_date}
        return Sealing(columns, tuple(keys), frozenset(columns) - read_by_jobs)

    def protect(
        self, df: DataFrame, table: str, keys: list[str], spec: TableProtection | None = None
    ) -> tuple[DataFrame, Sealing]:
        """``df`` with ``birth_year``/``patient_key`` added and identifiers sealed under the table's
        current data key; returns the frame (sealing marked in its schema) and the :class:`Sealing`."""
        spec = spec or declared(table)
        for column, is_text in spec.free_text:
            if column in df.columns:
                text = F.coalesce(F.expr(is_text), F.lit(False))
                df = df.withColumn(f"{column}_text", F.when(text, F.col(column))).withColumn(
                    column, F.when(~text, F.col(column))
                )
        note_from = {f: c for f, c in spec.note_from if c in df.columns}  # a drifted header: null
        if "text" in note_from:
            df = df.withColumn(NOTE_TEXT, note_of_row(note_from))
        if spec.birth_date and spec.birth_date in df.columns:
            df = df.withColumn("birth_year", F.year(F.col(spec.birth_date).cast("date")))
        patient = (self.store.linkage_id(), spec.patient_id) if spec.patient_id in df.columns else None
        sealing = self.sealing(spec, df.schema, keys)
        copies = {c: RAW for c in (RAW_DEID, *spec.copies) if c in sealing.columns and c not in df.columns}
        inputs = {}
        if NOTE_CONTEXT in df.columns:  # plain text, never written
            df, inputs = _note_context_beside_raw(df, NOTE_TEXT in copies)
            copies |= dict.fromkeys([NOTE_TEXT] if inputs else [], NOTE_CONTEXT)
        sealed = seal_columns(
            df,
            self.ref,
            self.store.current_id(table),
            {c: t for c, t in sealing.columns.items() if c not in copies},
            row_id(table, keys),
            patient,
            sealing.to_reveal,
            copies,
            inputs,
        )
        return sealing.mark(sealed), sealing

    def seal(self, df: DataFrame, table: str, sealing: Sealing) -> DataFrame:
        """Seal the columns of an existing sealing (re-encryption under the table's current key)."""
        sealed = seal_columns(
            df,
            self.ref,
            self.store.current_id(table),
            sealing.columns,
            row_id(table, list(sealing.keys)),
            to_reveal=sealing.to_reveal,
        )
        return sealing.mark(sealed)

    def open(self, df: DataFrame, table: str, sealing: Sealing) -> DataFrame:
        """Plaintext of every sealed column, typed as before sealing (columns sealed to the reveal
        key only through :meth:`revealing`)."""
        return open_columns(df, self.ref, sealing.columns, row_id(table, list(sealing.keys)))

    def reencrypt(self, lake, table: str, commit_info: dict | None = None):
        """Rewrite every column of ``table`` sealed under a data key under its current one, as one
        new Delta version (run after ``keys rotate``); values sealed to the reveal key are kept as
        they are. Earlier versions keep their ciphertext and stay readable by time travel for as
        long as their key version is in the key store."""
        df = lake.read(table)
        sealing = Sealing.of(df.schema)
        sealing = sealing.under_data_key if sealing else None
        if not sealing or not sealing.columns:
            raise SchemaMismatch(f"{table} has no columns sealed under a data key; nothing to re-encrypt")
        resealed = self.seal(self.open(df, table, sealing), table, sealing)
        info = {
            "ehrlakeJob": "keys.reencrypt",
            "ehrlakeKeyId": self.store.current_id(table),
            **(commit_info or {}),
        }
        with key_errors():
            return lake.write(resealed, table, mode=WriteMode.OVERWRITE, commit_info=info)
