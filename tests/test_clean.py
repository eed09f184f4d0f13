"""Bronze -> silver on hand-made records whose right answers are known: mappings, normalisation,
derived columns, inconsistency flags, cross-source deduplication and idempotency."""

from __future__ import annotations

import datetime as dt

import pytest
from fhir_fixtures import condition, observation, patient, write_ndjson
from pyspark.sql import functions as F

from ehrlake import clean, ingest
from ehrlake.ingest import SourceKind
from ehrlake.lake import increments, watermarks

TODAY = dt.date(2026, 11, 24)


def encounter(eid, pid, start, end, cls="IMP", org="o1"):
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"code": cls},
        "subject": {"reference": f"Patient/{pid}"},
        "period": {"start": start, "end": end},
        "serviceProvider": {"reference": f"Organization/{org}"},
    }


def quantity(oid, pid, loinc, value, unit, when="2021-01-01T10:00:00Z"):
    obs = observation(oid, pid, value)
    obs["code"] = {"coding": [{"system": "http://loinc.org", "code": loinc}]}
    obs["valueQuantity"] = {"value": value, "unit": unit, "code": unit}
    obs["effectiveDateTime"] = when
    return obs


def blood_pressure(oid, pid, systolic, diastolic, when="2021-02-01T10:00:00Z"):
    obs = observation(oid, pid, None)
    obs.pop("valueQuantity", None)
    obs["code"] = {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure"}]}
    obs["effectiveDateTime"] = when
    obs["component"] = [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
         "valueQuantity": {"value": systolic, "unit": "mm[Hg]", "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
         "valueQuantity": {"value": diastolic, "unit": "mmHg"}},  # a unit as written, no code
        {"code": {"coding": [{"system": "http://snomed.info/sct", "code": "271649006"}]},
         "valueCodeableConcept": {"text": "sitting"}},  # no quantity: a row without a value
    ]  # fmt: skip
    return obs


@pytest.fixture
def silver(lake, tmp_path):
    org = {
        "resourceType": "Organization",
        "id": "o1",
        "name": "District Hospital",
        "address": [{"state": "KA"}],
    }
    write_ndjson(
        tmp_path / "in" / "all.ndjson",
        [
            patient("p1"),
            org,
            encounter("e1", "p1", "2020-03-01T08:00:00Z", "2020-03-05T08:00:00Z"),
            encounter("e2", "p1", "2020-03-09T08:00:00Z", "2020-03-08T08:00:00Z", cls="AMB"),
            condition("c1", "p1", onset="2020-03-01"),
            condition("c2", "p1", onset="1960-01-01"),  # before birth (1970-05-01)
            condition("c3", "p9"),  # no such patient
            condition("c4", "p1", onset="2030-01-01"),  # in the future
            quantity("w1", "p1", "29463-7", 154.0, "[lb_av]"),  # weight in pounds
            quantity("h1", "p1", "8867-4", 400.0, "/min"),  # heart rate of 400: implausible
            quantity("g1", "p1", "2339-0", 5.5, "mmol/L"),  # glucose in mmol/L
            blood_pressure("bp1", "p1", 152.0, 94.0),  # a panel: its values are its components
        ],
    )
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"))
    report = clean.run(lake, today=TODAY)
    return lake, report


def rows(lake, table, key):
    return {r[key]: r for r in lake.read(table).collect()}


def test_fhir_records_map_onto_the_common_model_with_derived_columns(silver):
    lake, report = silver
    people = lake.read("silver.patient").collect()
    assert len(people) == 1 and report.rows["patient"] == 1
    p = people[0]
    assert (p.gender, p.birth_year, p.city, p.state, p.source) == ("female", 1970, "Pune", "MH", "fhir")
    assert not {"family_name", "birth_date", "raw", "phone"} & set(lake.read("silver.patient").columns)
    enc = rows(lake, "silver.encounter", "encounter_id")
    e1 = enc["e1"]
    assert (e1.encounter_class, e1.length_of_stay_days, e1.age_at_start, e1.state) == (
        "inpatient",
        4.0,
        49,
        "KA",
    )
    assert e1.patient_key == p.patient_key and e1.quality_flags == []
    assert enc["e2"].encounter_class == "ambulatory" and enc["e2"].quality_flags == ["end_before_start"]


def test_codes_and_units_are_normalised(silver):
    lake, _ = silver
    cond = rows(lake, "silver.condition", "condition_id")
    assert (cond["c1"].code_system, cond["c1"].code, cond["c1"].age_at_onset) == ("SNOMED", "44054006", 49)
    obs = rows(lake, "silver.observation", "observation_id")
    weight, glucose = obs["w1"], obs["g1"]
    assert (weight.unit, round(weight.value_number, 2), weight.source_value, weight.source_unit) == (
        "kg",
        69.85,
        154.0,
        "[lb_av]",
    )
    assert (glucose.unit, round(glucose.value_number, 1)) == ("mg/dL", 99.1)
    assert weight.code_system == "LOINC"
    # a blood pressure panel's components are measurements of their own, at the panel's time
    panel = [r for k, r in obs.items() if k.startswith("bp1")]
    got = {(r.observation_id, r.code_system, r.code, r.value_number, r.unit) for r in panel}
    assert got == {
        ("bp1", "LOINC", "85354-9", None, None),
        ("bp1#component-1", "LOINC", "8480-6", 152.0, "mm[Hg]"),
        ("bp1#component-2", "LOINC", "8462-4", 94.0, "mm[Hg]"),
        ("bp1#component-3", "SNOMED", "271649006", None, None),
    }
    assert {r.effective_at for r in panel} == {dt.datetime(2021, 2, 1, 10)}
    assert len({r.patient_key for r in panel}) == 1 and obs["bp1#component-1"].patient_key is not None


def test_inconsistencies_are_flagged_not_dropped(silver):
    lake, report = silver
    cond = rows(lake, "silver.condition", "condition_id")
    assert set(cond) == {"c1", "c2", "c3", "c4"}  # nothing dropped
    assert cond["c2"].quality_flags == ["before_birth"]
    assert cond["c3"].quality_flags == ["unknown_patient"]
    assert cond["c4"].quality_flags == ["future_date"]
    assert rows(lake, "silver.observation", "observation_id")["h1"].quality_flags == ["implausible_value"]
    assert report.flagged["condition"] == 3 and report.flagged["observation"] == 1


def test_clean_is_idempotent(silver):
    lake, _ = silver
    before = {
        t: sorted(map(str, lake.read(f"silver.{t}").collect())) for t in ("patient", "encounter", "condition")
    }
    clean.run(lake, today=TODAY)
    after = {
        t: sorted(map(str, lake.read(f"silver.{t}").collect())) for t in ("patient", "encounter", "condition")
    }
    assert before == after


SILVER = ("patient", "organization", "encounter", "condition", "observation")


def test_incremental_clean_merges_only_changed_patients_and_equals_a_rebuild(silver, tmp_path):
    """A second batch (a new patient; p1 died, which flags p1's later events; the unknown p9
    arrives; a new condition; the hospital moved, its encounters' region with it) and a record
    deleted from bronze: ``--incremental`` recomputes the
    patients whose bronze rows changed, and the tables it leaves are the ones a rebuild writes."""
    lake, _ = silver
    write_ndjson(
        tmp_path / "batch2" / "all.ndjson",
        [
            patient("p1", version="2", deceasedDateTime="2020-03-03T00:00:00Z"),
            patient("p9", family="Iyer"),
            patient("p4", family="Das"),
            condition("c5", "p1", onset="2021-02-01"),
            condition("c9", "p4", onset="2022-01-01"),
            {
                "resourceType": "Organization",
                "id": "o1",
                "name": "District Hospital",
                "address": [{"state": "TN"}],
            },
        ],
    )
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "batch2"))
    c2 = lake.read("bronze.fhir_condition").where("id = 'c2'").select("source_system", "id")
    nothing = lake.read("bronze.fhir_condition").limit(0)
    lake.merge(nothing, "bronze.fhir_condition", ["source_system", "id"], delete=c2)

    report = clean.run(lake, today=TODAY, incremental=True, rebuild_share=5.0)  # 3 of 1 patients changed
    assert report.how["organization"] == "merged +0 ~1 -0"
    assert report.how["encounter"] == "merged +0 ~2 -0"  # e1 in TN now, e2 also after p1's death
    assert report.how["observation"] == "merged +0 ~7 -0"  # all after p1's death (a panel: 1 + 3)
    assert report.how["condition"] == "merged +2 ~2 -1"  # c5, c9; c3 (p9 known now), c4 (after death); c2
    assert report.how["patient"] == "merged +2 ~1 -0"
    merged = {t: sorted(map(str, lake.read(f"silver.{t}").collect())) for t in SILVER}
    assert {e.state for e in lake.read("silver.encounter").collect()} == {"TN"}
    assert rows(lake, "silver.condition", "condition_id")["c4"].quality_flags == [
        "after_death",
        "future_date",
    ]

    # the report's counts are the last run's carried forward with what the merge changed: a scan's
    assert _counts(report) == _scanned(lake) and report.flagged["condition"] == 2  # c4, c5: after death

    versions = {t: lake.version(f"silver.{t}") for t in SILVER}
    again = clean.run(lake, today=TODAY, incremental=True, rebuild_share=5.0)
    assert set(again.how.values()) == {"unchanged"}
    assert {t: lake.version(f"silver.{t}") for t in SILVER} == versions  # nothing to do, nothing committed
    assert _counts(again) == _counts(report)
    mark = watermarks.read(lake, "clean")["silver.condition"]  # what the next run starts from
    assert (mark.counts.version, mark.counts.rows, mark.counts.tallies["flagged"]) == (
        versions["condition"],
        *_counts(report)["condition"],
    )
    assert mark.counts.tallies["unknown_patient"] == 0  # p9 is known now: the next plan reads no events

    # another writer (a record deleted from silver, as forgetting a patient does): counted again
    c5 = lake.read("silver.condition").where("condition_id = 'c5'").select("source_system", "condition_id")
    lake.merge(
        lake.read("silver.condition").limit(0),
        "silver.condition",
        ["source_system", "condition_id"],
        delete=c5,
    )
    after = clean.run(lake, today=TODAY, incremental=True, rebuild_share=5.0)
    assert after.how["condition"] == "unchanged" and _counts(after) == _scanned(lake)
    assert after.rows["condition"] == report.rows["condition"] - 1

    rebuilt = clean.run(lake, today=TODAY)
    assert set(rebuilt.how.values()) == {"rebuilt"}
    assert {t: sorted(map(str, lake.read(f"silver.{t}").collect())) for t in SILVER} == merged
    assert _counts(rebuilt) == _counts(report) == _scanned(lake)  # counted as written
    marks = watermarks.read(lake, "clean")
    assert {t: marks[f"silver.{t}"].counts.version for t in SILVER} == {
        t: lake.version(f"silver.{t}") for t in SILVER
    }


