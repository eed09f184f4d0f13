"""De-identification of clinical note text, before anyone but the sealed column sees it.

Three kinds of finder, their spans merged (the longest wins an overlap) and each replaced by a
typed placeholder (``[NAME]``, ``[ADDRESS]``, ``[PHONE]``...), except dates, which are shifted:

- **the patient's own identifiers** (:class:`Known`: names, street lines, places, phones, record
  numbers; the clean job opens them from the sealed bronze columns), removed wherever they occur,
  case-insensitive, Synthea's digit-suffixed names ("Masako522") with or without their digits;
- **patterns** that identify whoever they belong to: phone numbers (US and Indian), e-mail and ABHA
  addresses, SSN-, ABHA- and MRN-like numbers, street addresses, URLs, titled names ("Dr. Clint766
  Marquardt819") and Synthea's digit-suffixed ones, ages over 89 (written "90+"); and, by their
  context (:data:`IN_CONTEXT`, medspaCy-style rules), other persons' untitled names after a
  relation or role ("her husband Ravi", "seen by Anita Rao") and places after where someone lives
  or comes from ("lives in Lucknow"); and untitled names that no context marks, by
  :func:`name_list` (first and last names that no common English word shares: Philter's lists),
  unless the word is one of the lake's clinical vocabulary (``keep``: "Parkinson", "Crohn");
- **dates** moved by the patient's own offset (:func:`date_offset`: the same in every note of the
  patient, so intervals between notes and records still read true), written back in the format
  they came in; a date that cannot be read becomes ``[DATE]``.

Pure Python on strings: the same function runs per note on the executors and in a unit test. Its
result keeps the spans it replaced (kind and offsets in the original text), so a benchmark can
measure what it missed.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

MAX_SHIFT_DAYS = 365
MONTHS = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december",
)  # fmt: skip
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
STREET_TYPES = (
    "street", "st", "avenue", "ave", "road", "rd", "lane", "ln", "drive", "dr", "boulevard", "blvd",
    "court", "ct", "place", "pl", "way", "square", "sq", "terrace", "parkway", "pkwy", "highway", "hwy",
    "skyway", "trail", "circle", "nagar", "marg", "colony",
)  # fmt: skip
MIN_NAME = 2  # shorter name parts ("Al", initials) are too common a word to remove everywhere


@dataclass(frozen=True)
class Known:
    """One patient's identifiers as recorded in the structured data."""

    names: tuple[str, ...] = ()  # given and family names (Synthea's carry digits)
    streets: tuple[str, ...] = ()  # address lines
    places: tuple[str, ...] = ()  # city, district, postcode
    phones: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()  # MRN, SSN, ABHA number, licence


def known_of_patient(patient: dict) -> Known:
    """A FHIR ``Patient`` resource's identifiers as :class:`Known`: every given and family name
    (or the words of a name's ``text`` where it has no parts, as ABDM's do), address lines,
    cities, districts and postcodes, phone numbers and identifier values (MRN, SSN, ABHA...)."""
    names = []
    for name in patient.get("name", []):
        parts = [*name.get("given", []), name.get("family", "")]
        names += [p for p in parts if isinstance(p, str) and p] or str(name.get("text", "")).split()
    addresses = [a for a in patient.get("address", []) if isinstance(a, dict)]
    return Known(
        names=tuple(names),
        streets=tuple(line for a in addresses for line in a.get("line", []) if isinstance(line, str)),
        places=tuple(a[k] for a in addresses for k in ("city", "district", "postalCode") if a.get(k)),
        phones=tuple(t["value"] for t in patient.get("telecom", []) if t.get("system") == "phone"),
        numbers=tuple(i["value"] for i in patient.get("identifier", []) if isinstance(i.get("value"), str)),
    )


@dataclass(frozen=True)
class Span:
    start: int  # offsets in the original text
    end: int
    kind: str  # NAME, ADDRESS, LOCATION, PHONE, EMAIL, ID, URL, AGE, DATE
    replacement: str


@dataclass
class Deidentified:
    text: str
    spans: list[Span] = field(default_factory=list)


def date_offset(patient_key: str, secret: bytes, max_days: int = MAX_SHIFT_DAYS) -> int:
    """The patient's date shift in days: from an HMAC of their key, between 1 and ``max_days``
    either way (never 0); the same for every note of the patient, unknowable without ``secret``."""
    digest = hmac.new(secret, patient_key.encode(), hashlib.sha256).digest()
    days = 1 + int.from_bytes(digest[:4], "big") % max_days
    return days if digest[4] % 2 else -days


