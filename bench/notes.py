"""Benchmark: de-identification of the shared Synthea notes (issue 23, part a).

Every ``DocumentReference`` note of the shared Synthea bundles (the HIV set: 4,006 notes of 79
patients) is de-identified with its own patient's identifiers, as the clean job will do with the
ones it opens from bronze, and measured without any manual labels:

- **leftover**: of the patient's own identifiers that occur in a note (each name part with and
  without Synthea's digits, street line, city, phone), the share still found in the de-identified
  text. Aim: 0.
- **clinical terms kept** (a precision proxy): of the display names of the patient's conditions,
  medications, procedures, immunizations and allergies that occur in the note, the share still
  found after. Aim: at least 0.99; a term lost is a clinical word a pattern took for an identifier.
- **throughput**: notes per second on one core (pure Python, the function executors will run).

    .venv/bin/python bench/notes.py [--bundles DIR] [--out DIR]

Results go to ``bench/results/notes-<date>.json``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import save_result  # noqa: E402

from ehrlake.notes import deid  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "synthea_fhir_r4_hiv" / "bundles"
SECRET = b"bench secret"


def _patient(resources: list[dict]) -> tuple[str, deid.Known] | None:
    patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
    if patient is None:  # the hospitals' and practitioners' bundles
        return None
    names = tuple(p for n in patient.get("name", []) for p in (*n.get("given", []), n.get("family", "")) if p)
    addresses = patient.get("address", [])
    return patient["id"], deid.Known(
        names=names,
        streets=tuple(line for a in addresses for line in a.get("line", [])),
        places=tuple(a["city"] for a in addresses if a.get("city")),
        phones=tuple(t["value"] for t in patient.get("telecom", []) if t.get("system") == "phone"),
    )


def _identifiers(known: deid.Known) -> list[str]:
    """What must not survive: each name part with and without its digits, streets, cities, phones."""
    parts = [p for name in known.names for p in (name, re.sub(r"\d+$", "", name)) if len(p) >= deid.MIN_NAME]
    return sorted({*parts, *known.streets, *known.places, *known.phones})


def _occurs(term: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text, flags=re.IGNORECASE) is not None


CLINICAL = {  # resource type -> its concept element
    "Condition": "code",
    "MedicationRequest": "medicationCodeableConcept",
    "Procedure": "code",
    "Immunization": "vaccineCode",
    "AllergyIntolerance": "code",
}


def _clinical_terms(resources: list[dict]) -> set[str]:
    """The display names of the patient's conditions, medications, procedures, immunizations and
    allergies: clinical words a note may quote that must come through de-identification."""
    out: set[str] = set()
    for r in resources:
        concept = r.get(CLINICAL.get(r["resourceType"], ""), {})
        out.update(
            d for d in (concept.get("text"), *(c.get("display") for c in concept.get("coding", []))) if d
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    found = left = terms = kept = notes = characters = 0
    missed: dict[str, int] = {}
    lost: dict[str, int] = {}
    kinds: dict[str, int] = {}
    replaced: dict[str, int] = {}  # what was taken out, to read for false alarms
    seconds = 0.0
    for path in sorted(args.bundles.glob("*.json*")):
        with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
            resources = [e["resource"] for e in json.load(f).get("entry", [])]
        if (found_patient := _patient(resources)) is None:
            continue
        patient_id, known = found_patient
        offset = deid.date_offset(patient_id, SECRET)
        identifiers = _identifiers(known)
        clinical = _clinical_terms(resources)
        for r in resources:
            if r["resourceType"] != "DocumentReference":
                continue
            text = base64.b64decode(r["content"][0]["attachment"]["data"]).decode("utf-8", "replace")
            started = time.perf_counter()
            done = deid.deidentify(text, known, offset)
            seconds += time.perf_counter() - started
            out = done.text
            for span in done.spans:
                kinds[span.kind] = kinds.get(span.kind, 0) + 1
                if span.kind != "DATE":
                    replaced[text[span.start : span.end]] = replaced.get(text[span.start : span.end], 0) + 1
            notes += 1
            characters += len(text)
            for term in identifiers:
                if _occurs(term, text):
                    found += 1
                    if _occurs(term, out):
                        left += 1
                        missed[term] = missed.get(term, 0) + 1
            for term in clinical:
                if _occurs(term, text):
                    terms += 1
                    if _occurs(term, out):
                        kept += 1
                    else:
                        lost[term] = lost.get(term, 0) + 1
    result = {
        "bundles": str(args.bundles),
        "notes": notes,
        "characters": characters,
        "identifiers_found": found,
        "identifiers_left": left,
        "leftover_share": round(left / found, 5) if found else None,
        "missed": dict(sorted(missed.items(), key=lambda kv: -kv[1])[:20]),
        "clinical_terms_found": terms,
        "clinical_terms_kept": kept,
        "kept_share": round(kept / terms, 5) if terms else None,
        "lost_terms": dict(sorted(lost.items(), key=lambda kv: -kv[1])[:20]),
        "replaced_by_kind": kinds,
        "most_replaced": dict(sorted(replaced.items(), key=lambda kv: -kv[1])[:25]),
        "notes_per_second_one_core": round(notes / seconds, 1) if seconds else None,
    }
    print(json.dumps(result, indent=2))
    print(f"saved {save_result(args.out, 'notes', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
