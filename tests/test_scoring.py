"""Population scoring on a generated population: the production model scores every eligible
patient with band, reasons and model version; re-scoring a date replaces, never duplicates; the
schedule's own script runs it."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO, production

from ehrlake import clean, features, ingest, synth
from ehrlake.errors import EhrlakeError
from ehrlake.ingest import SourceKind
from ehrlake.models import evaluate, train

TASK = "mortality_12m"
AS_OF = dt.date(2022, 1, 1)


@pytest.fixture(scope="module")
def scored_lake(spark, tmp_path_factory, security_conf):
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    tmp = tmp_path_factory.mktemp("scoring")
    root = str(tmp / "lake")
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    synth.run(
        spark,
        1500,
        str(tmp / "population"),
        seed=3,
        tables=("encounters", "conditions", "observations", "medications"),
    )
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(tmp / "population"))
    clean.run(lake)
    features.run(lake, [dt.date(y, 1, 1) for y in range(2008, 2023)])
    models = train(lake, TASK, ("logreg",), grid="tiny", folds=2, bootstrap=100)
    # generated patients only, no sample patient to test on: split by template, and said so
    assert models[0].params["test_patients"] == "generated copies only"
    assert models[0].headline().endswith("on generated copies")
    return lake, models[0]


def test_scoring_needs_a_production_model(scored_lake):
    lake, _ = scored_lake
    with pytest.raises(EhrlakeError, match="no production model"):
        from ehrlake import scoring

        scoring.score(lake, "hypertension_onset_12m", AS_OF)


def test_scores_every_eligible_patient_once_with_reasons_and_version(scored_lake):
    from ehrlake import scoring

    lake, model = scored_lake
    production(lake, model)
    first = scoring.score(lake, TASK, AS_OF, role="scheduler")
    eligible = features.patient_features(lake, [AS_OF]).count()
    assert first.scored == eligible > 100
    rows = lake.read("gold.risk_scores").where(f"task = '{TASK}'").collect()
    assert len(rows) == eligible and len({r.patient_key for r in rows}) == eligible
    assert {r.model_id for r in rows} == {model.model_id} and {r.model_version for r in rows} == {
        model.version
    }
    assert {r.risk_band for r in rows} == {"low", "medium", "high"}
    assert all(0.0 <= r.score <= 1.0 and r.as_of == AS_OF for r in rows)
    high = [r for r in rows if r.risk_band == "high"]
    assert high and all(r.score >= model.bands["high"] for r in high)
    # one patient's explanation bands its score without a job: the same band, at the cut points too
    assert all(evaluate.band_of(r.score, model.bands) == r.risk_band for r in rows)
    assert [evaluate.band_of(model.bands[b], model.bands) for b in ("high", "medium")] == ["high", "medium"]
    with_reasons = [r for r in rows if r.top_reasons]
    assert len(with_reasons) > 0.5 * len(rows) and all(len(r.top_reasons) <= 3 for r in rows)
    assert all(" = " in reason and "(+" in reason for r in with_reasons for reason in r.top_reasons)
    # drift against the training snapshot: the score and every input, once per date
    from ehrlake.scoring import drift

    measured = {r.input: r for r in lake.read(drift.TABLE).collect()}
    assert set(measured) == {"score", *model.features} and "gold.model_drift" in first.drift
    assert all(r.psi >= 0 and r.status == drift.status(r.psi) and r.as_of == AS_OF for r in measured.values())
    assert {r.scored_rows for r in measured.values()} == {eligible}
    # re-scoring the same date replaces the rows
    again = scoring.score(lake, TASK, AS_OF, role="scheduler")
    assert again.scored == eligible and lake.read("gold.risk_scores").count() == eligible
    assert lake.read(drift.TABLE).count() == len(measured)


def test_results_export_as_valid_fhir_and_come_back_in_through_ingest(scored_lake, tmp_path, security_conf):
    """Every score a RiskAssessment (probability, band, the stored reasons, the model), every
    published aggregate table and year a MeasureReport whose suppressed counts are masked, never
    shown; each valid FHIR R4 (fhir.resources); the export, ingested as FHIR NDJSON, lands every
    resource; exporting again gives the same files."""
    from collections import Counter

    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    from ehrlake import config, fhir_export, scoring
    from ehrlake.eda import aggregates
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    lake, model = scored_lake
    if not lake.exists("gold.risk_scores"):  # this file's earlier test scores; alone, score here
        production(lake, model)
        scoring.score(lake, TASK, AS_OF)
    aggregates.run(lake)
    out = tmp_path / "fhir"
    done = fhir_export.run(lake, str(out), role="analyst")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["output"] == done.files and {f["type"] for f in done.files} == {
        "RiskAssessment",
        "MeasureReport",
    }
    resources = []
    for entry in manifest["output"]:
        lines = (out / entry["url"]).read_text().splitlines()
        assert len(lines) == entry["count"]
        for line in lines:
            get_fhir_model_class(entry["type"]).model_validate_json(line)  # raises on an invalid resource
            resources.append(json.loads(line))
    risks = [r for r in resources if r["resourceType"] == "RiskAssessment"]
    # not a check that cannot fail: the same validator refuses a risk assessment without its status
    with pytest.raises(ValidationError):
        get_fhir_model_class("RiskAssessment").model_validate(
            {k: v for k, v in risks[0].items() if k != "status"}
        )

    scores = {r.patient_key: r for r in lake.read("gold.risk_scores").collect()}
    assert len(risks) == len(scores) and len({r["id"] for r in risks}) == len(risks)
    for r in risks:
        s = scores[r["subject"]["reference"].removeprefix("Patient/")]
        prediction = r["prediction"][0]
        assert prediction["probabilityDecimal"] == pytest.approx(s.score, abs=1e-6)
        band = {"high": "high", "medium": "moderate", "low": "low"}[s.risk_band]
        assert prediction["qualitativeRisk"]["coding"][0]["code"] == band
        assert [b["display"] for b in r.get("basis", [])] == list(s.top_reasons or [])
        assert (
            r["method"]["coding"][0]["code"] == model.model_id
            and r["occurrenceDateTime"] == AS_OF.isoformat()
        )

    published = lake.read("gold.eda_demographics").collect()
    report = next(r for r in resources if r.get("measure") == fhir_export.MEASURE_BASE + "eda_demographics")
    strata = report["group"][0]["stratifier"][0]["stratum"]
    assert report["group"][0]["code"]["text"] == "persons" and len(strata) == len(published)
    masked = [s for s in strata if "count" not in s["population"][0]]
    assert len(masked) == sum(r.persons is None for r in published) > 0
    assert all(s["population"][0]["extension"][0]["valueCode"] == "masked" for s in masked)
    shown = sorted(s["population"][0]["count"] for s in strata if s not in masked)
    assert shown == sorted(r.persons for r in published if r.persons is not None)

    before = {f["url"]: (out / f["url"]).read_bytes() for f in done.files}
    again = fhir_export.run(lake, str(out), role="analyst")
    assert {f["url"]: (out / f["url"]).read_bytes() for f in again.files} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an export")
    with pytest.raises(EhrlakeError, match="holds no earlier export"):
        fhir_export.run(lake, str(tmp_path / "mine"))

    root = str(tmp_path / "back")
    back = Lake(root, lake.spark, security=Security.from_config(config.load(security_conf).security, root))
    landed = ingest.run(back, SourceKind.FHIR_NDJSON, str(out))
    expected = Counter()
    for f in done.files:
        expected[f["type"]] += f["count"]
    # no bronze view for either type: both land whole in bronze.fhir_other, none quarantined
    assert {e: (c.inserted, c.quarantined) for e, c in landed.entities.items()} == {
        "bronze.fhir_other": (sum(expected.values()), 0)
    }
    kept = back.read("bronze.fhir_other").groupBy("resource_type").count().collect()
    assert {r.resource_type: r["count"] for r in kept} == dict(expected)

    # the export back to the source system: its patients only, by their record ids there, for a role
    # that may reveal, with a purpose, audited; an analyst, or no purpose, is refused and audited
    from ehrlake.errors import AccessDenied

    ids_out = str(tmp_path / "ids")
    with pytest.raises(AccessDenied, match="may not release"):
        fhir_export.run(lake, ids_out, ("risk",), role="analyst", source_system="local", purpose="curious")
    with pytest.raises(AccessDenied, match="purpose"):
        fhir_export.run(lake, ids_out, ("risk",), role="clinician", source_system="local", purpose=" ")
    home = fhir_export.run(
        lake, ids_out, ("risk",), role="clinician", source_system="local", purpose="risks back to the record"
    )
    assert "local's record ids" in home.format()
    record_id = {
        r.patient_key: r.source_id for r in fhir_export.source_ids(lake, "local", "engineer").collect()
    }
    sent = [
        json.loads(line)
        for f in home.files
        for line in (tmp_path / "ids" / f["url"]).read_text().splitlines()
    ]
    expected_ids = {record_id[k] for k in scores if k in record_id}
    assert len(sent) == len(expected_ids) > 0
    assert {r["subject"]["identifier"]["value"] for r in sent} == expected_ids
    for r in sent:
        subject = r["subject"]
        assert subject["reference"] == "Patient/" + subject["identifier"]["value"]
        assert subject["identifier"]["system"] == "urn:ehrlake:source:local"
    get_fhir_model_class("RiskAssessment").model_validate(sent[0])
    events = lake.read("audit.events").where("action = 'export.source_ids'").collect()
    assert sorted(e.outcome for e in events) == ["allowed", "denied", "denied"]
    assert any(f"{len(sent):,} resources with record ids of local" in e.detail for e in events)


def test_scoring_queues_cases_and_a_clinicians_override_feeds_training(scored_lake):
    """Top-band patients and those near the high band's cut point are queued, once (re-scoring
    adds none); an analyst may not decide; a clinician's override is kept, audited and closes the
    case; the reviewed label replaces the computed one in training rows; the report shows the
    override rate; ``show --purpose`` reveals the patient's identity to a clinician only."""
    from ehrlake import review, scoring
    from ehrlake.eda import report
    from ehrlake.errors import AccessDenied
    from ehrlake.models.train import reviewed_labels

    lake, model = scored_lake
    if not lake.exists("gold.risk_scores"):  # this file's earlier tests promote; alone, here
        production(lake, model)
    run = scoring.score(lake, TASK, AS_OF, role="scheduler")
    dated = f"task = '{TASK}' AND as_of = DATE'{AS_OF}'"
    scores = {r.patient_key: r for r in lake.read("gold.risk_scores").where(dated).collect()}
    cut = model.bands["high"]
    high = {k for k, r in scores.items() if r.risk_band == "high"}
    ranked = sorted((r for r in scores.values() if r.score < cut), key=lambda r: (-r.score, r.patient_key))
    near = {r.patient_key for r in ranked[: math.ceil(review.rules().near_cut_share * len(scores))]}
    queue = lake.read(review.QUEUE).where(dated).collect()
    ruled = {c.patient_key for c in queue if c.rule in (review.TOP, review.NEAR)}
    assert len(queue) < review.rules().max_cases  # not capped: every selected patient is a case
    assert ruled == high | near and len(ruled) > len(high) > 0  # (a weak subgroup's cases: below)
    assert {c.patient_key for c in queue if c.rule == review.TOP} <= high
    assert {c.patient_key for c in queue if c.rule == review.NEAR} <= near
    assert "meet the review rules" in run.format()
    scoring.score(lake, TASK, AS_OF, role="scheduler")
    assert lake.read(review.QUEUE).where(dated).count() == len(queue)

    case = max((c for c in queue if c.rule == review.TOP), key=lambda c: c.score)
    with pytest.raises(AccessDenied):
        review.decide(lake, case.case_id, "analyst", "not at risk", override=0)
    with pytest.raises(AccessDenied):
        review.identity(lake, case.patient_key, "analyst", "curious")
    shown = review.identity(lake, case.patient_key, "clinician", "reviewing case before a call")
    assert shown and shown[0]["id"] and {"first", "last"} <= set(shown[0])
    assert review.decide(lake, case.case_id[:12], "clinician", "already in palliative care", 0) == (
        "override",
        0,
    )
    assert case.case_id not in {c.case_id for c in review.cases(lake, TASK, limit=1000, role="clinician")}
    decided = lake.read(review.DECISIONS).collect()
    assert [(d.patient_key, d.label, d.role, d.decision) for d in decided] == [
        (case.patient_key, 0, "clinician", "override")
    ]
    audited = lake.read("audit.events").where(f"table_name = '{review.DECISIONS}' AND action = 'write'")
    assert audited.count() == 1
    assert [(r.risk_band, r.rule, r.decided, r.overridden) for r in review.override_rates(lake)] == [
        ("high", review.TOP, 1, 1)
    ]
    assert "override rate" in report.review_section(lake)

    rows = lake.spark.createDataFrame(
        [(case.patient_key, AS_OF.isoformat(), 1), ("someone-else", AS_OF.isoformat(), 1)],
        "patient_key string, index_id string, label int",
    )
    relabelled, used = reviewed_labels(lake, TASK, rows)
    assert used == {"rows": 1, "changed": 1, "weight": review.rules().feedback_weight}
    assert {(r.patient_key, r.label, r._reviewed) for r in relabelled.collect()} == {
        (case.patient_key, 0, True),
        ("someone-else", 1, False),
    }


