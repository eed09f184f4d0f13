"""Synthea CSV ingest: version drift between exports, typing, quarantine of bad rows."""

from __future__ import annotations

import gzip
import shutil

from conftest import SAMPLE, opened, shared

from ehrlake import ingest
from ehrlake.ingest import SourceKind

V3_PATIENTS = (
    "Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,MIDDLE,LAST,SUFFIX,MAIDEN,MARITAL,RACE,ETHNICITY,"
    "GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,FIPS,ZIP,LAT,LON,HEALTHCARE_EXPENSES,HEALTHCARE_COVERAGE,INCOME"
)


def test_all_shared_synthea_versions_load_with_expected_counts(lake):
    root = shared("synthea_csv")
    report = ingest.run(lake, SourceKind.SYNTHEA_CSV, str(root))
    assert report.balanced and report.total.quarantined == 0
    # independent count: data lines of every patients file (header excluded)
    expected = sum(
        len([ln for ln in gzip.open(p, "rt").read().splitlines()[1:] if ln.strip()])
        for p in root.glob("*/patients.csv.gz")
    )
    assert expected == 215 and lake.row_count("bronze.synthea_patients") == 215
    incomes = opened(lake, "bronze.synthea_patients").where("income IS NOT NULL").count()
    assert incomes == 107  # only the ablack3 export has INCOME
    enc = lake.read("bronze.synthea_encounters").first()
    assert enc.start is not None and isinstance(enc.base_encounter_cost, float)


def test_newer_and_older_headers_map_by_name_and_bad_rows_are_quarantined(lake, tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    (src / "patients.csv").write_text(
        V3_PATIENTS + "\n"
        "p1,1980-02-03,,999-1,,,Mr.,Ravi,K,Kumar,,,M,asian,nonhispanic,M,Pune,1 MG Rd,Pune,MH,,27001,411001,18.5,73.8,100.5,20,50000\n"
        "p2,03/02/1980,,999-2,,,Mr.,Amit,,Shah,,,M,asian,nonhispanic,M,Pune,2 MG Rd,Pune,MH,,27001,411001,18.5,73.8,1,2,3\n"
        "p3,1990-01-01,,999-3\n"
        ",1990-01-01,,999-4,,,,A,,B,,,,,,F,,,,,,,,,,1,2,3\n"
    )
    # Synthea 2.x procedures: DATE instead of START/STOP, no SYSTEM column
    (src / "procedures.csv").write_text(
        "DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST,REASONCODE,REASONDESCRIPTION\n"
        "2019-02-17T05:07:38Z,p1,e1,430193006,Medication Reconciliation,451.0,,\n"
        "2019-02-17T05:07:38Z,p1,e1,430193006,Medication Reconciliation,not-a-number,,\n"
    )
    (src / "mystery.csv").write_text("A,B\n1,2\n")
    report = ingest.run(lake, SourceKind.SYNTHEA_CSV, str(src))
    assert report.balanced and report.records_read == 7
    p1 = opened(lake, "bronze.synthea_patients").first()
    assert (p1.id, p1.middle, p1.fips, p1.income, str(p1.birthdate)) == (
        "p1",
        "K",
        "27001",
        50000.0,
        "1980-02-03",
    )
    proc = lake.read("bronze.synthea_procedures").first()
    assert str(proc.start) == "2019-02-17 05:07:38" and proc.system is None and proc.base_cost == 451.0
    reasons = {
        (r.source_file.rsplit("/", 1)[-1], r.record_index): r.reason
        for r in opened(lake, "ops.quarantine").collect()
    }
    assert reasons == {
        ("patients.csv", 3): "unparseable_date",
        ("patients.csv", 4): "wrong_field_count",
        ("patients.csv", 5): "missing_id",
        ("procedures.csv", 3): "unparseable_number",
        ("mystery.csv", 2): "unknown_table",
    }


def test_identical_rows_without_id_are_kept_apart_and_rerun_under_new_name_adds_nothing(lake, tmp_path):
    src = tmp_path / "export"
    src.mkdir()
    line = "2020-01-01,p1,e1,123,Thing\n"
    (src / "conditions.csv").write_text("START,PATIENT,ENCOUNTER,CODE,DESCRIPTION\n" + line + line)
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(src))
    assert lake.row_count("bronze.synthea_conditions") == 2  # two real events, not duplicates
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(src / "conditions.csv", copy / "conditions.csv")
    report = ingest.run(lake, SourceKind.SYNTHEA_CSV, str(copy))
    assert report.entities["bronze.synthea_conditions"].unchanged == 2
    assert lake.row_count("bronze.synthea_conditions") == 2


