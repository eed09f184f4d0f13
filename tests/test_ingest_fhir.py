"""FHIR ingest: NDJSON and bundles into bronze, quarantine with reasons, idempotence, increments."""

from __future__ import annotations

import json
import os

import pytest
from conftest import opened
from fhir_fixtures import bundle, condition, observation, patient, write_json, write_ndjson

from ehrlake import ingest
from ehrlake.errors import EnvironmentProblem
from ehrlake.ingest import SourceKind


def quarantine_reasons(lake) -> dict[tuple[str, int], str]:
    return {
        (r.source_file.rsplit("/", 1)[-1], r.record_index): r.reason
        for r in opened(lake, "ops.quarantine").collect()
    }


def test_ndjson_plain_and_gzip_many_files_per_type(lake, tmp_path):
    dump = tmp_path / "dump"
    write_ndjson(dump / "Patient.ndjson", [patient("p1"), patient("p2")])
    write_ndjson(dump / "Patient.2.ndjson.gz", [patient("p3")])
    write_ndjson(dump / "Condition.ndjson.gz", [condition("c1", "p1"), condition("c2", "p3")])
    write_ndjson(dump / "Observation.ndjson", [observation("o1", "p2")])
    report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    assert report.balanced and report.records_read == 6
    assert report.entities["bronze.fhir_patient"].inserted == 3
    patients = {r.id: r for r in opened(lake, "bronze.fhir_patient").collect()}
    assert set(patients) == {"p1", "p2", "p3"}
    p1 = patients["p1"]
    assert (p1.family_name, p1.given_names, p1.city, str(p1.birth_date)) == (
        "Rao",
        ["Asha"],
        "Pune",
        "1970-05-01",
    )
    assert (
        p1.record_index == 1
        and p1.source_file.endswith("Patient.ndjson")
        and p1.ingest_run_id == report.run_id
    )
    assert '"family": "Rao"' in p1.raw  # the full resource is kept
    cond = {r.id: r for r in lake.read("bronze.fhir_condition").collect()}
    assert (
        cond["c2"].patient_id == "p3"
        and cond["c2"].code == "44054006"
        and cond["c2"].code_system.endswith("sct")
    )
    obs = lake.read("bronze.fhir_observation").first()
    assert obs.patient_id == "p2" and obs.value_quantity == 7.1 and obs.value_unit == "%"
    assert str(obs.effective_at) == "2021-01-01 04:30:00"  # +05:30 normalised to UTC


@pytest.mark.parametrize("kind", ["transaction", "collection", "searchset"])
def test_bundles_of_each_type_json_and_gzip(lake, tmp_path, kind):
    src = tmp_path / "bundles"
    write_json(src / "one.json", bundle([patient("p1"), condition("c1", "p1")], kind))
    write_json(src / "many.json.gz", bundle([patient("p2"), patient("p3"), observation("o1", "p2")], kind))
    report = ingest.run(lake, SourceKind.FHIR_BUNDLES, str(src))
    assert report.balanced and report.records_read == 5
    assert sorted(r.id for r in opened(lake, "bronze.fhir_patient").collect()) == ["p1", "p2", "p3"]
    entries = {r.id: r.record_index for r in opened(lake, "bronze.fhir_patient").collect()}
    assert entries == {"p1": 1, "p2": 1, "p3": 2}  # 1-based entry number within its bundle
    assert lake.row_count("bronze.fhir_condition") == 1 and lake.row_count("bronze.fhir_observation") == 1


def test_valid_resource_types_without_a_view_land_in_fhir_other(lake, tmp_path):
    flag = {"resourceType": "Flag", "id": "f1", "subject": {"reference": "Patient/p1"}}
    goal = {
        "resourceType": "Goal",
        "id": "g1",
        "subject": {"reference": "Patient/p1"},
        "lifecycleStatus": "active",
    }
    write_json(tmp_path / "b.json", bundle([patient("p1"), flag, goal]))
    ingest.run(lake, SourceKind.FHIR_BUNDLES, str(tmp_path / "b.json"))
    other = lake.read("bronze.fhir_other").collect()
    assert [(r.resource_type, r.id, r.patient_id) for r in other] == [("Flag", "f1", "p1")]
    goals = lake.read("bronze.fhir_goal").collect()  # a type with a view in conf/views/ is typed
    assert [(r.id, r.patient_id, r.lifecycle_status) for r in goals] == [("g1", "p1", "active")]


