"""Benchmark: de-identification of the shared Synthea notes (issue 23, part a).

Every ``DocumentReference`` note of the shared Synthea bundles (the HIV set: 4,006 notes of 79
patients) is de-identified with its own patient's identifiers, given as their keyed fingerprints
(``deid.fingerprints``, what a job without the reveal key can hold), and measured without any
manual labels:

- **leftover**: of the patient's own identifiers that occur in a note (each name part with and
  without Synthea's digits, street line, city, phone), the share still found in the de-identified
  text. Aim: 0.
- **name list** (``deid.name_list``): the words it took as names. Every name Synthea writes
  carries digits or is the patient's own, so each of them is a false alarm.
- **clinical terms kept** (a precision proxy): of the display names of the patient's conditions,
  medications, procedures, immunizations and allergies that occur in the note, the share still
  found after. Aim: at least 0.99; a term lost is a clinical word a pattern took for an identifier.
- **concepts** (part b), found in the de-identified text by targets made of every code's display
  name in the structured data: precision = share of affirmed mentions (no ConText flag) that are a
  code on the patient's record by the note's date (a note lists active medications prescribed
  earlier); recall = share of the codes recorded at the note's own encounter that the note
  mentions affirmed. Aim: 0.95 both, per kind.
- **throughput**: notes per second on one core (pure Python, the function executors will run).
- **in the lake** (``--spark``): the same bundles ingested into a scratch lake, then the clean
  job's notes step (``clean/notes.py``: open the sealed copies, de-identify, sections, concepts,
  write both silver tables) timed against a bare read of the same notes (open the sealed copies,
  explode the notes, sum their lengths), in the same run and session: notes/s per core and the
  ratio.

    .venv/bin/python bench/notes.py [--bundles DIR] [--out DIR] [--spark]

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

from ehrlake.notes import concepts, deid  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "synthea_fhir_r4_hiv" / "bundles"
SECRET = b"bench secret"


def _patient(resources: list[dict]) -> tuple[str, deid.Known] | None:
    patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
    if patient is None:  # the hospitals' and practitioners' bundles
        return None
    return patient["id"], deid.known_of_patient(patient)


def _identifiers(known: deid.Known) -> list[str]:
    """What must not survive: each name part with and without its digits, streets, cities, phones."""
    parts = [p for name in known.names for p in (name, re.sub(r"\d+$", "", name)) if len(p) >= deid.MIN_NAME]
    return sorted({*parts, *known.streets, *known.places, *known.phones})


def _occurs(term: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text, flags=re.IGNORECASE) is not None


KIND = {
    "Condition": "condition",
    "MedicationRequest": "medication",
    "Procedure": "procedure",
    "Immunization": "immunization",
}
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


def _codes(r: dict) -> list[tuple[str, str, str]]:
    """(display, system, code) of a clinical resource's concept."""
    concept = r.get(CLINICAL.get(r["resourceType"], ""), {})
    return [
        (c["display"], c.get("system", ""), c["code"]) for c in concept.get("coding", []) if c.get("display")
    ]


def _targets(bundles: list[list[dict]]) -> list[concepts.Target]:
    """Every code of the structured data (all patients), as the lake would list them."""
    seen = {}
    for resources in bundles:
        for r in resources:
            for display, system, code in _codes(r):
                seen.setdefault(
                    (display, code), concepts.Target(display, system, code, KIND[r["resourceType"]])
                )
    return list(seen.values())


def _encounter_codes(resources: list[dict]) -> dict[str, set[tuple[str, str]]]:
    """encounter reference -> (kind, code) of the clinical resources recorded at it."""
    out: dict[str, set[tuple[str, str]]] = {}
    for r in resources:
        encounter = (r.get("encounter") or {}).get("reference")
        if encounter and r["resourceType"] in KIND:
            out.setdefault(encounter, set()).update((KIND[r["resourceType"]], c) for _, _, c in _codes(r))
    return out


DATED = ("onsetDateTime", "recordedDate", "authoredOn", "performedDateTime", "occurrenceDateTime")


def _dated_codes(resources: list[dict]) -> list[tuple[str, tuple[str, str]]]:
    """(date, (kind, code)) of every clinical resource of the patient."""
    out = []
    for r in resources:
        if r["resourceType"] in KIND:
            when = next((r[k] for k in DATED if k in r), None) or r.get("performedPeriod", {}).get("start")
            out.extend((when[:10], (KIND[r["resourceType"]], c)) for _, _, c in _codes(r) if when)
    return out


def _concept_scores(counts: dict[str, list[int]]) -> dict:
    """kind -> precision and recall from [mentions right, mentions, codes found, codes]."""
    return {
        kind: {
            "mentions": n,
            "precision": round(right / n, 4) if n else None,
            "codes": total,
            "recall": round(hit / total, 4) if total else None,
        }
        for kind, (right, n, hit, total) in sorted(counts.items())
    }


