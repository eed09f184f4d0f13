"""Clinical notes: de-identification, concepts and text extraction (pure Python), and the notes the
clean job writes to silver from an ingested export."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import json
import re

import pytest
from conftest import shared

from ehrlake.notes import deid

KNOWN = deid.Known(
    names=("Masako522", "Mayer370"),
    streets=("612 Kuhlman Skyway Apt 45",),
    places=("Amherst",),
    phones=("555-194-2761",),
    numbers=("999-12-3456", "4471-22"),
)
NOTE = """2019-07-31T14:26:37+00:00

# History of Present Illness
Masako522 Mayer370 is a 54 year-old female, seen by Dr. Clint766 Marquardt819 on July 31, 2019.
Masako's husband Rolando41 is 92 years old. Follow-up 8/14/2019; lab drawn 13/45/2019.
Lives at 612 Kuhlman Skyway, Apt 45, AMHERST. Call (555) 194-2761 or +91 98765 43210,
masako@example.com, ABHA 12-3456-7890-1234, MRN: A1234567, SSN 999-12-3456, see www.example.org/p.
Old chart 4471 22 reviewed.
# Assessment and Plan
Hypertension. Prediabetes. Continue metformin 500 mg.
"""


def test_a_note_loses_names_contacts_numbers_and_its_dates_move_by_the_patients_offset():
    offset = 30
    got = deid.deidentify(NOTE, KNOWN, offset)
    for gone in (
        "Masako", "Mayer", "Clint766", "Marquardt819", "Rolando41", "Kuhlman", "Amherst", "AMHERST",
        "194-2761", "98765", "example", "3456", "A1234567", "4471", "2019-07-31", "July 31", "8/14/2019", "13/45",
        "92",
    ):  # fmt: skip
        assert gone not in got.text, gone
    # dates moved by the offset, written as they came; an impossible one replaced
    assert got.text.startswith("2019-08-30T14:26:37+00:00")
    assert "August 30, 2019" in got.text and "9/13/2019" in got.text and "[DATE]" in got.text
    # typed placeholders, ages over 89 grouped, the clinical text and a younger age untouched
    for placeholder in ("[NAME]", "[ADDRESS]", "[LOCATION]", "[PHONE]", "[EMAIL]", "[ID]", "[URL]"):
        assert placeholder in got.text, placeholder
    assert "90+ years old" in got.text and "54 year-old" in got.text
    assert "Hypertension. Prediabetes. Continue metformin 500 mg." in got.text
    # every span names what it replaced in the original text, without overlaps
    names = [NOTE[s.start : s.end] for s in got.spans if s.kind == "NAME"]
    assert {"Masako522", "Mayer370", "Masako", "Rolando41"} <= set(names)
    assert all(a.end <= b.start for a, b in zip(got.spans, got.spans[1:], strict=False))


def test_keyed_fingerprints_find_the_same_identifiers_without_holding_them():
    """What a table keeps under its data key (keyed hashes of the identifiers' normal forms) finds
    exactly what the identifiers themselves find, and reads as none of them."""
    key = b"k" * 32
    prints = deid.fingerprints(KNOWN, key)
    assert deid.deidentify(NOTE, prints, 30).text == deid.deidentify(NOTE, KNOWN, 30).text
    stored = " ".join(prints.prints)
    assert not any(v.lower() in stored for v in ("masako", "mayer", "amherst", "kuhlman", "2761"))
    other = deid.fingerprints(KNOWN, b"x" * 32)  # another key: other hashes, nothing found
    assert other.prints.isdisjoint(prints.prints)
    assert "Masako" in deid.deidentify(NOTE, deid.Fingerprints(key, other.prints, other.window)).text


def test_the_date_offset_is_the_patients_own_the_same_in_every_note_and_never_zero():
    secret = b"lake secret"
    offsets = [deid.date_offset(f"patient-{i}", secret) for i in range(200)]
    assert offsets[7] == deid.date_offset("patient-7", secret)  # every note of the patient alike
    assert all(0 < abs(o) <= deid.MAX_SHIFT_DAYS for o in offsets) and len(set(offsets)) > 100
    assert min(offsets) < 0 < max(offsets)
    assert [deid.date_offset(f"patient-{i}", b"other") for i in range(200)] != offsets  # needs the secret
    first = deid.deidentify("Seen 2020-01-10.", offset=offsets[7]).text
    second = deid.deidentify("Back on 2020-01-20.", offset=offsets[7]).text
    moved = [re.search(r"\d{4}-\d{2}-\d{2}", t).group(0) for t in (first, second)]
    import datetime as dt

    days = (dt.date.fromisoformat(moved[1]) - dt.date.fromisoformat(moved[0])).days
    assert days == 10 and moved[0] != "2020-01-10"  # intervals read true, dates do not


def test_a_real_synthea_note_keeps_none_of_its_patients_identifiers():
    """The shared HIV bundles' notes name their patient ("Masako522 is a newborn ..."): every
    name, street, city and phone of the bundle's Patient is gone from every note of the bundle."""
    folder = shared("synthea_fhir_r4_hiv", "bundles")
    path = sorted(folder.glob("*.json.gz"))[0]
    with gzip.open(path, "rt") as f:
        resources = [e["resource"] for e in json.load(f)["entry"]]
    known = deid.known_of_patient(next(r for r in resources if r["resourceType"] == "Patient"))
    names = known.names
    notes = [
        base64.b64decode(r["content"][0]["attachment"]["data"]).decode()
        for r in resources
        if r["resourceType"] == "DocumentReference"
    ]
    assert notes and any(names[0] in n for n in notes)  # the notes do name the patient
    for note in notes:
        text = deid.deidentify(note, known, offset=11).text
        for name in names:
            assert re.sub(r"\d+$", "", name) not in text
        for date in re.findall(r"\b\d{4}-\d{2}-\d{2}\b", note):  # every date moved
            assert date not in text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Aged 95, walks daily.", "Aged 90+, walks daily."),
        ("No known allergies.", "No known allergies."),
        ("Dose 10 mg on day 3 at 12 Main Street.", "Dose 10 mg on day 3 at [ADDRESS]."),
        # untitled names and places, by the words before them on their line
        ("Her husband Ravi Kumar brought her in.", "Her husband [NAME] brought her in."),
        (
            "Seen by Anita Rao; her sister named Priya waited.",
            "Seen by [NAME]; her sister named [NAME] waited.",
        ),
        ("She lives in Lucknow, moved from Pune.", "She lives in [LOCATION], moved from [LOCATION]."),
        ("Lives with Her husband. Mother had Diabetes.", "Lives with Her husband. Mother had Diabetes."),
        ("Family history: father\nHypertension.", "Family history: father\nHypertension."),
        (
            "Started a drug called Lisinopril, named Zestril.",
            "Started a drug called Lisinopril, named Zestril.",
        ),
    ],
)
def test_patterns_replace_only_what_identifies(text, expected):
    assert deid.deidentify(text).text == expected