def test_each_bad_record_is_quarantined_with_its_reason_and_the_rest_loads(lake, tmp_path):
    dump = tmp_path / "dump"
    write_ndjson(
        dump / "mixed.ndjson",
        [
            patient("good1"),  # line 1
            '{"resourceType": "Patient", "id": "broken"',  # line 2: malformed JSON
            {"id": "x1", "gender": "male"},  # line 3: no resourceType
            {"resourceType": "Patient", "gender": "male"},  # line 4: no id
            {"resourceType": "Spaceship", "id": "s1"},  # line 5: not a FHIR R4 type
            patient("baddate", birth="31/12/1970"),  # line 6: unparseable date: loaded, date null
            condition("c1", "good1", onset="2020-13-45"),  # line 7: unparseable dateTime: loaded
            observation("o1", "good1"),  # line 8
            "[1, 2, 3]",  # line 9: JSON but not an object
            {"resourceType": "Condition", "id": "c2", "code": {"text": "x"}},  # line 10: names no patient
        ],
    )
    report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    assert report.balanced and report.records_read == 10
    assert quarantine_reasons(lake) == {
        ("mixed.ndjson", 2): "malformed_json",
        ("mixed.ndjson", 3): "missing_resource_type",
        ("mixed.ndjson", 4): "missing_id",
        ("mixed.ndjson", 5): "unknown_resource_type",
        ("mixed.ndjson", 9): "malformed_json",
        ("mixed.ndjson", 10): "missing_subject",
    }
    patients = {r.id: r for r in opened(lake, "bronze.fhir_patient").collect()}
    assert sorted(patients) == ["baddate", "good1"]
    # a field that cannot be read is null, and the row says why without quoting the value
    assert patients["baddate"].birth_date is None
    assert patients["baddate"].conformance_issues == [
        "birth_date (birthDate): JSON string is not a valid date"
    ]
    assert patients["good1"].conformance_issues == []
    conditions = {r.id: r for r in lake.read("bronze.fhir_condition").collect()}
    assert conditions["c1"].onset_at is None and conditions["c1"].conformance_issues[0].startswith("onset_at")
    assert lake.row_count("bronze.fhir_observation") == 1
    q = {r.record_index: r for r in opened(lake, "ops.quarantine").collect()}
    assert q[10].message == "Condition names no patient (subject/patient reference)"
    assert q[2].raw == '{"resourceType": "Patient", "id": "broken"' and q[2].source_kind == "fhir-ndjson"
    assert report.entities["bronze.fhir_patient"].quarantined == 1  # no id
    assert report.entities["bronze.fhir_condition"].quarantined == 1  # no subject
    assert report.entities["(unparsed)"].quarantined == 4  # two malformed, no resourceType, unknown type
    assert report.total.quarantined == 6
    assert report.entities["bronze.fhir_patient"].with_issues == 1
    assert report.entities["bronze.fhir_condition"].with_issues == 1


