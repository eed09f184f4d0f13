"""Processing copies: what jobs must read of a record sealed to the reveal key, made from the plain
record inside ingest's one sealing UDF (the only place it is in the clear) and sealed under the
table's data key.

- ``raw_deid`` (every FHIR table): the record without its direct identifiers
  (:func:`ehrlake.security.deidentify.fhir_record`), which views over lake tables flatten;
- ``note_text`` (``DocumentReference``, ``Composition``): the notes the record carries, text as
  sent and header (:mod:`ehrlake.notes.documents`), for the clean job to de-identify; the text
  quotes names, so it is a copy jobs can open, like the exact birth date, and silver keeps only
  its de-identified form in the clear;
  a declared note table of a CSV extract (``notes:`` in ``conf/extracts``) has the same copy,
  made from its columns (:func:`note_of_row`);
- ``id_prints`` (``Patient``): the patient's names, address, phones and identifier numbers as
  keyed fingerprints (:func:`ehrlake.notes.deid.fingerprints`), which find them in that patient's
  notes without anyone holding them in the clear.

The fingerprint key and the notes' date-shift secret are derived from the linkage secret (one per
lake, never rotated, as patient keys are), so every run and table agrees on them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import asdict

from pyspark.sql import Column
from pyspark.sql import functions as F

from ehrlake.notes import deid, documents
from ehrlake.security import deidentify

RAW_DEID = "raw_deid"
NOTE_TEXT = "note_text"
ID_PRINTS = "id_prints"
# a plain column ingest adds beside a bundle's Composition: the entry with its bundle, which the
# ``note_text`` copy is made from instead of ``raw``; read by the sealing UDF, never written
NOTE_CONTEXT = "_note_context"
# the copies a FHIR resource type's table keeps beside raw_deid
BY_RESOURCE = {"Patient": (ID_PRINTS,), "DocumentReference": (NOTE_TEXT,), "Composition": (NOTE_TEXT,)}
COMPRESSED = frozenset({RAW_DEID, NOTE_TEXT})
# the header fields of a note, as a declared note table names its columns (``text`` required)
NOTE_FIELDS = ("note_id", "encounter", "date", "kind", "author_role", "text")
NO_TEXT = "the extract's row has no text"


def derived(linkage_secret: bytes, purpose: str) -> bytes:
    """A secret of its own for ``purpose`` (``"note-fingerprints"``, ``"note-date-shift"``)."""
    return hmac.new(linkage_secret, f"ehrlake:{purpose}".encode(), hashlib.sha256).digest()


def prints_key(linkage_secret: bytes) -> bytes:
    return derived(linkage_secret, "note-fingerprints")[:32]


def shift_secret(linkage_secret: bytes) -> bytes:
    return derived(linkage_secret, "note-date-shift")


def _resource(text: bytes | str | None) -> dict | None:
    if text is None:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def note_text(text: bytes | str | None, linkage_secret: bytes | None = None) -> bytes | None:
    """The notes of one ``DocumentReference`` or ``Composition`` and what was skipped, as JSON;
    ``text`` is the resource, or (:data:`NOTE_CONTEXT`) the resource with its bundle."""
    resource = _resource(text)
    if resource is None:
        return None
    bundle = None
    if "resourceType" not in resource and isinstance(resource.get("resource"), dict):
        resource, bundle = resource["resource"], resource.get("bundle")
    try:
        in_bundle = documents.bundle_index(bundle) if isinstance(bundle, dict) else None
        found, skipped = documents.notes(resource, in_bundle)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:  # a shape FHIR does not allow
        found, skipped = [], [documents.Skipped(str(resource.get("id", "")), _unreadable(exc))]
    copy = {"notes": [asdict(n) for n in found], "skipped": [asdict(s) for s in skipped]}
    return json.dumps(copy, ensure_ascii=False, separators=(",", ":")).encode()


def note_of_row(columns: dict[str, str]) -> Column:
    """The ``note_text`` copy of one row of a declared note table: the JSON a ``DocumentReference``'s
    copy holds, from the columns that ``columns`` names per field of :data:`NOTE_FIELDS` (a field
    not named is null); a row with a blank text is a skipped note with its header, not a note."""
    field = lambda name: (  # noqa: E731
        F.col(columns[name]).cast("string") if columns.get(name) else F.lit(None).cast("string")
    ).alias(name)
    has_text = F.coalesce(F.length(F.trim(F.col(columns["text"]))) > 0, F.lit(False))
    note = F.struct(*[field(name) for name in NOTE_FIELDS])
    skipped = F.struct(
        field("note_id"), F.lit(NO_TEXT).alias("reason"), field("encounter"), field("date"), field("kind")
    )
    # a null array is left out of the JSON and read back as no entries
    return F.to_json(
        F.struct(
            F.when(has_text, F.array(note)).alias("notes"),
            F.when(~has_text, F.array(skipped)).alias("skipped"),
        )
    )


def _unreadable(exc: Exception) -> str:
    return f"notes not readable: the record's content has a shape FHIR does not allow ({type(exc).__name__})"


def id_prints(text: bytes | str | None, linkage_secret: bytes | None = None) -> bytes | None:
    """A ``Patient``'s identifiers as fingerprints under the lake's key, as JSON."""
    resource = _resource(text)
    if resource is None:
        return None
    if linkage_secret is None:
        raise ValueError("fingerprints need the linkage secret (the patient table has patient keys)")
    try:
        known = deid.known_of_patient(resource)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:  # the patterns still apply
        return json.dumps({"prints": [], "window": 1, "unreadable": _unreadable(exc)}).encode()
    prints = deid.fingerprints(known, prints_key(linkage_secret))
    return json.dumps({"prints": sorted(prints.prints), "window": prints.window}).encode()


def read_prints(copy: str | None, linkage_secret: bytes) -> deid.Fingerprints:
    """The :class:`~ehrlake.notes.deid.Fingerprints` of an ``id_prints`` copy (none: no prints)."""
    data = json.loads(copy) if copy else {"prints": [], "window": 1}
    return deid.Fingerprints(prints_key(linkage_secret), frozenset(data["prints"]), data["window"])


def _record(text: bytes | str | None, linkage_secret: bytes | None = None) -> bytes | None:
    return deidentify.fhir_record(text)


MAKERS: dict[str, Callable[[bytes | str | None, bytes | None], bytes | None]] = {
    RAW_DEID: _record,
    NOTE_TEXT: note_text,
    ID_PRINTS: id_prints,
}