def test_a_challenger_that_calls_differently_and_a_weaker_subgroup_queue_cases(scored_lake):
    """The task's newest candidate is the challenger: every patient it puts on the other side of its
    cut from the production model is a case (one case per patient, under the first rule that took
    it); a subgroup whose test AUROC is far below overall has its near misses queued."""
    from pyspark.sql import functions as F

    from ehrlake import review, scoring
    from ehrlake.models.train import score_column

    lake, model = scored_lake
    if not lake.exists("gold.risk_scores"):
        production(lake, model)
    rival = train(lake, TASK, ("rf",), grid="tiny", folds=2, bootstrap=50)[0]
    assert rival.status == "candidate" and review.challenger(lake, model).label == rival.label
    as_of = dt.date(2021, 1, 1)
    scoring.score(lake, TASK, as_of, role="scheduler")
    dated = f"task = '{TASK}' AND as_of = DATE'{as_of}'"
    queue = lake.read(review.QUEUE).where(dated).collect()
    scored = {r.patient_key for r in lake.read("gold.risk_scores").where(dated).collect()}

    population = features.patient_features(lake, [as_of])

    def high(mv):
        out = (
            mv.load(lake)
            .transform(population)
            .withColumn("s", score_column(mv.params.get("pos_weight", 1.0)))
        )
        return {
            r.patient_key: r.b == "high"
            for r in out.select("patient_key", evaluate.risk_band(F.col("s"), mv.bands).alias("b")).collect()
        }

    ours, theirs = high(model), high(rival)
    differ = {k for k in scored if ours[k] != theirs[k]}
    taken = {c.patient_key for c in queue if c.rule in (review.TOP, review.NEAR)}
    flagged = {c.patient_key for c in queue if c.rule.startswith("production and challenger disagree")}
    assert differ, "the two learners agree on everyone: no disagreement to queue"
    if len(queue) < review.rules().max_cases:
        assert flagged == differ - taken
    assert flagged <= differ and len({c.patient_key for c in queue}) == len(queue)

    # weak subgroups as the registry's evaluation has them, and their near misses
    weak = review.weak_subgroups(lake, model, 1e-9)
    metrics = lake.read("gold.model_metrics").where(
        f"model_id = '{model.model_id}' AND version = {model.version} AND metric = 'auroc'"
    )
    below = metrics.where("kind != 'overall' AND gap < 0 AND dataset = 'test'").count()
    assert len(weak) == below and all(g < 0 for _, _, g in weak)
    rows = [(f"p{i}", "female" if i % 2 else "male", i / 10) for i in range(10)]
    frame = lake.spark.createDataFrame(rows, "patient_key string, sex string, score double")
    cases = review.weak_subgroup_cases(frame, [("sex", "female", -0.2), ("race", "x", -0.3)], 0.4, 0.8)
    assert len(cases) == 1  # no race column: that subgroup cannot be told here
    assert [(r.patient_key, r.rule) for r in cases[0].collect()] == [
        ("p7", "subgroup sex=female: test AUROC -0.20 below overall"),
        ("p5", "subgroup sex=female: test AUROC -0.20 below overall"),
    ]  # 40% of 5 women: the two highest below the cut 0.8 (p9 is above it)


