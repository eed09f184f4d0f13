"""SQL on FHIR v2: the official conformance suite case by case, and the runner's own guarantees."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, shared

from ehrlake import views
from ehrlake.views import conformance

SUITE = SHARED_DATA / "sql_on_fhir_v2_tests"
CASES = conformance.cases(SUITE) if SUITE.exists() else []


@pytest.mark.parametrize("file,suite,case", CASES, ids=[f"{f}::{c['title']}" for f, _, c in CASES] or None)
def test_official_conformance_case(spark, file, suite, case):
    result = conformance.run_case(spark, suite, case, file)
    if (file, case["title"]) in conformance.UNSUPPORTED:
        assert result.outcome == "failed", "listed as unsupported but passes: remove it from UNSUPPORTED"
        assert "experimental" in result.tags, "only optional features may be unsupported"
    else:
        assert result.outcome == "passed", result.detail


def test_the_suite_is_all_there():
    shared("sql_on_fhir_v2_tests")
    assert len(CASES) == 134
    assert sum("shareable" in (c.get("tags") or ()) for _, _, c in CASES) == 123


def _frame(spark, *resources):
    return spark.createDataFrame([(json.dumps(r),) for r in resources], "resource string")


@pytest.mark.parametrize(
    "view,problem",
    [
        ({"select": [{"column": [{"name": "id", "path": "id"}]}]}, "resource type"),
        (
            {"resource": "Patient", "select": [{"column": [{"name": "x", "path": "name.("}]}]},
            "select[0].column[0].x",
        ),
        ({"resource": "Patient", "select": [{"forEach": 1}]}, "select[0].forEach"),
        ({"resource": "Patient", "select": [{"column": [{"name": "x", "path": "%nope"}]}]}, "%nope"),
        (
            {
                "resource": "Patient",
                "select": [{"column": [{"name": "x", "path": "id"}, {"name": "x", "path": "id"}]}],
            },
            "used twice",
        ),
    ],
)
def test_invalid_views_are_rejected_with_the_part_named(view, problem):
    with pytest.raises(
        views.ViewError, match=problem.replace("(", r"\(").replace("[", r"\[").replace("%", "%")
    ):
        views.parse(view)


def test_strict_mode_fails_on_several_values_for_a_single_column(spark):
    view = views.parse(
        {"resource": "Patient", "select": [{"column": [{"name": "family", "path": "name.family"}]}]}
    )
    frame = _frame(spark, {"resourceType": "Patient", "id": "p", "name": [{"family": "A"}, {"family": "B"}]})
    with pytest.raises(Exception, match="collection: true"):
        views.run(view, frame).collect()


def test_tolerant_mode_reads_drifted_records_and_lists_the_problems(spark):
    """An early-R4 / STU3 Condition: string statuses, ``context`` for ``encounter``, a number where a
    date belongs. Tolerant mode reads what it can as R4 and names every problem without its value."""
    from ehrlake.views.compiler import Drift

    view = views.parse(
        {
            "resource": "Condition",
            "select": [
                {
                    "column": [
                        {"name": "id", "path": "getResourceKey()"},
                        {"name": "clinical_status", "path": "clinicalStatus.coding.code.first()"},
                        {"name": "encounter_id", "path": "encounter.getReferenceKey()"},
                        {
                            "name": "onset_at",
                            "path": "onset.ofType(dateTime)",
                            "tag": [{"name": "ansi/type", "value": "TIMESTAMP"}],
                        },
                    ]
                }
            ],
        }
    )
    drift = Drift({"encounter": ("context",)}, ("clinicalStatus",))
    frame = _frame(
        spark,
        {"resourceType": "Condition", "id": "c1", "clinicalStatus": "active", "context": {"reference": "Encounter/e1"},
         "onsetDateTime": "2019-02-30T99"},
        {"resourceType": "Condition", "id": "c2", "clinicalStatus": {"coding": [{"code": "resolved"}]},
         "encounter": {"reference": "urn:uuid:e2"}, "onsetDateTime": "2019-03-01"},
    )  # fmt: skip
    rows = {r["id"]: r for r in views.run(view, frame, tolerant=True, drift=drift).collect()}
    assert rows["c1"]["clinical_status"] == "active" and rows["c1"]["encounter_id"] == "e1"
    assert rows["c1"]["onset_at"] is None
    issues = rows["c1"][views.ISSUES]
    assert any(i.startswith("context: read as encounter") for i in issues)
    assert any(i.startswith("clinicalStatus: a string") for i in issues)
    assert any(i.startswith("onset_at (onset.ofType(dateTime))") for i in issues)
    assert not any("2019-02-30" in i for i in issues), "problems never quote values"
    assert rows["c2"]["clinical_status"] == "resolved" and rows["c2"]["encounter_id"] == "e2"
    assert rows["c2"][views.ISSUES] == []