_WORDS = re.compile(r"[a-z0-9]+")
MAX_WINDOW = 8  # words of the longest street line or place matched as one identifier
# how an identifier of each kind is compared: as its words spaced, or packed (digits of a phone or
# record number, whatever separates them in the text)
SPACED, PACKED = ("NAME", "ADDRESS", "LOCATION"), ("PHONE", "ID")


@dataclass(frozen=True)
class Fingerprints:
    """A patient's identifiers as keyed hashes (:func:`fingerprints`): what a table can keep under
    its data key so that a job holding no reveal key still finds them in text, word for word."""

    key: bytes
    prints: frozenset[str]
    window: int = 1  # the most words one identifier spans


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _WORDS.finditer(text.lower())]


def _digest(key: bytes, kind: str, form: str) -> str:
    return hashlib.blake2b(f"{kind}:{form}".encode(), key=key, digest_size=16).hexdigest()


def fingerprints(known: Known, key: bytes) -> Fingerprints:
    """Keyed hashes of each identifier of ``known`` in its normal form: names by part (with and
    without Synthea's digits), streets and places as their words, phones and numbers as their
    letters and digits packed; and of the first word of each longer one (``HEAD``), so a search
    tries longer runs only from where one may start."""
    forms: set[tuple[str, str]] = set()
    for name in known.names:
        for part, _, _ in _words(name):
            forms |= {("NAME", p) for p in (part, part.rstrip("0123456789")) if len(p) >= MIN_NAME}
    window = 1
    for kind, values, shortest in (
        ("ADDRESS", known.streets, MIN_NAME),
        ("LOCATION", known.places, MIN_NAME),
        ("PHONE", known.phones, 6),
        ("ID", known.numbers, 4),
    ):
        for value in values:
            words = [w for w, _, _ in _words(value)]
            form = ("".join if kind in PACKED else " ".join)(words)
            if len(form) >= shortest:
                forms.add((kind, form))
                if len(words) > 1:
                    forms.add(("HEAD", words[0]))
                    window = max(window, min(len(words), MAX_WINDOW))
    return Fingerprints(key, frozenset(_digest(key, kind, form) for kind, form in forms), window)


def _known_spans(text: str, known: Fingerprints) -> list[Span]:
    """Every run of up to ``known.window`` words whose normal form is one of the patient's
    identifiers: a name part is one word (possessive or not), a phone or number has digits."""
    if not known.prints:
        return []
    words = _words(text)
    spans = []
    for i in range(len(words)):
        longest = known.window if _digest(known.key, "HEAD", words[i][0]) in known.prints else 1
        for n in range(1, min(longest, len(words) - i) + 1):
            run = [w for w, _, _ in words[i : i + n]]
            forms = [(kind, " ".join(run)) for kind in SPACED if n == 1 or kind != "NAME"]
            if all(any(c.isdigit() for c in w) for w in run):
                forms += [(kind, "".join(run)) for kind in PACKED]
            spans += [
                Span(words[i][1], words[i + n - 1][2], kind, f"[{kind}]")
                for kind, form in forms
                if _digest(known.key, kind, form) in known.prints
            ]
    return spans