def test_early_r4_and_stu3_records_land_typed_with_their_drift_recorded(lake, tmp_path):
    """The export that lost every Condition and AllergyIntolerance: string statuses, ``context``
    for ``encounter``, ``assertedDate``. They load, read as R4, each problem in conformance_issues."""
    stu3_condition = {
        "resourceType": "Condition",
        "id": "c1",
        "clinicalStatus": "active",
        "verificationStatus": "confirmed",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}]},
        "subject": {"reference": "Patient/p1"},
        "context": {"reference": "Encounter/e1"},
        "onsetDateTime": "2011-05-01T10:00:00-04:00",
        "assertedDate": "2011-05-02",
    }
    stu3_allergy = {
        "resourceType": "AllergyIntolerance", "id": "a1", "clinicalStatus": "active",
        "verificationStatus": "confirmed", "patient": {"reference": "Patient/p1"},
        "code": {"coding": [{"code": "300916003", "display": "Latex allergy"}]}, "assertedDate": "2011-05-02T00:00:00Z",
    }  # fmt: skip
    write_ndjson(tmp_path / "old.ndjson", [patient("p1"), stu3_condition, stu3_allergy])
    report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "old.ndjson"))
    assert report.balanced and report.total.quarantined == 0
    c = lake.read("bronze.fhir_condition").collect()[0]
    assert (c.patient_id, c.encounter_id, c.clinical_status, c.verification_status, c.code) == (
        "p1",
        "e1",
        "active",
        "confirmed",
        "44054006",
    )
    assert c.recorded_at is not None and c.onset_at is not None
    assert sorted(i.split(":")[0] for i in c.conformance_issues) == [
        "assertedDate", "clinicalStatus", "context", "verificationStatus"
    ]  # fmt: skip
    a = lake.read("bronze.fhir_allergy").collect()[0]
    assert (a.patient_id, a.clinical_status, a.code) == ("p1", "active", "300916003")
    assert a.recorded_at is not None and len(a.conformance_issues) == 3


def test_malformed_bundle_file_is_quarantined_whole(lake, tmp_path):
    write_json(tmp_path / "b" / "bad.json", '{"resourceType": "Bundle", "entry": [')
    write_json(tmp_path / "b" / "good.json", bundle([patient("p1")]))
    report = ingest.run(lake, SourceKind.FHIR_BUNDLES, str(tmp_path / "b"))
    assert report.balanced and quarantine_reasons(lake) == {("bad.json", 0): "malformed_json"}
    assert lake.row_count("bronze.fhir_patient") == 1


def test_a_second_json_value_on_a_line_or_after_a_bundle_is_quarantined_not_dropped(lake, tmp_path):
    """Spark's JSON readers stop after the first value: ``{..}{..}`` used to load the first resource
    and lose the second without a trace. Such a record is malformed and kept whole in quarantine."""
    one, two = json.dumps(patient("p1")), json.dumps(patient("p2"))
    write_ndjson(
        tmp_path / "n" / "Patient.ndjson",
        [
            one + two,
            json.dumps(patient("p3")) + " trailing text",
            one + "," + two,
            json.dumps(patient("p4")) + "  ",
        ],
    )
    report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "n"))
    assert report.balanced and report.records_read == 4
    assert quarantine_reasons(lake) == {("Patient.ndjson", i): "malformed_json" for i in (1, 2, 3)}
    assert [r.id for r in lake.read("bronze.fhir_patient").collect()] == ["p4"]
    q = {r.record_index: r for r in opened(lake, "ops.quarantine").collect()}
    assert q[1].raw == one + two and q[1].message.startswith("more than one JSON value")
    write_json(
        tmp_path / "b" / "two.json", json.dumps(bundle([patient("p5")])) + json.dumps(bundle([patient("p6")]))
    )
    report = ingest.run(lake, SourceKind.FHIR_BUNDLES, str(tmp_path / "b"))
    assert report.balanced and report.total.quarantined == 1 and lake.row_count("bronze.fhir_patient") == 1


def test_rerun_adds_nothing_and_a_new_file_is_ingested_alone(lake, tmp_path):
    dump = tmp_path / "dump"
    write_ndjson(dump / "Patient.ndjson", [patient("p1"), patient("p2")])
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    version = lake.version("bronze.fhir_patient")
    again = ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    assert again.files_new == 0 and again.records_read == 0
    assert lake.version("bronze.fhir_patient") == version and lake.row_count("bronze.fhir_patient") == 2
    write_ndjson(
        dump / "Patient.later.ndjson",
        [patient("p3"), patient("p1", version="2", family="Iyer"), patient("p2", version="1")],
    )
    third = ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    assert third.files_new == 1 and third.records_read == 3
    counts = third.entities["bronze.fhir_patient"]
    assert (counts.inserted, counts.updated, counts.unchanged) == (1, 1, 1)
    got = {r.id: (r.version_id, r.family_name) for r in opened(lake, "bronze.fhir_patient").collect()}
    assert got == {"p1": ("2", "Iyer"), "p2": ("1", "Rao"), "p3": ("1", "Rao")}