def in_the_lake(bundles: Path, repeats: int = 3) -> dict:
    """Ingest ``bundles`` into a scratch lake; then, ``repeats`` times each, alternating, a bare
    read of the notes and the clean job's notes step (median seconds)."""
    import os
    import shutil
    import statistics
    import tempfile

    from _lake import machine, secured_lake
    from pyspark.sql import functions as F

    from ehrlake import clean, ingest
    from ehrlake.clean import notes as silver_notes
    from ehrlake.config import Config, SparkConfig
    from ehrlake.security import copies
    from ehrlake.session import get_spark

    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-notes-"))
    try:
        spark = get_spark(Config(spark=SparkConfig(master="local[*]", app_name="bench-notes")))
        lake = secured_lake(work / "lake", spark, work / "secrets")
        ingest.run(lake, ingest.SourceKind.FHIR_BUNDLES, str(bundles))
        clean.run(lake)  # the silver tables whose codes are the concept targets

        def bare() -> int:
            df = silver_notes._opened(lake, silver_notes.SOURCES[0], copies.NOTE_TEXT)
            copy = F.from_json(copies.NOTE_TEXT, silver_notes._COPY)
            text = df.select(F.explode(copy["notes"]).alias("n")).select(F.length("n.text").alias("chars"))
            return text.agg(F.sum("chars")).first()[0]

        timings: dict[str, list[float]] = {"bare_read": [], "notes_step": []}
        for _ in range(repeats):
            start = time.perf_counter()
            characters = bare()
            timings["bare_read"].append(time.perf_counter() - start)
            start = time.perf_counter()
            written = silver_notes.refresh(lake, "bench")
            timings["notes_step"].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in timings.items()}
        notes = written["note"][0]
        cores = os.cpu_count() or 1
        return {
            "notes": notes,
            "concepts": written["note_concept"][0],
            "characters": characters,
            "seconds_median": {k: round(v, 2) for k, v in median.items()},
            "seconds_all": {k: [round(x, 2) for x in v] for k, v in timings.items()},
            "notes_per_second_per_core": round(notes / median["notes_step"] / cores, 1),
            "ratio_to_bare_read": round(median["notes_step"] / median["bare_read"], 1),
            "machine": machine(spark),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--spark", action="store_true", help="also time the clean job's notes step")
    args = parser.parse_args()
    found = left = terms = kept = notes = characters = 0
    missed: dict[str, int] = {}
    lost: dict[str, int] = {}
    kinds: dict[str, int] = {}
    replaced: dict[str, int] = {}  # what was taken out, to read for false alarms
    seconds = concept_seconds = 0.0
    bundles = []
    for path in sorted(args.bundles.glob("*.json*")):
        with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
            bundles.append([e["resource"] for e in json.load(f).get("entry", [])])
    targets = _targets(bundles)
    matcher = concepts.Matcher(targets)
    keep = deid.vocabulary(t.phrase for t in targets)  # what the clean job keeps: the lake's code words
    listed: dict[str, int] = {}  # words the name list took: Synthea's names carry digits, so none is one
    scores: dict[str, list[int]] = {kind: [0, 0, 0, 0] for kind in KIND.values()}
    flagged = {flag: 0 for flag in concepts.FLAGS}
    mentions = 0
    examples: list[str] = []  # flagged mentions in their words, to read
    for resources in bundles:
        if (found_patient := _patient(resources)) is None:
            continue
        patient_id, known = found_patient
        offset = deid.date_offset(patient_id, SECRET)
        prints = deid.fingerprints(known, SECRET)  # what the lake keeps per patient, under a data key
        identifiers = _identifiers(known)
        clinical = _clinical_terms(resources)
        at_encounter = _encounter_codes(resources)
        dated = _dated_codes(resources)
        for r in resources:
            if r["resourceType"] != "DocumentReference":
                continue
            text = base64.b64decode(r["content"][0]["attachment"]["data"]).decode("utf-8", "replace")
            started = time.perf_counter()
            done = deid.deidentify(text, prints, offset, keep)
            seconds += time.perf_counter() - started
            out = done.text
            for span in done.spans:
                kinds[span.kind] = kinds.get(span.kind, 0) + 1
                words = text[span.start : span.end]
                if span.kind != "DATE":
                    replaced[words] = replaced.get(words, 0) + 1
                if span.kind == "NAME" and words.lower() in deid.name_list():
                    listed[words] = listed.get(words, 0) + 1
            notes += 1
            characters += len(text)
            for term in identifiers:
                if _occurs(term, text):
                    found += 1
                    if _occurs(term, out):
                        left += 1
                        missed[term] = missed.get(term, 0) + 1
            # concepts, in the de-identified text, against what the note's encounter recorded
            started = time.perf_counter()
            found_here = matcher.find(out)
            concept_seconds += time.perf_counter() - started
            encounter = next(iter(r.get("context", {}).get("encounter", [])), {}).get("reference")
            truth = at_encounter.get(encounter, set())
            on_record = {key for when, key in dated if when <= r.get("date", "")[:10]} | truth
            asserted = set()
            for m in found_here:
                mentions += 1
                for flag in concepts.FLAGS:
                    flagged[flag] += getattr(m, flag)
                    if getattr(m, flag) and len(examples) < 5:
                        examples.append(f"{flag}: ...{out[max(0, m.start - 60) : m.end + 10]}...")
                if not any(getattr(m, flag) for flag in concepts.FLAGS):
                    key = (m.target.kind, m.target.code)
                    scores[m.target.kind][0] += key in on_record
                    scores[m.target.kind][1] += 1
                    asserted.add(key)
            for kind, code in truth:
                scores[kind][2] += (kind, code) in asserted
                scores[kind][3] += 1
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
        "name_list_replacements": sum(listed.values()),
        "name_list_words": dict(sorted(listed.items(), key=lambda kv: -kv[1])[:25]),
        "concepts": _concept_scores(scores),
        "mentions": mentions,
        "mentions_flagged": flagged,
        "flagged_examples": examples,
        "targets": sum(len(c) for c in matcher.index.values()),
        "notes_per_second_one_core": round(notes / seconds, 1) if seconds else None,
        "concept_notes_per_second_one_core": round(notes / concept_seconds, 1) if concept_seconds else None,
    }
    if args.spark:
        result["in_the_lake"] = in_the_lake(args.bundles)
    print(json.dumps(result, indent=2))
    print(f"saved {save_result(args.out, 'notes', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