PATTERNS: tuple[tuple[str, str], ...] = (
    (
        "URL",
        r"\b(?:https?://|www\.)[^\s<>\"'(){}\[\]]*[^\s<>\"'(){}\[\].,;:!?]",
    ),  # not its closing punctuation
    ("EMAIL", r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\b"),  # e-mail, and ABHA addresses (name@abdm)
    ("ID", r"\b\d{3}-\d{2}-\d{4}\b"),  # SSN
    ("ID", r"\b\d{2}-\d{4}-\d{4}-\d{4}\b"),  # ABHA number
    ("ID", r"\b(?:mrn|medical record(?: number)?|record no\.?|uhid|abha(?: number)?)[\s:#=]*[\w-]*\d[\w-]*"),
    ("ID", r"\b\d{8,}\b"),  # long digit runs: account, insurance, licence numbers
    ("PHONE", r"(?<!\d)(?:\+?1[\s.-]?)?\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}(?!\d)"),
    ("PHONE", r"(?<!\d)(?:\+91[\s-]?|0)?[6-9]\d{4}[\s-]?\d{5}(?!\d)"),
    (
        "ADDRESS",
        rf"\b\d+[a-z]?\s+(?:[A-Z][\w'-]*\s+){{1,4}}(?i:{'|'.join(STREET_TYPES)})\b"
        r"(?:,?\s+(?i:apt|apartment|suite|unit|flat)\.?\s*#?\s*\w+)?",
    ),  # fmt: skip
    ("NAME", r"\b[A-Z][a-z]+\d{1,4}\b"),  # Synthea's names carry digits: another person's, unknown here
    ("NAME", r"\b(?i:dr|mr|mrs|ms|miss|prof)\.?\s+[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*){0,2}"),
)
# (kind, pattern): the group ``v`` identifies, where the words before it on its line say what it is
_CAPITALISED = r"[A-Z][a-z'-]+(?:[ -][A-Z][a-z'-]+){0,2}"
_RELATIONS = (
    "husband|wife|spouse|partner|son|daughter|mother|father|brother|sister|child|grandson|"
    "granddaughter|grandmother|grandfather|uncle|aunt|cousin|niece|nephew|friend|neighbou?r|"
    "boyfriend|girlfriend|fianc[eé]e?|caregiver|carer|guardian|roommate|colleague"
)
_NOT_NAMES = frozenset(  # capitalised words a context may be followed by that name nobody
    ("The", "A", "An", "Her", "His", "Their", "Our", "My", "This", "That", "Patient", "Family",
     "Nurse", "Doctor", "Physician", "Team", "Staff", "Emergency", "Hospital", "Clinic", "Home",
     "Ward", "Unit", "Today", "Yesterday", "Tomorrow", "He", "She", "They", "It")
)  # fmt: skip
IN_CONTEXT: tuple[tuple[str, re.Pattern], ...] = (
    (
        "NAME",
        re.compile(rf"\b(?i:{_RELATIONS}),?[ \t]+(?:(?i:named|called|is|was)[ \t]+)?(?P<v>{_CAPITALISED})"),
    ),
    (
        "NAME",
        re.compile(
            r"\b(?i:seen by|examined by|referred by|signed by|dictated by|accompanied by|lives with|"
            r"living with|contact person|emergency contact|next of kin),?:?[ \t]+"
            rf"(?P<v>{_CAPITALISED})"
        ),
    ),
    (
        "LOCATION",
        re.compile(
            r"\b(?i:lives in|living in|resides in|resident of|born in|moved (?:here )?from|moved to|"
            r"native of|hometown(?: of| is)?|visiting from|comes from|came from),?[ \t]+"
            rf"(?P<v>{_CAPITALISED})"
        ),
    ),
)
_AGE = re.compile(r"\b(\d{2,3})(\s*|-)(years?|yrs?|y/?o)\b|\baged?\s+(\d{2,3})\b", re.IGNORECASE)
_TIME = r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
_DATES = (  # pattern, how it is written back, its (year, month, day) groups
    (re.compile(rf"\b(\d{{4}})-(\d{{2}})-(\d{{2}}){_TIME}\b"), "iso", (1, 2, 3)),
    (re.compile(r"\b(\d{1,2})/(\d{1,2})/(\d{4})\b"), "us", (3, 1, 2)),
    (re.compile(rf"\b({_MONTH})\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})\b", re.I), "mdy", (3, 1, 2)),
    (re.compile(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+({_MONTH})\s+(\d{{4}})\b", re.I), "dmy", (3, 2, 1)),
)


def _pattern_spans(text: str) -> list[Span]:
    spans = []
    for kind, pattern in PATTERNS:
        for m in re.finditer(pattern, text, flags=re.IGNORECASE if kind in ("ID", "URL", "EMAIL") else 0):
            spans.append(Span(m.start(), m.end(), kind, f"[{kind}]"))
    for kind, pattern in IN_CONTEXT:
        for m in pattern.finditer(text):
            words = m.group("v").split()
            while words and words[0] in _NOT_NAMES:  # "lives with Her ..." names nobody
                words = words[1:]
            if words:
                end = m.end("v")
                spans.append(Span(end - len(" ".join(words)), end, kind, f"[{kind}]"))
    for m in _AGE.finditer(text):
        value = int(m.group(1) or m.group(4))
        if value > 89:  # HIPAA's safe harbour: ages over 89 as one group
            group = 1 if m.group(1) else 4
            spans.append(Span(m.start(group), m.end(group), "AGE", "90+"))
    return spans


NAME_LISTS = "philter_ucsf"  # UCSF's Philter (BSD-3): its name lists and its whitelist, as data
_LISTED = re.compile(r"\b[A-Z][a-z]{2,}(?:'[A-Z]?[a-z]+)?\b(?!\d)")  # a capitalised word, 3+ letters


@functools.cache
def name_list() -> frozenset[str]:
    """Lower-case first and last names (Philter's lists of about 97,000 and 161,000, from US census
    and other sources, Indian names among them) less every word of its whitelist of about 195,000
    common English and medical words: a word here is a name, seldom anything else. Read once per
    process (about 240,000 words); the package is found, not imported (its code needs NLTK)."""
    spec = importlib.util.find_spec(NAME_LISTS)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{NAME_LISTS} is not installed (make setup): its name lists de-identify notes")
    root = Path(spec.submodule_search_locations[0]) / "filters"
    words = lambda path: json.loads((root / path).read_text(encoding="utf-8"))  # noqa: E731
    names = set(words("blacklists/firstnames_minus_fps.json"))
    names |= set(words("blacklists/lastnames_minus_fps.json"))
    return frozenset(names - set(words("whitelists/whitelist_plus_fps_091718_nonames.json")))


def _listed_spans(text: str, keep: frozenset[str]) -> list[Span]:
    names = name_list()
    return [
        Span(m.start(), m.end(), "NAME", "[NAME]")
        for m in _LISTED.finditer(text)
        if (word := m.group(0).lower()) in names and word not in keep
    ]


def vocabulary(phrases) -> frozenset[str]:
    """The lower-case words of ``phrases`` (the display names of the lake's codes): kept by
    :func:`deidentify` even where a name list holds them ("Parkinson's disease")."""
    return frozenset(w for p in phrases for w in re.findall(r"[a-z]{3,}", p.lower()))


def _month(name: str) -> int | None:
    name = name.lower().rstrip(".")
    return next((i + 1 for i, m in enumerate(MONTHS) if m.startswith(name[:3])), None)


def _written(moved: dt.date, how: str, original: str) -> str:
    if how == "iso":  # a time of day stays as written: the date part is what identifies
        return moved.isoformat() + original[10:]
    month = MONTHS[moved.month - 1].capitalize()
    if how == "mdy":
        return f"{month} {moved.day}, {moved.year}"
    if how == "dmy":
        return f"{moved.day} {month} {moved.year}"
    return f"{moved.month}/{moved.day}/{moved.year}"


def _date_spans(text: str, offset: int) -> list[Span]:
    spans = []
    for pattern, how, (year, month, day) in _DATES:
        for m in pattern.finditer(text):
            named = how in ("mdy", "dmy")
            try:
                month_ = (_month(m.group(month)) or 0) if named else int(m.group(month))
                moved = dt.date(int(m.group(year)), month_, int(m.group(day))) + dt.timedelta(days=offset)
            except (ValueError, OverflowError):  # "13/45/2020": a date, unreadable
                spans.append(Span(m.start(), m.end(), "DATE", "[DATE]"))
                continue
            spans.append(Span(m.start(), m.end(), "DATE", _written(moved, how, m.group(0))))
    return spans


def _merged(spans: list[Span]) -> list[Span]:
    """Non-overlapping spans in text order: of overlapping ones the longest (then the first)."""
    chosen: list[Span] = []
    for span in sorted(spans, key=lambda s: (-(s.end - s.start), s.start)):
        if all(span.end <= c.start or span.start >= c.end for c in chosen):
            chosen.append(span)
    return sorted(chosen, key=lambda s: s.start)


def deidentify(
    text: str, known: Known | Fingerprints = Known(), offset: int = 0, keep: frozenset[str] = frozenset()
) -> Deidentified:
    """``text`` without the patient's ``known`` identifiers (as recorded, or as their
    :func:`fingerprints`), the patterns above and listed names (but the words of ``keep``:
    :func:`vocabulary`), dates moved by ``offset`` days (:func:`date_offset`)."""
    if not text:
        return Deidentified(text or "")
    if isinstance(known, Known):  # one finder: the identifiers hashed under a key of this call
        known = fingerprints(known, os.urandom(16))
    found = _known_spans(text, known) + _pattern_spans(text) + _listed_spans(text, keep)
    spans = _merged(found + _date_spans(text, offset))
    out, last = [], 0
    for s in spans:
        out.append(text[last : s.start])
        out.append(s.replacement)
        last = s.end
    out.append(text[last:])
    return Deidentified("".join(out), spans)
