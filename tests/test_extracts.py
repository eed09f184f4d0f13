"""Hospital CSV extracts (conf/extracts/*.yaml) into bronze, and their mappings (conf/mappings/) onto
the common model, on hand-made rows in the real extracts' shapes whose right answers are known."""

from __future__ import annotations

import datetime as dt
import gzip

import pytest
from conftest import SAMPLE

from ehrlake import clean, features, ingest
from ehrlake.clean import codes
from ehrlake.errors import ConfigError
from ehrlake.ingest import SourceKind
from ehrlake.ingest import extract as extracts

TODAY = dt.date(2026, 11, 24)


def write_csv(path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as f:
        f.write("\r\n".join(lines) + "\r\n")  # the UCI file has CRLF line endings


def diabetes_header() -> str:
    with gzip.open(SAMPLE / "diabetes_130_us" / "diabetic_data_dev.csv.gz", "rt") as f:
        return f.readline().strip()


def diabetes_row(encounter, patient, diags=("250.83", "401", "?"), drugs=None, a1c=">8", glu="None", **kw):
    header = diabetes_header().split(",")
    row = dict.fromkeys(header, "No")
    row.update(
        encounter_id=str(encounter),
        patient_nbr=str(patient),
        race="Caucasian",
        gender="Female",
        age="[60-70)",
        weight="?",
        admission_type_id="1",
        discharge_disposition_id="11",
        admission_source_id="7",
        time_in_hospital="5",
        payer_code="?",
        medical_specialty="?",
        num_lab_procedures="40",
        num_procedures="1",
        num_medications="12",
        number_outpatient="0",
        number_emergency="0",
        number_inpatient="2",
        diag_1=diags[0],
        diag_2=diags[1],
        diag_3=diags[2],
        number_diagnoses="3",
        max_glu_serum=glu,
        A1Cresult=a1c,
        change="Ch",
        diabetesMed="Yes",
        readmitted="<30",
    )
    row.update({"metformin": "Up", "insulin": "Steady"} if drugs is None else drugs)
    row.update(kw)
    return ",".join(row[h] for h in header)


def test_diabetes_extract_maps_through_its_declaration(lake, tmp_path):
    src = tmp_path / "uci"
    write_csv(
        src / "diabetic_data.csv.gz",
        [
            diabetes_header(),
            diabetes_row(1001, 77),
            diabetes_row(1002, 77, diags=("V45", "E878", "?"), drugs={}, a1c="None", glu=">300"),
            diabetes_row(1003, 78, time_in_hospital="five"),  # not a number: quarantined
            diabetes_row("", 79),  # no encounter id: quarantined
        ],
    )
    (src / "IDs_mapping.csv").write_text("admission_type_id,description\n1,Emergency\n")  # ignored
    report = ingest.run(lake, SourceKind.CSV_EXTRACT, str(src), extract="diabetes130")
    assert report.source_system == "diabetes-130-us" and report.files_found == 1
    counts = report.entities["bronze.diabetes130_encounters"]
    assert (counts.records_in, counts.inserted, counts.quarantined) == (4, 2, 2) and report.balanced
    reasons = {r.reason for r in lake.read("ops.quarantine").collect()}
    assert reasons == {"unparseable_number", "missing_id"}
    bronze = {r.encounter_id: r for r in lake.read("bronze.diabetes130_encounters").collect()}
    assert bronze["1001"].weight is None and bronze["1001"].payer_code is None  # "?" is missing
    assert bronze["1001"].a1cresult == ">8" and bronze["1001"].glyburide_metformin == "No"
    assert bronze["1001"].patient_key == bronze["1002"].patient_key

    clean.run(lake, today=TODAY)
    enc = {r.encounter_id: r for r in lake.read("silver.encounter").collect()}
    assert enc["1001"].encounter_class == "inpatient" and enc["1001"].length_of_stay_days == 5.0
    assert enc["1001"].display == "Emergency" and enc["1001"].discharge_disposition == "Expired"
    conditions = {r.condition_id: r.code for r in lake.read("silver.condition").collect()}
    assert conditions == {"1001#1": "250.83", "1001#2": "401", "1002#1": "V45", "1002#2": "E878"}
    meds = {r.medication_id: r.display for r in lake.read("silver.medication").collect()}
    assert meds == {"1001#metformin": "metformin (up)", "1001#insulin": "insulin (steady)"}
    obs = {r.observation_id: (r.code, r.value_code) for r in lake.read("silver.observation").collect()}
    assert obs == {"1001#4548-4": ("4548-4", ">8"), "1002#2345-7": ("2345-7", ">300")}
    people = lake.read("silver.patient").collect()
    assert len(people) == 1 and people[0].gender == "female" and people[0].source == "diabetes130"
    # a hospital whose only source is this undated extract: its own features, the dated tasks skipped
    built = features.run(lake)
    assert built["gold.features_diabetes130"] == 2 and "gold.features_patient" not in built
    assert [s.split(" (")[0] for s in built["skipped"]] == ["patient and encounter tasks"]
    assert set(built["tasks"]) == {"diabetes130_readmission_30d"}
    stays = {r.index_id: r.earlier_stays for r in lake.read("gold.features_diabetes130").collect()}
    assert stays == {"1001": 0.0, "1002": 1.0}  # linked by the pseudonymous key


def test_diabetes_history_is_the_patients_earlier_encounters_only(spark, tmp_path):
    """Features from a patient's earlier encounters in the extract (by encounter_id as a number: 99
    comes before 1001), never from this one or a later one: removing or changing a later encounter
    leaves every earlier row's features as they were."""
    from ehrlake.features import diabetes130 as d130

    def built(lines):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.csv.gz"
        write_csv(path, [diabetes_header(), *lines])
        return {r.index_id: r.asDict() for r in d130.build(d130.read_file(spark, str(path))).collect()}

    first = diabetes_row(99, 77, diags=("428", "401", "?"), discharge_disposition_id="1", readmitted="<30")
    second = diabetes_row(
        1001, 77, drugs={}, discharge_disposition_id="1", readmitted=">30", time_in_hospital="3"
    )
    third = diabetes_row(1002, 77, discharge_disposition_id="1", readmitted="NO")
    other = diabetes_row(1003, 78, discharge_disposition_id="1")
    rows = built([third, other, second, first])
    history = lambda i: {f: rows[i][f] for f in d130.HISTORY}  # noqa: E731
    assert set(history("99").values()) == {0.0} and set(history("1003").values()) == {0.0}
    assert history("1001") == {
        "earlier_stays": 1.0, "earlier_readmitted_30d": 1.0, "earlier_readmitted": 1.0,
        "previous_readmitted_30d": 1.0, "earlier_days_in_hospital": 5.0, "earlier_emergency_admissions": 1.0,
        "earlier_heart_failure": 1.0, "earlier_renal": 0.0, "earlier_insulin": 1.0,
    }  # fmt: skip
    assert history("1002") == {
        "earlier_stays": 2.0, "earlier_readmitted_30d": 1.0, "earlier_readmitted": 2.0,
        "previous_readmitted_30d": 0.0, "earlier_days_in_hospital": 8.0, "earlier_emergency_admissions": 2.0,
        "earlier_heart_failure": 1.0, "earlier_renal": 0.0, "earlier_insulin": 1.0,
    }  # fmt: skip
    changed = third.replace(",NO", ",<30").replace("[60-70)", "[80-90)")
    for later in ([first, second, other], [first, second, changed, other]):
        again = built(later)
        assert all(again[i] == rows[i] for i in ("99", "1001", "1003"))


MIMIC = {
    "hosp/patients.csv.gz": [
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
        "1,F,60,2150,2011 - 2013,2152-06-01",
    ],
    "hosp/admissions.csv.gz": [
        "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,admission_location,"
        "discharge_location,insurance,language,marital_status,race,edregtime,edouttime,hospital_expire_flag",
        "1,100,2151-03-01 10:00:00,2151-03-04 22:00:00,,URGENT,P1,EMERGENCY ROOM,HOME,Medicare,ENGLISH,"
        "WIDOWED,WHITE,,,0",
    ],
    "hosp/diagnoses_icd.csv.gz": [
        "subject_id,hadm_id,seq_num,icd_code,icd_version",
        "1,100,1,E119,10",
        "1,100,2,4019,9",
    ],
    "hosp/labevents.csv.gz": [
        "labevent_id,subject_id,hadm_id,specimen_id,itemid,order_provider_id,charttime,storetime,value,"
        "valuenum,valueuom,ref_range_lower,ref_range_upper,flag,priority,comments",
        '9,1,100,5,50912,,2151-03-02 06:00:00,,1.1,1.1,mg/dL,0.4,1.1,,ROUTINE,"Patient lives at 12 Elm St"',
        "10,1,100,5,51999,,2151-03-02 06:00:00,,7,7,U,,,,ROUTINE,",
    ],
    "hosp/d_labitems.csv.gz": ["itemid,label,fluid,category", "50912,Creatinine,Blood,Chemistry"],
    "hosp/omr.csv.gz": [
        "subject_id,chartdate,seq_num,result_name,result_value",
        "1,2151-01-05,1,Blood Pressure,130/85",
        "1,2151-01-05,1,Weight (Lbs),154",
    ],
}


def test_mimic_extract_maps_labs_diagnoses_and_vitals(lake, tmp_path):
    for name, lines in MIMIC.items():
        write_csv(tmp_path / "mimic" / name, lines)
    report = ingest.run(lake, SourceKind.CSV_EXTRACT, str(tmp_path / "mimic"), extract="mimic")
    assert report.balanced and report.entities["bronze.mimic_labevents"].inserted == 2
    labs = lake.read("bronze.mimic_labevents").collect()
    assert all(r.comments is None for r in labs)  # free text moved to a sealed column
    assert {r.comments_text[:4] for r in labs if r.comments_text} == {"ek2:"}  # free text: to the reveal key

    clean.run(lake, today=TODAY)
    (p,) = lake.read("silver.patient").collect()
    assert (p.birth_year, p.deceased, p.death_date) == (2090, True, dt.date(2152, 6, 1))
    (e,) = lake.read("silver.encounter").collect()
    assert (e.encounter_id, e.length_of_stay_days, e.age_at_start, e.state) == (
        "100",
        3.5,
        60,
        "Massachusetts",
    )
    assert "future_date" in e.quality_flags  # MIMIC's shifted dates, flagged, kept
    conditions = {(r.code_system, r.code) for r in lake.read("silver.condition").collect()}
    assert conditions == {("ICD10CM", "E11.9"), ("ICD9CM", "401.9")}
    obs = {r.code: r for r in lake.read("silver.observation").collect()}
    assert obs["2160-0"].display == "Creatinine (blood)" and obs["2160-0"].value_number == 1.1
    assert obs["51999"].code_system == "MIMIC-LABITEM" and obs["51999"].display is None
    assert (obs["8480-6"].value_number, obs["8462-4"].value_number) == (130.0, 85.0)
    assert obs["29463-7"].unit == "kg" and obs["29463-7"].value_number == pytest.approx(69.85, abs=0.01)


def test_bundled_extracts_ingest_without_loss(lake):
    for name, folder in (("diabetes130", "diabetes_130_us"), ("mimic", "mimic_iv_demo")):
        report = ingest.run(lake, SourceKind.CSV_EXTRACT, str(SAMPLE / folder), extract=name)
        assert report.balanced and report.records_read > 0
        assert sum(c.quarantined for c in report.entities.values()) == 0, report.format()


def test_extract_declarations_are_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extract: x\ntables:\n  t:\n    keyz: [a]\n")
    with pytest.raises(ConfigError, match="unknown key"):
        extracts.load(str(bad))
    with pytest.raises(ConfigError, match="known: diabetes130, mimic"):
        extracts.load("nope")


def test_mapping_lookups_are_expanded_and_unknown_ones_refused(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text(
        "source: s\nlookups:\n  kind: {'1': \"it's one\"}\nentities:\n  encounter:\n"
        "    from: bronze.x\n    columns:\n      display: element_at({{kind}}, code)\n"
    )
    (m,) = clean.load_mappings(good)
    assert m.columns["display"] == "element_at(map('1', 'it\\'s one'), code)"
    good.write_text(good.read_text().replace("{{kind}}", "{{other}}"))
    with pytest.raises(ConfigError, match="unknown lookup"):
        clean.load_mappings(good)


@pytest.mark.parametrize(
    "system,code,expected",
    [
        ("ICD9CM", "4019", "401.9"),
        ("ICD9CM", "250.83", "250.83"),
        ("ICD9CM", "E8781", "E878.1"),
        ("ICD9CM", "V45", "V45"),
        ("ICD10CM", "e119", "E11.9"),
        ("ICD10CM", "K70.30", "K70.30"),
        ("SNOMED", "44054006", "44054006"),
    ],
)
def test_icd_codes_get_one_spelling(spark, system, code, expected):
    df = spark.createDataFrame([(system, code)], "s string, c string")
    assert df.select(codes.normalise_code(df.s, df.c)).first()[0] == expected


def test_a_quoted_field_over_several_lines_is_one_record_numbered_by_its_first_line(tmp_path, monkeypatch):
    """Hospital extracts quote a note's text over many lines (RFC 4180): the CSV reader joins a
    record's lines while a quote is open, blank lines inside included; a quote never closed ends
    its record at the end of the file or after MAX_RECORD_LINES lines (then quarantined whole
    by the typing). NDJSON and the like stay one record per line."""
    import pyarrow as pa

    from ehrlake.ingest import sources

    path = tmp_path / "notes.csv"
    path.write_bytes(
        b'id,text\r\n1,"first line\r\n\r\nsaid ""no"", then left"\r\n2,plain\r\n\r\n3,"never closed\r\n4,x\r\n'
    )

    def records(quoted: bool) -> list[tuple[int, str]]:
        paths = pa.record_batch([pa.array([str(path)])], names=["path"])
        out = sources._stream(iter([paths]), False, 2, quoted)  # batches of 2: joins cross them
        return [
            (i, t)
            for b in out
            for i, t in zip(b["record_index"].to_pylist(), b["text"].to_pylist(), strict=True)
        ]

    assert records(True) == [
        (1, "id,text"),
        (2, '1,"first line\n\nsaid ""no"", then left"'),
        (5, "2,plain"),
        (7, '3,"never closed\n4,x'),
    ]
    assert [i for i, _ in records(False)] == [1, 2, 4, 5, 7, 8]
    monkeypatch.setattr(sources, "MAX_RECORD_LINES", 2)
    assert records(True)[1] == (2, '1,"first line\n')
