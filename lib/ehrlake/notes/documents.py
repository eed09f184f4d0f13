"""Notes out of FHIR resources: what a ``DocumentReference`` carries, and a document's narrative.

- **DocumentReference**: each attachment of a text type (``text/plain``, ``text/markdown``,
  ``text/html``) with inline base64 ``data``, or a ``url`` naming a ``Binary`` of the same bundle;
  other types (PDF, images) and attachments with nothing readable are :class:`Skipped` with the
  reason, never guessed at.
- **Composition** (a FHIR document such as ABDM's OPConsultNote): its own narrative, then each
  section as a ``# Title`` heading followed by the section's narrative or, where the section only
  references entries, the narratives (or code displays) of those entries in the bundle.

The text comes back as sent (names and all): it is for :mod:`ehrlake.notes.deid` and the sealed
column, nothing else. The author is kept as its kind (``Practitioner``, ``Patient``, ``Device``...),
not its name.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from html.parser import HTMLParser

TEXT_TYPES = ("text/plain", "text/markdown", "text/html", "application/xhtml+xml")


@dataclass(frozen=True)
class Note:
    note_id: str  # the resource's id, with the attachment's position where it has several
    resource_type: str
    patient: str | None  # the subject reference as written ("Patient/1", "urn:uuid:...")
    encounter: str | None
    date: str | None
    kind: str | None  # the document type's display or text
    author_role: str | None
    text: str


@dataclass(frozen=True)
class Skipped:
    note_id: str
    reason: str


class _Text(HTMLParser):
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        self.parts.append(data)


def plain_text(markup: str) -> str:
    """XHTML (a narrative's ``div``, an HTML note) as plain text, one line per block."""
    parser = _Text()
    parser.feed(markup)
    parser.close()
    text = re.sub(r"[ \t]+", " ", "".join(parser.parts))
    return re.sub(r"\n\s*\n+", "\n", text).strip()


def _display(concept: dict | None) -> str | None:
    if not concept:
        return None
    return concept.get("text") or next(
        (c.get("display") for c in concept.get("coding", []) if c.get("display")), None
    )


# where an entry without a narrative names what it is: a condition's or observation's code, a
# medication, a document's or report's type
_NAMED_BY = ("code", "medicationCodeableConcept", "vaccineCode", "type")


def _entry_words(entry: dict) -> str:
    """A section entry without a narrative, in words: what it names, and an observation's value."""
    named = next((_display(entry.get(k)) for k in _NAMED_BY if _display(entry.get(k))), None)
    value = entry.get("valueQuantity") or {}
    if named and value.get("value") is not None:
        named += f": {value['value']} {value.get('unit') or value.get('code') or ''}".rstrip()
    return named or ""


def _ref(value: dict | list | None) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value.get("reference") if isinstance(value, dict) else None


def _author_role(resource: dict) -> str | None:
    reference = _ref(resource.get("author"))
    return reference.split("/")[0] if reference and "/" in reference and ":" not in reference else None


def _decoded(attachment: dict, in_bundle: dict[str, dict]) -> str | None:
    """The attachment's text: inline data, or the data of the Binary its url names."""
    data = attachment.get("data")
    if data is None and attachment.get("url"):
        binary = in_bundle.get(attachment["url"])
        data = binary.get("data") if binary and binary.get("resourceType") == "Binary" else None
    if data is None:
        return None
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _narrative(resource: dict) -> str:
    div = (resource.get("text") or {}).get("div")
    return plain_text(div) if div else ""


def _meta(resource: dict, note_id: str) -> dict:
    return {
        "note_id": note_id,
        "resource_type": resource["resourceType"],
        "patient": _ref(resource.get("subject")),
        "author_role": _author_role(resource),
    }


def _from_reference(resource: dict, in_bundle: dict[str, dict]) -> tuple[list[Note], list[Skipped]]:
    notes, skipped = [], []
    contents = resource.get("content", [])
    encounter = _ref((resource.get("context") or {}).get("encounter"))
    for i, content in enumerate(contents):
        attachment = content.get("attachment", {})
        note_id = resource.get("id", "") + (f"#{i}" if len(contents) > 1 else "")
        kind = (attachment.get("contentType") or "").split(";")[0].strip().lower()
        if kind not in TEXT_TYPES:
            skipped.append(Skipped(note_id, f"attachment is {kind or 'of no declared type'}: no text read"))
            continue
        text = _decoded(attachment, in_bundle)
        if text is None:
            skipped.append(
                Skipped(note_id, "attachment has no readable data (none inline, no Binary in the bundle)")
            )
            continue
        if kind in ("text/html", "application/xhtml+xml"):
            text = plain_text(text)
        date = resource.get("date") or attachment.get("creation")
        kind_ = _display(resource.get("type"))
        notes.append(Note(**_meta(resource, note_id), encounter=encounter, date=date, kind=kind_, text=text))
    return notes, skipped


def _from_composition(resource: dict, in_bundle: dict[str, dict]) -> tuple[list[Note], list[Skipped]]:
    parts = [_narrative(resource)]
    for section in resource.get("section", []):
        body = _narrative(section) or "\n".join(
            _narrative(entry) or _entry_words(entry)
            for entry in (in_bundle.get(_ref(e) or "", {}) for e in section.get("entry", []))
        )
        parts.append(
            f"# {section.get('title') or _display(section.get('code')) or 'Section'}\n{body.strip()}"
        )
    text = "\n\n".join(p for p in parts if p.strip())
    note_id = resource.get("id", "")
    if not text.strip():
        return [], [Skipped(note_id, "composition has no narrative and no section text")]
    kind = _display(resource.get("type")) or resource.get("title")
    encounter = _ref(resource.get("encounter"))
    return [
        Note(**_meta(resource, note_id), encounter=encounter, date=resource.get("date"), kind=kind, text=text)
    ], []


def notes(resource: dict, in_bundle: dict[str, dict] | None = None) -> tuple[list[Note], list[Skipped]]:
    """(notes, skipped) of one resource; ``in_bundle``: the bundle's other resources by full URL
    and by ``Type/id``, which a Composition's sections and an attachment's url point at."""
    in_bundle = in_bundle or {}
    if resource.get("resourceType") == "DocumentReference":
        return _from_reference(resource, in_bundle)
    if resource.get("resourceType") == "Composition":
        return _from_composition(resource, in_bundle)
    return [], []


def bundle_index(bundle: dict) -> dict[str, dict]:
    """A bundle's resources by full URL and by ``Type/id``."""
    index = {}
    for entry in bundle.get("entry", []):
        resource = entry.get("resource") or {}
        if entry.get("fullUrl"):
            index[entry["fullUrl"]] = resource
        if resource.get("resourceType") and resource.get("id"):
            index[f"{resource['resourceType']}/{resource['id']}"] = resource
    return index