def test_a_dirty_export_loads_what_it_can_and_says_what_it_tolerated(lake, tmp_path):
    """A real Synthea export, made dirty the way one in the field was: three 0-byte gzip files, a
    header-only file, one encounters line spliced into another and one truncated, a condition of a
    patient the export does not have, and a file whose header line is blank."""
    src = tmp_path / "dirty"
    shutil.copytree(shared("synthea_csv", "dehall_v3_2023_22p"), src)
    for name in ("organizations", "providers", "payers"):
        (src / f"{name}.csv.gz").write_bytes(b"")  # 0 bytes: not even a gzip header
    header = gzip.open(src / "devices.csv.gz", "rt").readline()
    with gzip.open(src / "devices.csv.gz", "wt") as out:
        out.write(header)
    lines = gzip.open(src / "encounters.csv.gz", "rt").read().split("\n")
    good_encounters = len([ln for ln in lines[1:] if ln.strip()])
    lines[4] = lines[4][:40] + lines[5]  # spliced: too many fields
    del lines[5]
    lines[9] = lines[9][:30]  # truncated: too few
    with gzip.open(src / "encounters.csv.gz", "wt") as out:
        out.write("\n".join(lines))
    conditions = gzip.open(src / "conditions.csv.gz", "rt").read().split("\n")
    orphan = conditions[1].split(",")
    orphan[2] = "00000000-dead-beef-0000-000000000000"  # PATIENT: not in patients.csv
    conditions.insert(2, ",".join(orphan))
    with gzip.open(src / "conditions.csv.gz", "wt") as out:
        out.write("\n".join(conditions))
    (src / "supplies.csv").write_text("\n2020-01-01,p,e,1,x,1\n")  # blank header line
    (src / "supplies.csv.gz").unlink()

    report = ingest.run(lake, SourceKind.SYNTHEA_CSV, str(src))
    assert report.balanced
    enc = report.entities["bronze.synthea_encounters"]
    assert enc.quarantined == 2 and enc.inserted == good_encounters - 3  # 2 bad lines from 3 good ones
    assert lake.row_count("bronze.synthea_conditions") == len([c for c in conditions[1:] if c.strip()])
    assert report.empty_files == [
        "devices.csv.gz", "organizations.csv.gz", "payers.csv.gz", "providers.csv.gz"
    ]  # fmt: skip
    reasons = {
        (r.source_file.rsplit("/", 1)[-1], r.reason)
        for r in lake.read("ops.quarantine").select("source_file", "reason").collect()
    }
    assert reasons == {("encounters.csv.gz", "wrong_field_count"), ("supplies.csv", "missing_header")}
    assert any("without a single record" in n for n in report.notes)
    assert "note: file(s) without a single record" in report.format()


def test_a_csv_file_that_cannot_be_read_is_quarantined_by_name_and_the_rest_loads(lake, tmp_path):
    (tmp_path / "x").mkdir()
    patients = gzip.decompress(
        (SAMPLE / "synthea_csv" / "ohdsi_dbt_synthea_27p" / "patients.csv.gz").read_bytes()
    ).decode()
    (tmp_path / "x" / "patients.csv").write_text(patients)
    (tmp_path / "x" / "conditions.csv.gz").write_bytes(b"START,STOP,PATIENT\n")  # named .gz, not gzip
    report = ingest.run(lake, SourceKind.SYNTHEA_CSV, str(tmp_path / "x"))
    assert report.balanced and lake.row_count("bronze.synthea_patients") == len(patients.splitlines()) - 1
    rows = [r for r in opened(lake, "ops.quarantine").collect()]
    assert [(r.source_file.split("/")[-1], r.record_index, r.entity, r.reason, r.message) for r in rows] == [
        ("conditions.csv.gz", -1, "bronze.synthea_conditions", "unreadable_file", "not a gzip file")
    ]
    assert report.entities["bronze.synthea_conditions"].quarantined == 1
    assert "could not be read (quarantined): conditions.csv.gz" in report.format()


def test_identical_lines_are_numbered_the_same_by_the_broadcast_split_and_by_the_window(spark, monkeypatch):
    """``lineage.numbered`` sorts only repeated lines (few: a broadcast split; very many: every row
    through the window); both give each line its place among identical lines of its file."""
    from ehrlake.ingest import lineage

    rows = [("a.csv", 1, "x"), ("a.csv", 2, "y"), ("a.csv", 3, "x"), ("b.csv", 1, "x"), ("a.csv", 4, "x")]
    frame = spark.createDataFrame(rows, "source_file string, record_index long, text string")

    def places():
        out = lineage.numbered(frame, ["source_file", "text"], "place")
        return sorted((r["source_file"], r["record_index"], r["place"]) for r in out.collect())

    expected = [("a.csv", 1, 1), ("a.csv", 2, 1), ("a.csv", 3, 2), ("a.csv", 4, 3), ("b.csv", 1, 1)]
    assert places() == expected
    monkeypatch.setattr(lineage, "BROADCAST_REPEATS", 0)  # too many repeats to broadcast
    assert places() == expected
    unique = spark.createDataFrame(rows[:2], "source_file string, record_index long, text string")
    assert {r["place"] for r in lineage.numbered(unique, ["source_file", "text"], "place").collect()} == {1}