def test_names_no_context_marks_come_out_by_the_name_list_but_the_lakes_clinical_words_stay():
    text = "Priya Sharma called. Reviewed with Thomas; Will follow up. History of Parkinson disease."
    assert deid.deidentify(text).text == (
        "[NAME] [NAME] called. Reviewed with [NAME]; Will follow up. History of [NAME] disease."
    )  # "Will" is a common word as much as a name: the list leaves it; an eponym is taken
    keep = deid.vocabulary(["Parkinson's disease (disorder)"])
    assert deid.deidentify(text, keep=keep).text.endswith("History of Parkinson disease.")
    assert {"priya", "sharma", "thomas", "kumar"} <= deid.name_list()
    assert not {"will", "patient", "diabetes", "chief", "may"} & deid.name_list()


def _matcher():
    from ehrlake.notes import concepts

    codes = [
        ("Cardiac Arrest", "410429000", "condition"),
        ("History of cardiac arrest (situation)", "429007001", "condition"),
        ("Hypertension", "38341003", "condition"),
        ("Diabetes", "44054006", "condition"),
        ("Asthma", "195967001", "condition"),
        ("Echocardiography (procedure)", "40701008", "procedure"),
        ("1 ML Epinephrine 1 MG/ML Injection", "1660014", "medication"),
    ]
    return concepts, concepts.Matcher(concepts.Target(p, "http://snomed.info/sct", c, k) for p, c, k in codes)