def test_a_written_frame_is_counted_by_the_write_and_only_once_it_ran(spark):
    """A rebuilt table's counts come from the write itself (observed metrics); a frame no action
    ran yet has none to give (the caller counts the table instead), rather than waiting forever."""
    tally = {"even": F.col("id") % 2 == 0, "big": F.col("id") >= 90}
    frame = spark.range(100).repartitionByRange(3, "id").sortWithinPartitions("id")
    observed, observation = increments.observed(frame, tally)
    assert increments.observed_counts(observation, tally) is None
    observed.write.format("noop").mode("overwrite").save()
    assert increments.observed_counts(observation, tally) == (100, {"even": 50, "big": 10})
    assert increments.counted(frame, tally) == (100, {"even": 50, "big": 10})


def test_same_rows_tells_a_reordered_table_from_a_changed_one(spark):
    """The re-run shortcut of replace_patients: the same rows in another order are the same; a
    changed value, a null moved to the next column, or a duplicate in place of a row are not;
    where a column cannot be hashed (a map) or the old side lacks it, the answer is "compare"."""
    schema = "patient_key string, code string, note string, reasons array<string>"
    rows = [("p1", "a", None, ["x"]), ("p2", "b", "n", []), ("p3", None, "c", None)]
    old = spark.createDataFrame(rows, schema)
    columns = old.columns

    def same(changed) -> bool:
        return increments.same_rows(spark.createDataFrame(changed, schema), old, columns)

    assert same(list(reversed(rows)))
    assert not same([("p1", "a", None, ["y"]), *rows[1:]])
    assert not same([("p1", None, "a", ["x"]), *rows[1:]])  # the null and the value change places
    assert not same([rows[0], rows[0], rows[2]])
    assert not same(rows[:2])
    mapped = spark.createDataFrame([("p1", {"k": 1})], "patient_key string, m map<string, int>")
    assert not increments.same_rows(mapped, mapped, mapped.columns)
    assert not increments.same_rows(old.withColumn("extra", F.lit(1)), old, [*columns, "extra"])


