"""Data-quality checks and the readiness scorecard on hand-made silver data with known answers."""

from __future__ import annotations

import pytest
from test_clean import TODAY, silver  # noqa: F401 - the fixture

from ehrlake import quality
from ehrlake.errors import ConfigError
from ehrlake.quality import checks, readiness


def test_at_least_thirty_checks_in_every_category():
    loaded = checks.load()
    assert len(loaded) >= 30
    assert {c.category for c in loaded} == {"completeness", "conformance", "plausibility"}


def test_check_results_count_the_rows_that_fail(silver):  # noqa: F811
    lake, _ = silver
    summary = quality.run(lake, today=TODAY, run_id="r1")
    results = {r.check_id: r for r in lake.read("gold.dq_results").where("run_id = 'r1'").collect()}
    assert summary["results"] == len(results)
    before_birth = results["condition_not_before_birth"]
    assert (before_birth.rows_checked, before_birth.rows_failed, before_birth.passed) == (4, 1, False)
    assert (results["condition_patient_linked"].rows_failed, results["condition_not_future"].rows_failed) == (
        1,
        1,
    )
    assert (
        results["observation_value_plausible"].rows_checked,
        results["observation_value_plausible"].rows_failed,
    ) == (7, 1)  # weight, heart rate (400: implausible), glucose; a blood pressure panel and its 3 components
    assert results["encounter_end_after_start"].rows_failed == 1 and results["patient_key_unique"].passed
    assert (
        results["condition_snomed_code_format"].rows_checked == 4
        and results["condition_snomed_code_format"].passed
    )
    quality.run(lake, today=TODAY, run_id="r1")  # re-running a run replaces its rows
    assert lake.read("gold.dq_results").where("run_id = 'r1'").count() == len(results)


@pytest.mark.parametrize(
    "fields, where, expected",
    [
        (("patient_key",), None, {"a": (3, 3), "b": (2, 1)}),
        (("patient_key",), "gender = 'female'", {"a": (2, 2), "b": (1, 0)}),
        (("source_system", "patient_key"), None, {"a": (3, 2), "b": (2, 0)}),  # p2 once in each source
    ],
)
@pytest.mark.parametrize("hashes", ["distinct", "all the same"])
def test_a_key_held_twice_fails_every_row_holding_it_in_every_source(
    spark, monkeypatch, fields, where, expected, hashes
):
    """A uniqueness check counts, per source, the rows with a complete key that ``where`` applies
    to, and fails those whose key another row holds too (in any source, whatever ``where`` says
    of that row); a row without its key is not checked. A key may name the source itself. Keys are
    counted by their hash first: where every key has the same hash, the answer is the same."""
    from pyspark.sql import functions as F

    if hashes == "all the same":
        monkeypatch.setattr(checks, "key_hash", lambda *columns: F.lit(7).cast("long"))
    rows = [("a", "p1", "female"), ("a", "p1", "male"), ("a", "p2", "female"), ("b", "p2", "male"),
            ("b", "p3", "female"), ("b", None, "female")]  # fmt: skip
    df = spark.createDataFrame(rows, "source_system string, patient_key string, gender string")
    check = checks.Check(id="u", table="patient", field="patient_key", type="unique", fields=fields,
                         where=where, category="conformance")  # fmt: skip
    counted = {r.source_system: (r.checked, r.failed) for r in checks._duplicates(df, check).collect()}
    assert counted == expected


def test_readiness_score_is_the_documented_weighted_mean(silver):  # noqa: F811
    lake, _ = silver
    quality.run(lake, today=TODAY, run_id="r2")
    results = lake.read("gold.dq_results").where("run_id = 'r2'").collect()
    row = lake.read("gold.readiness").where("level = 'source' AND name = 'local'").first()

    def mean(rows):
        return sum(1 - r.failed_share for r in rows) / len(rows)

    expected = {
        "completeness": mean([r for r in results if r.category == "completeness"]),
        "conformance": mean(
            [
                r
                for r in results
                if r.category == "conformance" and r.check_type not in ("references", "unique")
            ]
        ),
        "plausibility": mean([r for r in results if r.category == "plausibility"]),
        "duplication": mean([r for r in results if r.check_type == "unique"]),
        "linkage": mean([r for r in results if r.check_type == "references"]),
        "timeliness": 0.0,  # newest encounter 2020-03-09: more than five years before the run date
    }
    for part, value in expected.items():
        assert row[part] == pytest.approx(value), part
    score = 100 * sum(expected[p] * w for p, w in readiness.WEIGHTS.items())
    assert row.score == pytest.approx(round(score, 1))
    assert 0 <= row.score <= 100 and row.linkage < 1  # one event points at an unknown patient
    region = lake.read("gold.readiness").where("level = 'region'").collect()
    assert {r.name for r in region} == {"KA"} and region[0].duplication is None


def test_a_check_on_an_unknown_field_is_a_clear_error(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(
        "checks:\n  - {id: x, table: patient, field: shoe_size, type: not_null, category: completeness}\n"
    )
    with pytest.raises(ConfigError, match="patient.shoe_size is not a silver field"):
        checks.load(bad)


def test_a_misspelt_or_missing_check_parameter_is_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(
        "checks:\n  - {id: x, table: patient, field: gender, type: in_set, value: [f], category: completeness}\n"
    )
    with pytest.raises(ConfigError, match=r"unknown key .*check x\.value "):
        checks.load(bad)
    bad.write_text(
        "checks:\n  - {id: x, table: patient, field: birth_year, type: range, min: 1, category: plausibility}\n"
    )
    with pytest.raises(ConfigError, match="a range check needs 'max'"):
        checks.load(bad)