def test_mentions_map_to_codes_with_negation_history_family_and_hypothetical_context():
    concepts, matcher = _matcher()
    text = (
        "# Assessment and Plan\n"
        "Patient is presenting with cardiac arrest, history of cardiac arrest (situation).\n"
        "No hypertension. Mother has diabetes but the patient denies asthma.\n"
        "History of asthma. If hypertension develops, return. Echocardiography (procedure) was done.\n"
        "- 1 ml epinephrine 1 mg/ml injection\n"
        "# Family History\n"
        "Diabetes.\n"
    )
    found = [(text[m.start : m.end], m.target.code, {f for f in concepts.FLAGS if getattr(m, f)}, m.section)
             for m in matcher.find(text)]  # fmt: skip
    assert found == [
        ("cardiac arrest", "410429000", set(), "Assessment and Plan"),
        # the longest display wins, and "history of" inside a target's own words is no trigger
        ("history of cardiac arrest (situation)", "429007001", set(), "Assessment and Plan"),
        ("hypertension", "38341003", {"negated"}, "Assessment and Plan"),
        ("diabetes", "44054006", {"family"}, "Assessment and Plan"),  # "but" ends the mother's scope
        ("asthma", "195967001", {"negated"}, "Assessment and Plan"),
        ("asthma", "195967001", {"historical"}, "Assessment and Plan"),
        ("hypertension", "38341003", {"hypothetical"}, "Assessment and Plan"),
        ("Echocardiography (procedure)", "40701008", set(), "Assessment and Plan"),
        ("1 ml epinephrine 1 mg/ml injection", "1660014", set(), "Assessment and Plan"),
        ("Diabetes", "44054006", {"family"}, "Family History"),  # from its section
    ]


def test_pseudo_triggers_and_sentence_ends_bound_a_triggers_scope():
    concepts, matcher = _matcher()
    text = "No increase in asthma symptoms. Denies chest pain. Hypertension noted."
    flags = [{f for f in concepts.FLAGS if getattr(m, f)} for m in matcher.find(text)]
    assert flags == [set(), set()]  # "no increase" is no negation; "denies" stops at its sentence


def test_notes_come_out_of_references_and_document_narratives_and_what_has_no_text_is_skipped():
    """ABDM's OPConsultNote (India): the Composition's narrative and its sections from their
    entries' narratives; its PDF lab report is skipped with the reason; a Synthea-style text note
    by a Binary's url; and the ABDM note de-identified with its patient's identifiers."""
    from ehrlake.notes import documents

    bundle = json.loads(shared("india_abdm_fhir", "OPConsultNote_for_ABDMTrack_usecase.json").read_text())
    index = documents.bundle_index(bundle)
    found, skipped = [], []
    for entry in bundle["entry"]:
        n, s = documents.notes(entry["resource"], index)
        found += n
        skipped += s
    assert [(n.resource_type, n.patient, n.encounter, n.author_role) for n in found] == [
        ("Composition", "Patient/1", "Encounter/1", "Practitioner")
    ]
    note = found[0]
    assert note.kind == "Clinical Consultation report" and note.date.startswith("2021-11-25")
    assert "# Chief complaints\nIncreased frequency of urination\nHazy vision" in note.text
    assert "# Family History\nMother had type 2 diabetes" in note.text and "<" not in note.text
    assert note.text.endswith(
        "# Document Reference\nLaboratory report"
    )  # an entry without narrative: its type
    assert [(s.note_id, s.reason) for s in skipped] == [("1", "attachment is application/pdf: no text read")]

    known = deid.known_of_patient(index["Patient/1"])  # a name's text only: "Prakash Kumar"
    clean = deid.deidentify(note.text, known, offset=-40).text
    for gone in ("Prakash", "Kumar", "9818512600", "1958-11-26", "= 1234"):
        assert gone not in clean, gone
    assert "Mother had type 2 diabetes" in clean  # a family member's condition is no identifier

    text = base64.b64encode(b"<p>Seen today.</p><p>Plan: rest.</p>").decode()
    reference = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "subject": {"reference": "urn:uuid:p1"},
        "content": [{"attachment": {"contentType": "text/html", "url": "urn:uuid:b1"}}],
    }
    binary = {"resourceType": "Binary", "id": "b1", "contentType": "text/html", "data": text}
    (got,), () = documents.notes(reference, {"urn:uuid:b1": binary})
    assert got.text == "Seen today.\nPlan: rest." and got.patient == "urn:uuid:p1"
    assert documents.notes(reference, {})[1][0].reason.startswith("attachment has no readable data")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _reference(rid: str, patient: str, date: str, text: str | None, kind: str = "text/plain") -> dict:
    data = {"data": _b64(text)} if text is not None else {}
    return {
        "resourceType": "DocumentReference",
        "id": rid,
        "status": "current",
        "type": {
            "coding": [
                {"system": "http://loinc.org", "code": "34117-2", "display": "History and physical note"}
            ]
        },
        "subject": {"reference": f"Patient/{patient}"},
        "date": date,
        "author": [{"reference": "Practitioner/dr1", "display": "Dr. Clint766 Marquardt819"}],
        "content": [{"attachment": {"contentType": kind, **data}}],
        "context": {"encounter": [{"reference": "Encounter/e1"}]},
    }