def _counts(report) -> dict[str, tuple[int, int]]:
    return {t: (report.rows[t], report.flagged[t]) for t in SILVER}


def _scanned(lake) -> dict[str, tuple[int, int]]:
    """Each silver table's rows and flagged rows, counted over the table."""
    counts = {}
    for t in SILVER:
        table = lake.read(f"silver.{t}")
        flagged = "count_if(size(quality_flags) > 0)" if "quality_flags" in table.columns else "0"
        counts[t] = tuple(table.selectExpr("count(*)", flagged).first())
    return counts


def test_a_second_clean_on_the_same_lake_is_refused_while_one_runs(silver):
    """Two cleans at once could both append the same new rows: the second is refused in one line,
    before it reads or writes anything, and runs once the first has finished."""
    from ehrlake.errors import JobRunning
    from ehrlake.lake import locks

    lake, _ = silver
    versions = lake.version("silver.patient")
    holder = locks.alone(lake.root, "clean")  # as a clean running in another process holds it
    with holder, pytest.raises(JobRunning, match="another clean is running on the lake"):
        clean.run(lake, today=TODAY, incremental=True)
    assert lake.version("silver.patient") == versions
    assert set(clean.run(lake, today=TODAY, incremental=True).how.values()) == {"unchanged"}


def test_one_patient_from_fhir_and_synthea_is_one_silver_patient(lake, tmp_path):
    write_ndjson(tmp_path / "fhir" / "Patient.ndjson", [patient("p1")])
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "patients.csv").write_text(
        "Id,BIRTHDATE,DEATHDATE,SSN,FIRST,LAST,GENDER,CITY,STATE,COUNTY\n"
        "p1,1970-05-01,,999-11-2222,Asha,Rao,F,Pune,MH,Pune District\n"
        "p2,1985-01-02,2020-01-01,999-33-4444,Ravi,Kumar,M,Mysuru,KA,Mysuru\n"
    )
    (csv_dir / "encounters.csv").write_text(
        "Id,START,STOP,PATIENT,ORGANIZATION,ENCOUNTERCLASS,CODE,DESCRIPTION\n"
        "s1,2019-06-01T10:00:00Z,2019-06-01T11:00:00Z,p1,org9,wellness,410620009,Well child visit\n"
        "s2,2021-06-01T10:00:00Z,2021-06-01T11:00:00Z,p2,org9,emergency,50849002,Emergency visit\n"
    )
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "fhir"))
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(csv_dir))
    report = clean.run(lake, today=TODAY)
    people = rows(lake, "silver.patient", "patient_key")
    assert report.rows["patient"] == 2 and len(people) == 2
    genders = sorted((p.gender, p.birth_year, p.deceased) for p in people.values())
    assert genders == [("female", 1970, False), ("male", 1985, True)]
    enc = rows(lake, "silver.encounter", "encounter_id")
    assert (enc["s1"].encounter_class, enc["s1"].code_system, enc["s1"].source) == (
        "wellness",
        "SNOMED",
        "synthea",
    )
    assert enc["s2"].quality_flags == ["after_death"]
    assert report.sources["patient"] == ["fhir", "synthea"]


def test_data_model_doc_is_rendered_from_the_declarations_and_mappings():
    from conftest import REPO

    from ehrlake.clean.docs import render

    assert (REPO / "docs" / "data_model.md").read_text() == render(), "run: python -m ehrlake.clean.docs"


@pytest.mark.parametrize(
    "entity, error",
    [
        ("    columns:\n      shoe_size: size\n", r"patient has no column\(s\) \['shoe_size'\]"),
        ("    filter: a > 1\n    columns:\n      gender: g\n", r"unknown key mapping .*: patient\.filter "),
        ("    columns: {}\n", "a mapping needs 'from' .* and 'columns'"),
    ],
)
def test_a_mapping_naming_an_unknown_column_or_key_is_a_clear_error(tmp_path, entity, error):
    from ehrlake.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("source: x\nentities:\n  patient:\n    from: bronze.t\n" + entity)
    with pytest.raises(ConfigError, match=error):
        clean.load_mappings(bad)
