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


def test_tolerant_mode_evaluates_each_columns_path_once(spark):
    """Listing a column's problem beside its value must not evaluate its path a second time (Spark
    never shares a higher-order function between two uses): ingest types every FHIR record so."""
    view = views.parse(
        {
            "resource": "Goal",
            "select": [
                {
                    "column": [
                        {"name": "id", "path": "getResourceKey()"},
                        {"name": "achievement", "path": "achievementStatus.coding.first().code"},
                        {"name": "start", "path": "start.ofType(date)", "type": "date"},
                    ]
                }
            ],
        }
    )
    frame = _frame(
        spark, {"resourceType": "Goal", "id": "g", "achievementStatus": {"coding": [{"code": "x"}]}}
    )

    def lookups(tolerant: bool) -> int:
        plan = views.run(view, frame, tolerant=tolerant)._jdf.queryExecution().optimizedPlan().toString()
        return plan.count("$.achievementStatus")

    assert lookups(tolerant=True) == lookups(tolerant=False) > 0
    assert views.run(view, frame, tolerant=True).collect()[0]["achievement"] == "x"


def test_a_member_path_is_one_deep_lookup_that_falls_back_step_by_step(spark):
    """``code.coding.first().code`` reads ``$.code.coding[0].code`` in one lookup; where that finds
    nothing (an array on the way, a drifted shape, the first item lacking the field) the steps are
    walked one by one, so the result is FHIRPath's in every case."""
    view = views.parse(
        {
            "resource": "Observation",
            "select": [
                {
                    "column": [
                        {"name": "id", "path": "getResourceKey()"},
                        {"name": "code", "path": "code.coding.first().code"},
                        {"name": "category", "path": "category.first().coding.first().code"},
                        {"name": "all_categories", "path": "category.coding.code", "collection": True},
                        {"name": "unit", "path": "value.ofType(Quantity).unit"},
                    ]
                },
                {"forEach": "component", "column": [{"name": "part", "path": "code.coding.first().code"}]},
            ],
        }
    )
    concept = {"coding": [{"code": "a"}, {"code": "z"}]}
    frame = _frame(
        spark,
        {  # R4 shapes: every lookup finds its value at once
            "resourceType": "Observation", "id": "r4", "code": concept,
            "category": [{"coding": [{"code": "c1"}, {"code": "c2"}]}, {"coding": [{"code": "c3"}]}],
            "valueQuantity": {"unit": "mg"}, "component": [{"code": concept}, {"code": {"coding": [{"code": "b"}]}}],
        },
        {  # a concept as an array, a coding as an object, the first category without a coding
            "resourceType": "Observation", "id": "drifted", "code": [{"coding": [{"code": "a"}]}],
            "category": [{"text": "no coding"}, {"coding": {"code": "c3"}}],
            "component": [{"code": {"coding": {"code": "b"}}}],
        },
    )  # fmt: skip
    rows = {r["id"]: r for r in views.run(view, frame).collect()}
    assert [(rows["r4"]["code"], rows["r4"]["category"], rows["r4"]["unit"])] == [("a", "c1", "mg")]
    assert list(rows["r4"]["all_categories"]) == ["c1", "c2", "c3"]
    assert [r["part"] for r in views.run(view, frame).where("id = 'r4'").collect()] == ["a", "b"]
    drifted = rows["drifted"]
    assert (drifted["code"], drifted["category"], drifted["unit"]) == ("a", None, None)
    assert list(drifted["all_categories"]) == ["c3"] and drifted["part"] == "b"
    plan = views.run(view, frame)._jdf.queryExecution().analyzed().toString()
    assert "$.code.coding[0].code" in plan and "$.category[0].coding[0].code" in plan


def test_view_expressions_are_sql_text_that_spark_reads_back_exactly(spark):
    """Views compile to SQL text (no JVM round trip per function): every literal a view can hold
    reads back as the same value, and a lambda inside a lambda keeps its own variables."""
    from ehrlake.views import sqltext as S

    values = ["O'Brien", "back\\slash \\d+ $", 'quote " and `tick`', "line\nbreak", "", "ünïcode ✓"]
    values += [0, -7, 2**40, 1.5, -2.5e-07, True, False, None]
    row = spark.range(1).select(*[S.column(S.lit(v)).alias(f"c{i}") for i, v in enumerate(values)]).first()
    assert list(row) == values
    nested = S.transform(
        S.array(S.lit(1), S.lit(2)), lambda x: S.transform(S.array(S.lit(10)), lambda y: x + y)
    )
    assert spark.range(1).select(S.column(nested)).first()[0] == [[11], [12]]