def test_the_scheduled_script_scores_with_spark_submit(scored_lake):
    lake, model = scored_lake
    production(lake, model)
    bin_dir = os.path.dirname(sys.executable)
    as_of = "2021-01-01"
    run = subprocess.run(
        ["bash", "infra/schedule/score.sh", as_of],
        cwd=REPO,
        env={
            **os.environ,
            "PYSPARK_PYTHON": sys.executable,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "SPARK_SUBMIT": os.path.join(bin_dir, "spark-submit"),
            "SPARK_SUBMIT_ARGS": "--master local[1] --driver-memory 1g",
            "EHRLAKE_LAKE": lake.root,
            "EHRLAKE_SCORE_TASKS": TASK,
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"for {TASK} as of {as_of}" in run.stdout
    scored = lake.read("gold.risk_scores").where(f"as_of = DATE'{as_of}'").count()
    assert scored == features.patient_features(lake, [dt.date(2021, 1, 1)]).count()
    # the schedules call this very script
    assert "infra/schedule/score.sh" in (REPO / "infra" / "schedule" / "crontab").read_text()
    assert "infra/schedule/score.sh {{ ds }}" in (REPO / "infra" / "schedule" / "airflow_dag.py").read_text()


def test_incremental_scoring_scores_only_changed_patients_and_equals_a_full_scoring(scored_lake, tmp_path):
    from ehrlake import scoring

    lake, model = scored_lake
    production(lake, model)
    scoring.score(lake, TASK, AS_OF)  # the watermark a nightly run starts from
    assert scoring.score(lake, TASK, AS_OF, incremental=True).how == "merged +0 ~0 -0 (changed patients only)"
    # a new batch of patients arrives, and the nightly clean brings silver up to date
    synth.run(lake.spark, 40, str(tmp_path / "batch"), seed=4, tables=("encounters", "conditions"))
    events = {"encounter": "bronze.synthea_encounters", "condition": "bronze.synthea_conditions"}
    bronze = {entity: lake.row_count(table) for entity, table in events.items()}
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(tmp_path / "batch"))
    cleaned = clean.run(lake, incremental=True)
    for entity, table in events.items():  # every event the new patients brought reaches silver
        added = lake.row_count(table) - bronze[entity]
        assert added > 0 and cleaned.how[entity] == f"merged +{added:,} ~0 -0", cleaned.how
    before = lake.read("gold.risk_scores").where(f"task = '{TASK}' AND as_of = DATE'{AS_OF}'").count()
    nightly = scoring.score(lake, TASK, AS_OF, incremental=True)
    assert nightly.how.endswith("(changed patients only)")
    inserted = int(nightly.how.split("+")[1].split()[0])
    assert 0 < inserted <= 40 and nightly.scored == before + inserted
    # what a full scoring would write is what is there: it finds nothing to change
    assert scoring.score(lake, TASK, AS_OF).how == "merged +0 ~0 -0"
    assert nightly.scored == features.patient_features(lake, [AS_OF]).count()


@pytest.mark.heavy
def test_a_new_hospitals_dump_is_evaluated_without_retraining(scored_lake, tmp_path):
    """``ehrlake evaluate --input``: a FHIR bundle dump is ingested into its own scratch lake (the
    lake's tables untouched), labelled at the lake's index dates and scored by the registered
    model; every labelled row is a test row; a file cut short in transfer is quarantined and the
    result says so; a second run finds it prepared; a folder of two kinds is one clear error."""
    import shutil

    from conftest import SAMPLE
    from pyspark.sql import functions as F

    from ehrlake import cli
    from ehrlake.models import evaluate_model, external

    lake, model = scored_lake
    dump = tmp_path / "hospital_b"
    shutil.copytree(SAMPLE / "fhir_bundles", dump)
    (dump / "cut-short.json").write_text('{"resourceType": "Bundle", "type": "transaction", "entry": [{"res')
    patients_before = lake.read("silver.patient").count()
    result = evaluate_model(lake, model.model_id, model.version, str(dump))
    loaded = result["ingest"]
    assert loaded["quarantined"] == 1 and loaded["files"] == len(list(dump.iterdir()))
    assert loaded["records"] == loaded["loaded"] + loaded["duplicate"] + loaded["quarantined"]
    assert "1 quarantined (with reasons in ops.quarantine of" in external.format_ingest(loaded)
    scratch = external.scratch_lake(lake, external.read_dump(str(dump)))
    assert scratch.root == os.path.join(lake.root, "_external", "hospital_b")
    labelled = features.training_frame(scratch, features.task(TASK)).count()
    assert result["dataset"] == "hospital_b" and result["metrics"]["auroc"]["n"] == labelled > 0
    dates = {
        r.d for r in lake.read("gold.features_patient").select(F.to_date("index_time").alias("d")).collect()
    }
    scratch_dates = (
        scratch.read("gold.features_patient").select(F.to_date("index_time").alias("d")).distinct()
    )
    assert {r.d for r in scratch_dates.collect()} <= dates
    assert lake.read("silver.patient").count() == patients_before  # nothing of the dump in the lake
    evaluation = f"{model.model_id}.v{model.version}.hospital_b"
    assert lake.read("gold.model_metrics").where(F.col("evaluation") == evaluation).count() > 0
    assert external.prepare(lake, external.read_dump(str(dump))) == {"prepared": "already", "ingest": loaded}
    assert cli.main(["evaluate", "--model", model.model_id, "--input", str(dump), "--lake", lake.root]) == 0

    mixed = tmp_path / "mixed"
    shutil.copytree(SAMPLE / "fhir_bundles", mixed)
    shutil.copytree(SAMPLE / "fhir_ndjson" / "encoders_r4_9p", mixed / "ndjson")
    with pytest.raises(EhrlakeError, match="one kind per folder; found fhir-ndjson, fhir-bundles"):
        evaluate_model(lake, model.model_id, model.version, str(mixed))


def test_a_patient_outside_the_training_range_is_refused_not_scored(scored_lake, tmp_path):
    """The model records each input's training range; a 131-year-old seen last year (no such age
    in training) is refused, with the input named, in gold.scoring_refusals, and has no score;
    everyone else is scored as before."""
    from ehrlake import scoring
    from ehrlake.models import scope

    lake, model = scored_lake
    accepts = model.params["accepts"]
    assert set(accepts) <= set(model.features) and accepts["age_years"][1] < 125
    oldest = {
        "resourceType": "Patient", "id": "oldest", "gender": "female", "birthDate": "1890-03-01",
    }  # fmt: skip
    visit = {
        "resourceType": "Encounter", "id": "oldest-visit", "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/oldest"},
        "period": {"start": "2021-06-01T09:00:00Z", "end": "2021-06-01T09:30:00Z"},
    }  # fmt: skip
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "oldest.ndjson").write_text("\n".join(json.dumps(r) for r in (oldest, visit)) + "\n")
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"))
    clean.run(lake, incremental=True)
    run = scoring.score(lake, TASK, AS_OF, role="scheduler")
    refused = lake.read(scope.TABLE).where(f"task = '{TASK}'").collect()  # this date's alone
    assert len(refused) == 1 and refused[0].inputs == ["age_years = 132.00"]
    assert run.refused == 1 and "age_years" in run.format()
    dated = f"task = '{TASK}' AND as_of = DATE'{AS_OF}'"
    scored = {r.patient_key for r in lake.read("gold.risk_scores").where(dated).collect()}
    assert refused[0].patient_key not in scored and run.scored == len(scored) > 100