LAKE_NOTE = """{date}

# Chief Complaint
Masako522 Kuhn96 (MRN A7654321) came in from 12 Elm Street, Springfield. Call (555) 194-2761.

# History of Present Illness
She has diabetes mellitus type 2. Denies essential hypertension.
"""


def test_clean_writes_notes_de_identified_with_sections_and_concepts_and_keeps_what_has_no_text(
    lake, tmp_path
):
    from ehrlake import clean, ingest
    from ehrlake.ingest.sources import SourceKind

    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "gender": "female",
        "birthDate": "1961-02-03",
        "name": [{"given": ["Masako522"], "family": "Kuhn96"}],
        "address": [{"line": ["12 Elm Street"], "city": "Springfield", "postalCode": "01103"}],
        "telecom": [{"system": "phone", "value": "555-194-2761"}],
        "identifier": [{"system": "urn:mrn", "value": "A7654321"}],
    }

    def condition(cid: str, code: str, display: str) -> dict:
        concept = {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]}
        return {
            "resourceType": "Condition",
            "id": cid,
            "subject": {"reference": "Patient/p1"},
            "code": concept,
        }

    records = [
        patient,
        condition("c1", "44054006", "Diabetes mellitus type 2 (disorder)"),
        condition("c2", "59621000", "Essential hypertension (disorder)"),
        _reference("d1", "p1", "2019-08-14T10:00:00Z", LAKE_NOTE.format(date="2019-08-14")),
        _reference("d2", "p1", "2019-09-01T10:00:00Z", LAKE_NOTE.format(date="2019-09-01")),
        _reference("d3", "p1", "2019-09-02T10:00:00Z", None, kind="application/pdf"),
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "all.ndjson").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"))
    # ingest keeps the notes and the identifiers' fingerprints only as ciphertext
    for table, copy in (
        ("bronze.fhir_document_reference", "note_text"),
        ("bronze.fhir_patient", "id_prints"),
    ):
        values = [r[0] for r in lake.read(table).select(copy).collect()]
        assert values and all(v and "Masako" not in v and "Kuhn" not in v for v in values)
    report = clean.run(lake)
    assert report.rows["note"] == 3 and report.rows["note_concept"] == 4

    notes = {r.note_id: r for r in lake.read("silver.note").collect()}
    assert (
        notes["DocumentReference/d3"].text_deid is None
        and notes["DocumentReference/d3"].no_text == "attachment is application/pdf: no text read"
    )
    assert (notes["DocumentReference/d3"].note_type, notes["DocumentReference/d3"].encounter_id) == (
        "History and physical note",
        "e1",
    )
    moved = {}
    for nid, written in (("DocumentReference/d1", "2019-08-14"), ("DocumentReference/d2", "2019-09-01")):
        r = notes[nid]
        assert r.note_type == "History and physical note" and r.encounter_id == "e1"
        assert r.author_role == "Practitioner" and r.no_text is None
        for identifier in ("Masako", "Kuhn", "A7654321", "Elm Street", "Springfield", "194-2761", written):
            assert identifier.lower() not in r.text_deid.lower(), (identifier, r.text_deid)
            assert identifier not in r.text  # the note as sent is sealed to the reveal key
        assert "[NAME] [NAME]" in r.text_deid and "[PHONE]" in r.text_deid
        moved[nid] = dt.date.fromisoformat(r.text_deid[:10])
        assert [s.title for s in r.sections] == ["Chief Complaint", "History of Present Illness"]
        history = r.sections[1]
        assert r.text_deid[history.start : history.end].lstrip().startswith("# History")
    assert (
        moved["DocumentReference/d2"] - moved["DocumentReference/d1"]
    ).days == 18  # one offset per patient: intervals read true
    assert moved["DocumentReference/d1"] != dt.date(2019, 8, 14)

    mentions = lake.read("silver.note_concept").collect()
    for m in mentions:
        words = notes[m.note_id].text_deid[m.start : m.end].lower()
        assert words in m.display.lower() and m.section == "History of Present Illness"
    assert {(m.note_id, m.code, m.negated) for m in mentions} == {
        (f"DocumentReference/{n}", "44054006", False) for n in ("d1", "d2")
    } | {(f"DocumentReference/{n}", "59621000", True) for n in ("d1", "d2")}

    # analysts see volumes and concepts, suppressed: one patient is below every k
    from ehrlake.eda import aggregates
    from ehrlake.eda import report as eda_report

    by_type = [tuple(r) for r in aggregates.notes_by_type(lake).collect()]
    assert by_type == [("History and physical note", 1, 3, 1)]
    found = sorted(
        (r.concept, r.mentions, r.negated_share) for r in aggregates.note_concepts(lake, 10).collect()
    )
    assert found == [
        ("Diabetes mellitus type 2 (disorder)", 2, 0.0),
        ("Essential hypertension (disorder)", 2, 1.0),
    ]
    aggregates.run(lake)
    published = lake.read("gold.eda_notes").collect()
    assert [(r.patients, r.notes, r.suppressed) for r in published] == [(None, None, "primary")]
    section = eda_report.notes_section(lake)
    assert "Clinical notes" in section and "Diabetes" not in section

    # note features: a note counts only once written, a negated mention never
    import dataclasses

    from ehrlake.features import definitions, pointintime

    defs = dataclasses.replace(definitions.load(), note_features=True)
    key = notes["DocumentReference/d1"].patient_key
    index = lake.spark.createDataFrame(
        [(key, when, dt.datetime.fromisoformat(when)) for when in ("2019-08-01", "2019-08-20", "2019-09-05")],
        "patient_key string, index_id string, index_time timestamp",
    )
    features = {r.index_id: r for r in pointintime.build(lake, index, defs).collect()}
    assert [features[w].notes_type2_diabetes for w in ("2019-08-01", "2019-08-20", "2019-09-05")] == [0, 1, 2]
    assert {features[w].notes_hypertension for w in features} == {0}  # denied in every note
    dates = ("2019-08-01", "2019-08-20", "2019-09-05")
    assert [features[w].notes_recent for w in dates] == [0, 1, 3]  # the PDF is a note written too
    assert [features[w].note_concepts_recent for w in dates] == [0, 1, 1]  # one code affirmed, twice
    assert "notes_diabetes" not in pointintime.feature_columns(
        definitions.load(), "patient"
    )  # off by default

    # a rerun gives the same tables
    before = sorted((r.note_id, r.text_deid) for r in lake.read("silver.note").collect())
    clean.run(lake)
    assert sorted((r.note_id, r.text_deid) for r in lake.read("silver.note").collect()) == before
    assert lake.read("silver.note_concept").count() == 4

    # a document's Composition may share its id with a DocumentReference (ABDM's bundles do): two notes
    composition = {
        "resourceType": "Composition",
        "id": "d1",
        "status": "final",
        "type": {"text": "Clinical consultation note"},
        "subject": {"reference": "Patient/p1"},
        "date": "2019-09-03T10:00:00Z",
        "title": "Consultation",
        "text": {"status": "generated", "div": "<div>Follow-up in two weeks.</div>"},
    }
    (tmp_path / "in2").mkdir()
    (tmp_path / "in2" / "more.ndjson").write_text(json.dumps(composition) + "\n")
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in2"))
    report = clean.run(lake, incremental=True, rebuild_share=1.0)
    assert report.rows["note"] == 4 and report.how["note"] == "rebuilt"  # a new source table
    ids = {r.note_id: r.note_type for r in lake.read("silver.note").collect()}
    assert ids["Composition/d1"] == "Clinical consultation note"
    assert ids["DocumentReference/d1"] == "History and physical note"

    # an incremental clean recomputes only the changed patients' notes (here the only one: every
    # patient may change), and gives what a rebuild gives
    (tmp_path / "in3").mkdir()
    later = _reference("d4", "p1", "2019-09-10T10:00:00Z", LAKE_NOTE.format(date="2019-09-10"))
    (tmp_path / "in3" / "later.ndjson").write_text(json.dumps(later) + "\n")
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in3"))
    report = clean.run(lake, incremental=True, rebuild_share=1.0)
    assert report.rows["note"] == 5 and report.how["note"].startswith("merged +1 ")
    assert report.how["note_concept"] == "merged +2 ~0 -0"  # the new note's two; the others as they were

    def tables():
        note = sorted(
            (r.note_id, r.patient_key, r.text_deid, str(r.sections))
            for r in lake.read("silver.note").collect()
        )
        return note, sorted(tuple(r) for r in lake.read("silver.note_concept").collect())

    merged = tables()
    assert clean.run(lake).how["note"] == "rebuilt" and tables() == merged
    assert clean.run(lake, incremental=True).how["note"] == "unchanged"