def test_older_version_never_replaces_newer_and_duplicates_in_one_batch_keep_newest(lake, tmp_path):
    dump = tmp_path / "dump"
    write_ndjson(
        dump / "a.ndjson",
        [patient("p1", version="3", family="New"), patient("p1", version="2", family="Old")],
    )
    first = ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    assert first.entities["bronze.fhir_patient"].duplicate == 1
    write_ndjson(dump / "b.ndjson", [patient("p1", version="1", family="Oldest")])
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    assert [(r.version_id, r.family_name) for r in opened(lake, "bronze.fhir_patient").collect()] == [
        ("3", "New")
    ]


def test_missing_input_is_a_clear_error(lake, tmp_path):
    with pytest.raises(EnvironmentProblem, match="does not exist"):
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnvironmentProblem, match="no fhir-ndjson files"):
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "empty"))


def test_files_that_cannot_be_read_are_quarantined_by_name_and_the_rest_loads(lake, tmp_path):
    """A .gz that is not gzip, one cut short, a dangling link: each is a quarantine row
    (``unreadable_file``, record_index -1) naming what went wrong; the lines before a cut load, and
    a link leading out of the input folder is skipped (and named) unless asked for."""
    import gzip
    import os

    dump = tmp_path / "dump"
    write_ndjson(dump / "good.ndjson", [patient("g1"), patient("g2")])
    (dump / "plain.ndjson.gz").write_bytes(json.dumps(patient("x1")).encode())  # named .gz, not gzip
    lines = "".join(json.dumps(patient(f"c{i}", family=f"Rao{i:05d}")) + "\n" for i in range(3000))
    packed = gzip.compress(lines.encode(), compresslevel=1)
    (dump / "cut.ndjson.gz").write_bytes(packed[: len(packed) * 2 // 3])
    os.symlink(dump / "deleted.ndjson", dump / "dangling.ndjson")  # its target was removed
    write_ndjson(tmp_path / "elsewhere" / "other.ndjson", [patient("o1")])
    os.symlink(tmp_path / "elsewhere" / "other.ndjson", dump / "outside.ndjson")

    report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump))
    assert report.balanced
    q = {r.source_file.split("/")[-1]: r for r in lake.read("ops.quarantine").collect()}
    assert {name: (r.record_index, r.reason) for name, r in q.items()} == {
        "plain.ndjson.gz": (-1, "unreadable_file"),
        "cut.ndjson.gz": (-1, "unreadable_file"),
        "dangling.ndjson": (-1, "unreadable_file"),
    }
    assert q["plain.ndjson.gz"].message == "not a gzip file"
    assert q["dangling.ndjson"].message == "file not found (a dangling link?)"
    assert q["cut.ndjson.gz"].message.startswith("compressed stream cut short after line ")
    read_before_cut = int(q["cut.ndjson.gz"].message.rsplit(" ", 1)[1])
    assert 0 < read_before_cut < 3000
    ids = {r.id for r in lake.read("bronze.fhir_patient").collect()}
    assert ids == {"g1", "g2"} | {f"c{i}" for i in range(read_before_cut)}
    text = report.format()
    assert "not followed (--follow-links to read them): outside.ndjson" in text
    assert "could not be read (quarantined): cut.ndjson.gz, dangling.ndjson, plain.ndjson.gz" in text
    followed = ingest.run(lake, SourceKind.FHIR_NDJSON, str(dump), follow_links=True)
    assert followed.files_new == 1 and lake.read("bronze.fhir_patient").where("id = 'o1'").count() == 1