def test_a_shifted_input_is_flagged_and_a_stable_one_is_not(lake):
    """PSI over the training snapshot's deciles: the same distribution reads stable, ages ten
    years older and a flag turned on for most patients read shifted, a missing value is a bin of
    its own; the figures go to gold.model_drift, one row per input and date."""
    from types import SimpleNamespace

    import numpy as np

    from ehrlake.scoring import drift

    rng = np.random.default_rng(11)
    schema = "age double, flag double, lab double, score double"

    def population(n, age_shift, flag_share, lab_missing, seed):
        r = np.random.default_rng(seed)
        return lake.spark.createDataFrame(
            [
                (
                    float(r.normal(50 + age_shift, 12)),
                    float(r.random() < flag_share),
                    None if r.random() < lab_missing else float(r.normal(7, 1)),
                    float(r.random()),
                )
                for _ in range(n)
            ],
            schema,
        )

    then = population(3000, 0, 0.2, 0.1, int(rng.integers(1 << 30)))
    same = population(2000, 0, 0.2, 0.1, int(rng.integers(1 << 30)))
    moved = population(2000, 10, 0.7, 0.6, int(rng.integers(1 << 30)))
    figures, n_then, n_now = drift.compare(then, same, ["age", "flag", "lab", "score"])
    assert (n_then, n_now) == (3000, 2000) and max(figures.values()) < drift.MODERATE
    figures, _, _ = drift.compare(then, moved, ["age", "flag", "lab", "score"])
    assert min(figures["age"], figures["flag"], figures["lab"]) > drift.SHIFTED and figures["score"] < 0.1

    mv = SimpleNamespace(model_id="t.logreg", version=1, features=["age", "flag", "lab"])
    as_of = dt.date(2024, 1, 1)
    for _ in range(2):  # a rerun of the date replaces its rows
        shifted = drift.record(lake, "t", as_of, mv, lambda: then, moved, {"ehrlakeJob": "test"})
    assert shifted == ["age", "flag", "lab"]
    rows = {r.input: r.status for r in lake.read(drift.TABLE).collect()}
    assert rows == {"score": "stable", "age": "shifted", "flag": "shifted", "lab": "shifted"}
    from ehrlake.eda import report  # the report's section: the latest date per model

    # the version's later dates are binned by the reference its first scoring kept: the snapshot is
    # not read again, and the same population reads stable against it
    def unread():
        raise AssertionError("the training snapshot was read again")

    assert not drift.record(lake, "t", dt.date(2023, 1, 1), mv, unread, same, {"ehrlakeJob": "test"})
    assert lake.read(drift.REFERENCE).count() == 4
    section = report.drift_section(lake)
    assert "t.logreg v1" in section and "2024-01-01" in section and "age, flag, lab" in section
    assert "2023-01-01" not in section


