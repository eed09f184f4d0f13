"""The processing copy of a FHIR record: the record with its direct identifiers taken out.

Ingest keeps every record twice. ``raw``, the record as sent, is sealed to the reveal key, which jobs
do not hold; ``raw_deid``, this module's copy, is sealed under the table's data key, so jobs (views
over lake tables) read whole records without being able to read a name. What is taken out, wherever
it appears in a resource:

- people's names, contact points, addresses, photos and contacts (``name`` when it is a HumanName,
  ``telecom``, ``address``, ``photo``, ``contact``), and positions (``position``: coordinates);
- the value of every ``identifier`` (MRN, SSN, ABHA number...; its system and type stay, so a view can
  still tell which kinds of identifier a patient has), and ``masterIdentifier``'s;
- the ``display`` of references (often the patient's or the clinician's name);
- free text that may quote anyone: the narrative (``text`` when it is a Narrative), ``note``
  (Annotations), attachment content (``data``, ``url``);
- extensions that carry any of the above (``value[x]`` of type HumanName, Address, ContactPoint,
  Identifier, Attachment) or are identifying by definition (birth place, mother's maiden name);
- text typed into a date element (a value of ``birthDate``, ``deceasedDateTime``, ``lastUpdated``...
  that is no FHIR date).

Dates stay (ages and intervals are computed from them; they are under the data key, as the birth date
column is). The copy is tagged ``meta.security`` = REDACTED (HL7 v3 ObservationValue), the FHIR way of
saying that elements were removed.
"""

from __future__ import annotations

import json
import re

DROPPED = frozenset({"telecom", "address", "photo", "contact", "position", "note"})
EXTENSIONS = frozenset({"extension", "modifierExtension"})
IDENTIFIERS = frozenset({"identifier", "masterIdentifier", "valueIdentifier"})
VALUE_TYPES = ("valueHumanName", "valueAddress", "valueContactPoint", "valueIdentifier", "valueAttachment")
IDENTIFYING_EXTENSIONS = ("patient-birthPlace", "patient-mothersMaidenName", "patient-nationality")
# date-typed elements: a value that is not a FHIR date/dateTime/instant is text typed into the wrong
# field (a name in deceasedDateTime), so it goes too
DATES = frozenset({"date", "lastUpdated", "issued", "start", "end", "authoredOn", "recorded", "created"})
DATE_SUFFIXES = ("Date", "DateTime", "Instant")
FHIR_DATE = re.compile(r"-?[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9:.]+(Z|[+-][0-9:]+)?)?)?)?")
REDACTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "REDACTED"}


def _is_identifying_extension(ext) -> bool:
    if not isinstance(ext, dict):
        return False
    url = ext.get("url")
    if isinstance(url, str) and url.endswith(IDENTIFYING_EXTENSIONS):
        return True
    return any(k in ext for k in VALUE_TYPES)


def scrub(value, element: str = ""):
    """``value`` without its identifying elements, as a new structure (``element``: the name it has
    in its parent, which says what an object is: an identifier's ``value`` goes, a quantity's stays)."""
    if isinstance(value, list):
        return [scrub(e, element) for e in value]
    if not isinstance(value, dict):
        return value
    kept = {}
    identifier = element in IDENTIFIERS
    attachment = "contentType" in value
    reference = "reference" in value
    for k, v in value.items():
        if k in DROPPED:
            continue
        kind = type(v)
        if kind is dict or kind is list:
            if k in ("name", "text"):  # HumanName(s), Narrative; an Organization's name (a string) stays
                continue
            if k in EXTENSIONS and kind is list:
                v = [scrub(e, k) for e in v if not _is_identifying_extension(e)]
            else:
                v = scrub(v, k)
        elif (
            (identifier and k == "value")
            or (reference and k == "display")
            or (attachment and k in ("data", "url"))
            or (kind is str and (k in DATES or k.endswith(DATE_SUFFIXES)) and not FHIR_DATE.fullmatch(v))
        ):
            continue
        kept[k] = v
    return kept


def fhir_record(text: bytes | str | None) -> bytes | None:
    """The processing copy of one FHIR record (UTF-8 JSON in, compact UTF-8 JSON out), tagged
    REDACTED. A record that cannot be read as a JSON object (ingest only passes ones it parsed)
    keeps nothing of its content."""
    if text is None:
        return None
    try:
        clean = scrub(json.loads(text))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's stack allows
        clean = None
    if not isinstance(clean, dict):
        return json.dumps({"meta": {"security": [REDACTED]}}).encode()
    meta = clean.get("meta") if isinstance(clean.get("meta"), dict) else {}
    labels = meta.get("security") if isinstance(meta.get("security"), list) else []
    clean["meta"] = {**meta, "security": [*[s for s in labels if s != REDACTED], REDACTED]}
    return json.dumps(clean, ensure_ascii=False, separators=(",", ":")).encode()