def test_a_bundle_file_cut_short_is_quarantined_and_other_bundles_load(lake, tmp_path):
    import gzip

    write_json(tmp_path / "b" / "good.json", bundle([patient("p1")]))
    packed = gzip.compress(json.dumps(bundle([patient(f"q{i}") for i in range(50)])).encode())
    (tmp_path / "b" / "cut.json.gz").write_bytes(packed[: len(packed) // 2])
    report = ingest.run(lake, SourceKind.FHIR_BUNDLES, str(tmp_path / "b"))
    assert report.balanced and quarantine_reasons(lake) == {("cut.json.gz", -1): "unreadable_file"}
    assert [r.id for r in lake.read("bronze.fhir_patient").collect()] == ["p1"]


@pytest.mark.parametrize("name", ["../outside", "a|b", "", "x/y", ".hidden", "a" * 65, "ok..no"])
def test_an_unsafe_source_system_is_refused_before_anything_is_written(lake, tmp_path, name):
    from ehrlake.errors import ConfigError

    write_ndjson(tmp_path / "Patient.ndjson", [patient("p1")])
    with pytest.raises(ConfigError, match="not a safe name"):
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path), source_system=name)
    assert not os.path.exists(lake.root) or not os.listdir(lake.root)


def test_a_bundle_exported_as_an_ndjson_line_has_its_entries_loaded(lake, tmp_path):
    """A Bundle on an NDJSON line used to land whole as one fhir_other row, its resources unread."""
    packed = bundle([patient("p2"), patient("p3"), condition("c1", "p2")], kind="collection")
    write_ndjson(tmp_path / "mixed.ndjson", [patient("p1"), {**packed, "id": "b1"}, patient("p4")])
    report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "mixed.ndjson"))
    assert report.balanced and report.records_read == 5 and report.total.quarantined == 0
    got = {r.id: r.record_index for r in lake.read("bronze.fhir_patient").collect()}
    assert got == {"p1": 1, "p2": 2_000_001, "p3": 2_000_002, "p4": 3}
    assert lake.read("bronze.fhir_condition").first().patient_id == "p2"
    assert not lake.exists("bronze.fhir_other")


def test_json_nested_too_deep_is_quarantined_as_too_deep(lake, tmp_path):
    deep = '{"resourceType": "Patient", "id": "d1", "extension": ' + "[" * 10_000 + "]" * 10_000 + "}"
    write_ndjson(tmp_path / "deep.ndjson", [deep, patient("p1"), '{"resourceType": "Patient", "id": '])
    report = ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "deep.ndjson"))
    assert report.balanced
    assert quarantine_reasons(lake) == {("deep.ndjson", 1): "too_deep", ("deep.ndjson", 3): "malformed_json"}


def test_records_spread_over_partitions_by_input_size(spark):
    """A small export is typed in one partition per core (every task reads a view's large plan, so
    eight tasks for a few records cost more than they share); a large one in the shuffle partitions;
    a gzipped file counts as the JSON it unpacks to."""
    from ehrlake.ingest.adapters import BYTES_PER_PARTITION, GZIP_RATIO, record_partitions
    from ehrlake.ingest.sources import InputFile

    most = int(spark.conf.get("spark.sql.shuffle.partitions"))
    cores = min(most, spark.sparkContext.defaultParallelism)
    assert most > cores  # the test's session: 4 partitions, 2 cores
    small = [InputFile("/x/Patient.ndjson", 2_000_000, 0)]
    large = [InputFile(f"/x/{i}.ndjson", BYTES_PER_PARTITION, 0) for i in range(most + 5)]
    assert record_partitions(spark, small) == cores
    assert record_partitions(spark, large) == most
    three = [InputFile("/x/Observation.ndjson", 3 * BYTES_PER_PARTITION, 0)]
    assert record_partitions(spark, three) == min(most, max(cores, 3))
    packed = [InputFile("/x/Observation.ndjson.gz", BYTES_PER_PARTITION // GZIP_RATIO * 3, 0)]
    assert record_partitions(spark, packed) == record_partitions(spark, three)