def test_a_values_bin_is_how_many_cut_points_it_lies_above_and_missing_is_its_own(spark):
    """A value on a cut point is in the bin below it; null and NaN count as missing (-1); each
    column's shares are its own, whatever the other columns hold."""
    from ehrlake.scoring import drift

    rows = [(None, 5.0), (float("nan"), 5.0), (0.5, 5.0), (1.0, None), (1.5, 5.0), (2.0, 6.0), (3.0, 7.0),
            (2.5, 5.0)]  # fmt: skip
    frame = spark.createDataFrame(rows, "a double, b double")
    shares, n = drift._shares(frame, {"a": [2.0, 1.0], "b": []})
    assert n == 8
    assert shares["a"] == {-1: 2 / 8, 0: 2 / 8, 1: 2 / 8, 2: 2 / 8}
    assert shares["b"] == {-1: 1 / 8, 0: 7 / 8}


def test_a_large_training_snapshot_is_binned_from_a_reproducible_sample_of_its_rows(spark):
    """Past the cap a reference is a hashed share of the rows: about cap rows, the same ones on
    every call, and bins whose PSI against the whole snapshot's stays far below a shift; up to
    the cap the snapshot is taken whole."""
    from pyspark.sql import functions as F

    from ehrlake.scoring import drift

    frame = spark.range(20_000).select(
        F.col("id").cast("string").alias("patient_key"),
        F.lit("i").alias("index_id"),
        (F.col("id") % 97).cast("double").alias("age"),
    )
    assert drift.sample(frame, 20_000, ["patient_key", "index_id"], cap=20_000) is frame
    drawn = drift.sample(frame, 20_000, ["patient_key", "index_id"], cap=4_000)
    keys = sorted(r.patient_key for r in drawn.select("patient_key").collect())
    assert abs(len(keys) - 4_000) < 300  # binomial: sd ~57
    assert keys == sorted(r.patient_key for r in drawn.select("patient_key").collect())
    assert keys != sorted(r.patient_key for r in frame.limit(len(keys)).collect())  # not the first rows
    cuts, shares, n = drift._binned(drawn, ["age"])
    whole, _ = drift._shares(frame, cuts)
    assert n == len(keys) and drift.psi(shares["age"], whole["age"]) < 0.01


def test_an_input_is_out_of_scope_past_a_tenth_of_its_range_and_a_constant_one_never(spark):
    from ehrlake.models import scope

    accepts = {"age": [0.0, 100.0], "flag": [0.0, 0.0], "lab": [5.0, 7.0]}
    rows = [(105.0, 1.0, 6.0), (111.0, 0.0, None), (50.0, 0.0, 4.7), (50.0, 0.0, 4.9)]
    df = spark.createDataFrame(rows, "age double, flag double, lab double")
    found = [r.o for r in df.select(scope.outside(accepts).alias("o")).collect()]
    assert found == [[], ["age = 111.00"], ["lab = 4.70"], []]
    assert scope.ranges(df, ["age", "lab"]) == {"age": [50.0, 111.0], "lab": [4.7, 6.0]}
    refusals = spark.createDataFrame(
        [(["age = 111.00", "lab = 4.70"],), (["age = 120.00"],), (["lab = 3.00"],), (["age = 130.00"],)],
        "inputs array<string>",
    )
    assert scope.summary(refusals) == (
        4,
        f"refused 4 patient(s) with inputs outside the training range (age 3, lab 2) -> {scope.TABLE}",
    )
    assert scope.summary(refusals.limit(0))[0] == 0