def test_a_document_bundles_composition_reaches_silver_with_the_entries_its_sections_point_at(lake, tmp_path):
    """ABDM's OPConsultNote ingested as a document: the Composition's sections name entries of its
    bundle (Conditions, an AllergyIntolerance...), whose narratives make the note's text; the bundle
    rides beside the entry only into the sealing and is never written."""
    from ehrlake import ingest
    from ehrlake.clean import notes as silver_notes
    from ehrlake.ingest.sources import SourceKind
    from ehrlake.security import copies

    (tmp_path / "in").mkdir()
    source = shared("india_abdm_fhir", "OPConsultNote_for_ABDMTrack_usecase.json")
    (tmp_path / "in" / source.name).write_bytes(source.read_bytes())
    report = ingest.run(lake, SourceKind.FHIR_BUNDLES, str(tmp_path / "in"), source_system="abdm")
    assert report.balanced and report.total.quarantined == 0, report.format()
    bronze = lake.read("bronze.fhir_composition")
    assert copies.NOTE_CONTEXT not in bronze.columns and copies.NOTE_TEXT in bronze.columns
    assert all("Prakash" not in (r[0] or "") for r in bronze.select(copies.NOTE_TEXT).collect())

    silver_notes.refresh(lake, "test-run")
    (note,) = [r for r in lake.read("silver.note").collect() if r.note_id.startswith("Composition/")]
    text = note.text_deid
    assert "# Chief complaints\nIncreased frequency of urination\nHazy vision" in text
    assert "# Family History\nMother had type 2 diabetes" in text
    assert text.endswith("# Document Reference\nLaboratory report")  # an entry without narrative: its type
    assert "Prakash" not in text and "Kumar" not in text
    assert "Chief complaints" in [s.title for s in note.sections]