def test_the_conformance_report_in_the_docs_is_current():
    """docs/sql_on_fhir.md shows what the cases above assert (regenerate: scripts/sql_on_fhir_report.py)."""
    import importlib.util

    from conftest import REPO

    shared("sql_on_fhir_v2_tests")
    spec = importlib.util.spec_from_file_location("report", REPO / "scripts" / "sql_on_fhir_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    doc = report.DOC.read_text()
    expected = report.replace_results(doc, conformance.render_markdown(conformance.expected_results(SUITE)))
    assert doc == expected, "docs/sql_on_fhir.md is stale: run scripts/sql_on_fhir_report.py"


def test_cli_view_run_on_files_and_on_a_lake_table(lake, capsys, tmp_path):
    """``ehrlake view run``: flatten FHIR files straight away, or re-flatten sealed records of a
    lake table into a new table (a job: the write is audited, sealed-tagged columns stay sealed)."""
    from fhir_fixtures import bundle, patient, write_json

    from ehrlake import cli, ingest
    from ehrlake.ingest import SourceKind

    flag = {"resourceType": "Flag", "id": "f1", "status": "active", "subject": {"reference": "Patient/p1"},
            "code": {"text": "fall risk"}}  # fmt: skip
    write_json(tmp_path / "in" / "b.json", bundle([patient("p1"), flag]))
    view = tmp_path / "flag.json"
    view.write_text(json.dumps({
        "resourceType": "ViewDefinition", "name": "flag", "resource": "Flag",
        "select": [{"column": [
            {"name": "id", "path": "getResourceKey()"},
            {"name": "patient_id", "path": "subject.getReferenceKey(Patient)"},
            {"name": "status", "path": "status"},
            {"name": "what", "path": "code.text", "tag": [{"name": "ehrlake/sealed", "value": "identifier"}]},
        ]}],
    }))  # fmt: skip
    args = ["view", "run", "--view", str(view), "--lake", lake.root]
    assert cli.main([*args, "--input", str(tmp_path / "in"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [{"id": "f1", "patient_id": "p1", "status": "active", "what": "fall risk"}]

    ingest.run(lake, SourceKind.FHIR_BUNDLES, str(tmp_path / "in"))  # Flag has no bronze view: fhir_other
    assert cli.main([*args, "--table", "bronze.fhir_other", "--out", "silver.flags"]) == 0
    stored = lake.read("silver.flags").collect()
    assert [(r.id, r.status) for r in stored] == [("f1", "active")]
    assert stored[0].what != "fall risk" and stored[0].patient_key  # sealed; linked by patient_key
    events = lake.read("audit.events").where("job = 'view'").collect()
    assert any(e.table_name == "silver.flags" for e in events)
    assert [e.detail for e in events if e.table_name == "silver.flags" and e.detail] == [
        "view flag over bronze.fhir_other: 1 rows"
    ]  # the rows written, as the table holds them
    assert cli.main([*args, "--table", "bronze.fhir_other"]) == 1  # sealed records need --out
    # a job reads each record's processing copy: a view asking for names gets none
    people = tmp_path / "people.json"
    people.write_text(json.dumps({
        "resourceType": "ViewDefinition", "name": "people", "resource": "Patient",
        "select": [{"column": [
            {"name": "id", "path": "getResourceKey()"},
            {"name": "gender", "path": "gender"},
            {"name": "family", "path": "name.family.first()"},
            {"name": "phone", "path": "telecom.value.first()"},
        ]}],
    }))  # fmt: skip
    view_args = ["view", "run", "--view", str(people), "--lake", lake.root]
    assert cli.main([*view_args, "--table", "bronze.fhir_patient", "--out", "silver.people"]) == 0
    assert [
        r.asDict() for r in lake.read("silver.people").select("id", "gender", "family", "phone").collect()
    ] == [{"id": "p1", "gender": "female", "family": None, "phone": None}]