WARD_NOTES = """extract: ward_notes
source_system: district-hospital
tables:
  discharge:
    keys: [note_id]
    patient_id: subject_id
    timestamps: [charttime]
    notes: {text: text, encounter: hadm_id, date: charttime, type: note_type}
"""


def test_a_declared_csv_note_table_reaches_silver_de_identified_with_its_multi_line_text(lake, tmp_path):
    """A hospital's note table in MIMIC-IV-Note's shape (the text quoted over many lines, a quote
    doubled inside it): ingest seals the text to the reveal key and keeps the clean job's copy; the
    notes job finds the table by that copy, de-identifies each note whole, and keeps a row without
    text as a note saying so, with its header."""
    from ehrlake import ingest
    from ehrlake.clean import notes as silver_notes
    from ehrlake.ingest.sources import SourceKind
    from ehrlake.security import copies

    declaration = tmp_path / "ward_notes.yaml"
    declaration.write_text(WARD_NOTES)
    text = (
        '"# Chief Complaint\nSeen by Dr. Okafor on 2024-03-05; call (555) 194-2761.\n\n'
        '# Assessment and Plan\nPatient said ""no more pain"". Review 2024-03-19."'
    )
    rows = [
        "note_id,subject_id,hadm_id,note_type,charttime,text",
        f"n1,s1,h1,DS,2024-03-05 10:00:00,{text}",
        f"n2,s1,h2,DS,2024-03-19 09:30:00,{text.replace('2024-03-05', '2024-03-12')}",
        "n3,s2,h3,RR,2024-04-01 08:00:00,",
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "discharge.csv").write_text("\r\n".join(rows) + "\r\n")
    report = ingest.run(lake, SourceKind.CSV_EXTRACT, str(tmp_path / "in"), extract=str(declaration))
    assert report.balanced and report.total.quarantined == 0, report.format()
    bronze = lake.read("bronze.ward_notes_discharge")
    assert bronze.count() == 3
    for column in ("text", copies.NOTE_TEXT):
        assert all("Okafor" not in (r[0] or "") for r in bronze.select(column).collect())

    assert silver_notes.sources(lake) == ["bronze.ward_notes_discharge"]
    counts = silver_notes.refresh(lake, "test-run")
    assert counts["note"] == (3, ["bronze.ward_notes_discharge"], "rebuilt")
    got = {r.note_id: r for r in lake.read("silver.note").collect()}
    assert sorted(got) == ["n1", "n2", "n3"]
    for nid in ("n1", "n2"):
        r = got[nid]
        assert (r.source_system, r.encounter_id, r.note_type, r.no_text) == (
            "district-hospital",
            {"n1": "h1", "n2": "h2"}[nid],
            "DS",
            None,
        )
        assert r.text_deid.count("\n") == 4 and 'said "no more pain"' in r.text_deid  # one note, whole
        for identifier in ("Okafor", "194-2761", "2024-03-05", "2024-03-12", "2024-03-19"):
            assert identifier not in r.text  # sealed
        for identifier in ("Okafor", "194-2761"):
            assert identifier not in r.text_deid
        # each date moved by the patient's offset (never 0): a moved date may land on another one of
        # the note's original dates (03-19 moved by -14 days is 03-05), so compare by position
        sent = {"n1": ("2024-03-05", "2024-03-19"), "n2": ("2024-03-12", "2024-03-19")}[nid]
        moved = [dt.date.fromisoformat(d) for d in re.findall(r"\d{4}-\d{2}-\d{2}", r.text_deid)]
        was = [dt.date.fromisoformat(d) for d in sent]
        assert len(moved) == 2 and moved[0] != was[0] and moved[1] - moved[0] == was[1] - was[0]
        assert [s.title for s in r.sections] == ["Chief Complaint", "Assessment and Plan"]
    assert got["n1"].patient_key == got["n2"].patient_key != got["n3"].patient_key
    assert got["n1"].date == dt.datetime(2024, 3, 5, 10, 0)
    assert (got["n3"].text_deid, got["n3"].no_text, got["n3"].encounter_id, got["n3"].note_type) == (
        None, copies.NO_TEXT, "h3", "RR"
    )  # fmt: skip
