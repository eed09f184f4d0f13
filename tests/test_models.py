"""Models on the shipped Diabetes 130-US extract: three learners from one feature table, patient-
grouped split and search, registry traceable to Delta versions, reproducible, evaluated on a new
file without retraining."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import SAMPLE

from ehrlake import features, ingest
from ehrlake.errors import EhrlakeError
from ehrlake.ingest import SourceKind
from ehrlake.models import evaluate_model, registry, train
from ehrlake.models.train import split

TASK = "diabetes130_readmission_30d"


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory, security_conf):
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = str(tmp_path_factory.mktemp("models") / "lake")
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    ingest.run(lake, SourceKind.CSV_EXTRACT, str(SAMPLE / "diabetes_130_us"), extract="diabetes130")
    summary = features.run(lake)
    models = train(lake, TASK, grid="tiny", folds=2, bootstrap=200)
    return lake, summary, models


def test_three_learners_from_one_feature_table_beat_chance(trained):
    lake, summary, models = trained
    counts = summary["tasks"][TASK]
    assert (
        counts["labelled"] + counts["excluded"] == 30693
        and 0.08 < counts["positive"] / counts["labelled"] < 0.15
    )
    assert [m.algorithm for m in models] == ["xgboost", "logreg", "rf"]
    assert models[0].params["fitted_on"].startswith("driver, ")  # ~24,000 rows: below the driver bound
    for m in models:
        auroc = m.metrics["auroc"]
        assert 0.6 < auroc["value"] < 0.8, m.label  # published range on this data: 0.64-0.70
        assert auroc["ci_low"] < auroc["value"] < auroc["ci_high"]
        assert set(m.metrics) >= {"auprc", "accuracy", "precision", "recall", "f1", "brier", "cv_auroc"}
        assert m.features == models[0].features and m.status == "candidate"
        # traceable: the exact Delta versions it was trained from
        assert m.training_data == {
            "gold.features_diabetes130": lake.version("gold.features_diabetes130"),
            "gold.labels": lake.version("gold.labels"),
        }
    saved = registry.versions(lake, TASK)
    assert [(m.model_id, m.version) for m in saved] == sorted((m.model_id, m.version) for m in models)
    assert saved[0].load(lake) is not None


def test_split_keeps_each_patient_on_one_side(trained):
    lake, _, _ = trained
    train_df, test_df = split(features.training_frame(lake, features.task(TASK)), seed=42)
    a = train_df.select("patient_key").distinct()
    b = test_df.select("patient_key").distinct()
    assert a.join(b, "patient_key").count() == 0
    assert 0.15 < b.count() / (a.count() + b.count()) < 0.25
    assert train_df.select("cv_fold").distinct().count() == 3


def test_same_seed_reproduces_the_same_metrics_and_promotion_picks_the_best(trained):
    """Through ``ehrlake train``'s entry (``training.train_task``): the same seed gives the same
    model again, and ``promote`` nominates the best held-out AUROC for production (a reviewer's
    approval makes it production: the next test)."""
    from ehrlake.models import registry
    from ehrlake.training import train_task

    lake, _, models = trained
    result = train_task(lake, TASK, ["xgboost"], grid="tiny", folds=2, promote=True)
    again = result.models[0]
    assert again.version == models[0].version + 1
    assert again.metrics["auroc"]["value"] == models[0].metrics["auroc"]["value"]
    assert again.metrics["brier"]["value"] == models[0].metrics["brier"]["value"]
    assert (result.promoted.model_id, result.promoted.status) == (again.model_id, registry.NOMINATED)
    with pytest.raises(EhrlakeError, match="no production model"):
        registry.production(lake, TASK)


def test_production_needs_a_reviewers_approval_and_the_card_shows_it(trained, tmp_path):
    """Promotion without an approval is refused; an analyst, and the role that trained the model,
    may not approve (both audited); a reviewer's approval of the nominee makes it production; a
    later rejection withdraws the approval; the card shows metrics, ranges and the decisions."""
    from ehrlake.errors import AccessDenied
    from ehrlake.models import card, governance, registry

    lake, _, _ = trained
    mv = registry.get(lake, f"{TASK}.xgboost")  # the latest: nominated by the previous test, or here
    if mv.status != registry.NOMINATED:
        mv = registry.nominate(lake, mv.model_id, mv.version)
    assert mv.params["trained_by"] == "engineer" and set(mv.params["accepts"]) <= set(mv.features)
    with pytest.raises(EhrlakeError, match="has no approval"):
        governance.promote(lake, mv.model_id, mv.version, role="engineer")
    with pytest.raises(AccessDenied, match="may not approve models"):
        governance.decide(lake, mv.model_id, mv.version, "analyst", "looks fine to me")
    with pytest.raises(AccessDenied, match="trained as engineer"):
        governance.decide(lake, mv.model_id, mv.version, "engineer", "my own model")
    with pytest.raises(EhrlakeError, match="states why"):
        governance.decide(lake, mv.model_id, mv.version, "reviewer", "  ")
    denied = lake.read("audit.events").where("action = 'models.approve' AND outcome = 'denied'").collect()
    assert {r.role for r in denied} >= {"analyst", "engineer"}

    note = "subgroups and calibration checked"
    assert governance.decide(lake, mv.model_id, mv.version, "reviewer", note).status == "production"
    assert registry.production(lake, TASK).version == mv.version
    assert governance.approval(lake, mv.model_id, mv.version).role == "reviewer"
    written, page = card.write(lake, mv.model_id, mv.version, str(tmp_path))
    text = open(written).read()
    auroc = mv.metrics["auroc"]
    assert f"{auroc['value']:.3f} ({auroc['ci_low']:.3f}-{auroc['ci_high']:.3f})" in text
    assert "## Subgroups (AUROC)" in text and "| sex = " in text and "## Calibration" in text
    assert "Accepted ranges" in text and note in text and "| approved | reviewer |" in text
    assert "<table>" in open(page).read()

    governance.decide(lake, mv.model_id, mv.version, "reviewer", "withdrawn: drift", approve=False)
    assert governance.approval(lake, mv.model_id, mv.version) is None
    with pytest.raises(EhrlakeError, match="has no approval"):
        governance.promote(lake, mv.model_id, mv.version, role="engineer")


def test_evaluation_tables_hold_subgroups_calibration_errors_and_importance(trained):
    lake, _, models = trained
    xgb = models[0]
    evaluation = f"{xgb.model_id}.v{xgb.version}.test"
    metrics = lake.read("gold.model_metrics").where(f"evaluation = '{evaluation}'").collect()
    kinds = {r.kind for r in metrics}
    assert {"overall", "sex", "age_band", "race"} <= kinds
    overall = {r.metric: r.value for r in metrics if r.kind == "overall"}
    assert overall["auroc"] == pytest.approx(xgb.metrics["auroc"]["value"])
    female = [r for r in metrics if r.kind == "sex" and r.subgroup == "female" and r.metric == "auroc"][0]
    assert female.gap == pytest.approx(female.value - overall["auroc"])
    calib = lake.read("gold.model_calibration").where(f"evaluation = '{evaluation}'").collect()
    tested = [r.n for r in metrics if r.kind == "overall" and r.metric == "auroc"][0]
    assert 3 <= len(calib) <= 10 and sum(r.n for r in calib) == tested
    # the scores are calibrated back from the class weights: mean predicted risk ~ observed rate
    mean_score = sum(r.mean_predicted * r.n for r in calib) / tested
    observed = sum(r.observed_rate * r.n for r in calib) / tested
    assert abs(mean_score - observed) < 0.03
    assert lake.read("gold.model_errors").where(f"evaluation = '{evaluation}'").count() > 0
    top = lake.read("gold.model_importance").where(f"evaluation = '{evaluation}'").orderBy("rank").first()
    assert top.feature in xgb.features and top.importance > 0


def test_evaluate_a_new_extract_file_without_retraining(trained, tmp_path):
    lake, _, models = trained
    source = SAMPLE / "diabetes_130_us" / "diabetic_data_dev.csv.gz"
    new_file = tmp_path / "hospital_b.csv.gz"
    with gzip.open(source, "rt", newline="") as src, gzip.open(new_file, "wt", newline="") as out:
        for i, line in enumerate(src):
            if i > 4000:
                break
            out.write(line)
    before = len(registry.versions(lake, TASK))
    result = evaluate_model(lake, models[1].model_id, models[1].version, str(new_file))
    assert result["dataset"] == "hospital_b" and 0.55 < result["metrics"]["auroc"]["value"] < 0.9
    assert result["metrics"]["auroc"]["n"] < 4001
    assert len(registry.versions(lake, TASK)) == before  # nothing retrained
    rows = lake.read("gold.model_metrics").where("dataset = 'hospital_b' AND kind = 'overall'").count()
    assert rows == 7


def test_xgboost_reasons_come_from_shap_contributions_that_add_up(trained):
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from ehrlake.models import explain
    from ehrlake.models.train import score_column

    lake, _, models = trained
    xgb = models[0]
    model = xgb.load(lake)
    explain.prepare("xgboost", model)
    rows = features.training_frame(lake, features.task(TASK)).limit(200)
    scored = model.transform(rows).withColumn("score", score_column(xgb.params["pos_weight"]))
    importance = explain.importance("xgboost", model, xgb.features)
    reasons = explain.reasons(
        "xgboost", model, scored, xgb.features, features.descriptions(features.task(TASK)), importance
    )
    out = scored.select(
        reasons.alias("reasons"),
        F.aggregate(explain.shap_values(scored), F.lit(0.0), lambda a, x: a + x).alias("margin"),
        vector_to_array("probability")[1].alias("p"),
        "score",
        score_column(1.0, F.col("score")).alias("unchanged"),
    ).collect()
    for r in out:
        # the class weighting's odds taken back out, from the vector or from a given column
        odds = lambda q: q / (1 - q)  # noqa: E731
        assert odds(r.score) == pytest.approx(odds(r.p) / xgb.params["pos_weight"], rel=1e-6)
        assert r.unchanged == pytest.approx(r.score, rel=1e-9)
        # TreeSHAP: contributions (with the bias term) add up to the model's log-odds
        assert r.margin == pytest.approx(float(np.log(r.p / (1 - r.p))), abs=1e-3)
        assert len(r.reasons) <= 3 and all(" = " in x and "(+" in x for x in r.reasons)
    assert sum(1 for r in out if r.reasons) > 150
    descriptions = set(features.descriptions(features.task(TASK)).values())
    assert any(x.split(" = ")[0] in descriptions for r in out for x in r.reasons)


def test_subgroup_figure_draws_intervals_and_colours_only_clear_gaps():
    """A subgroup of a handful of patients has a wide interval: it is drawn grey, not as a gap."""
    from types import SimpleNamespace

    import matplotlib.colors as mcolors
    import pandas as pd

    from ehrlake.models import report

    sub = pd.DataFrame(
        {
            "kind": ["sex", "sex", "race"],
            "subgroup": ["female", "male", "Asian"],
            "value": [0.62, 0.80, 0.79],
            "ci_low": [0.58, 0.76, 0.52],
            "ci_high": [0.66, 0.84, 0.95],
            "n": [900, 850, 40],
            "positives": [90, 80, 6],
        }
    )
    best = SimpleNamespace(label="t.xgboost v1", metrics={"auroc": {"value": 0.70}})
    seen = {}
    _, caption = report.subgroup_figure(sub, best, lambda fig: seen.setdefault("fig", fig) and "png")
    fig = seen["fig"]
    colours = [mcolors.to_hex(c) for c in fig.axes[0].collections[-1].get_facecolors()]
    by_label = dict(zip([t.get_text() for t in fig.axes[0].get_yticklabels()], colours, strict=True))
    assert by_label["race: Asian (n=40, 6 pos.)"] == "#777777"  # interval spans the overall figure
    assert (
        by_label["sex: female (n=900, 90 pos.)"] == "#c44e52"
        and by_label["sex: male (n=850, 80 pos.)"] == "#55a868"
    )
    assert "2 of 3 subgroups" in caption


def test_encoders_get_their_own_report_table_and_an_undefined_auroc_a_plain_headline():
    """The report once crashed on the demo's pretrained encoder (no AUROC); a test split without
    positives has an AUROC of None, which a listing must still print."""
    import datetime as dt

    from ehrlake.models import report

    def version(model_id, metrics):
        return registry.ModelVersion(
            model_id,
            1,
            "t",
            "a",
            {"epochs": 5},
            [],
            {},
            metrics,
            {},
            "",
            dt.datetime(2026, 1, 1),
            "candidate",
        )

    encoder = version("sequences.encoder", {
        "masked_code_loss": {"value": 3.23, "frequency": 4.5, "untrained": 6.11},
        "masked_code_accuracy": {"value": 0.34, "frequency": 0.138, "untrained": 0.01},
    })  # fmt: skip
    # label-efficiency curves: a task at two shares gets a figure, one at a single share none, and a
    # version without an AUROC (one class in its test split) is no point
    import dataclasses

    import matplotlib.pyplot as plt

    def fitted(model_id, share, auroc):
        mv = version(model_id, {"auroc": {"value": auroc}})
        return dataclasses.replace(mv, task=model_id.split(".")[0], params={"label_fraction": share})

    curves = report.label_efficiency_figures(
        [fitted("a.sequence", 0.1, 0.6), fitted("a.sequence", 0.1, 0.7), fitted("a.sequence", 1.0, 0.8),
         fitted("a.sequence_scratch", 1.0, 0.75), fitted("b.sequence", 0.1, 0.6), fitted("b.sequence", 1.0, None),
         encoder],
        lambda fig: plt.close(fig) or "png",
    )  # fmt: skip
    assert [c for _, c in curves] == ["Label efficiency of the models of a (same test rows)"]
    trunk = version("images.encoder", {
        "contrastive_loss": {"value": 2.51, "untrained": 3.87},
        "pair_accuracy": {"value": 0.62, "untrained": 0.09},
    })  # fmt: skip
    html = report.pretraining_table([encoder, trunk])
    assert "sequences.encoder v1" in html and "3.23" in html and "34.0%" in html and "13.8%" in html
    assert "images.encoder v1" in html and "views paired" in html and "62.0%" in html
    assert trunk.headline() == "contrastive loss 2.51 (untrained 3.87)"
    assert report.pretraining_table([]) == ""
    assert encoder.headline() == "masked-code loss 3.23 (untrained 6.11)"
    none = version(
        "t.sequence", {"auroc": {"value": None, "ci_low": None, "ci_high": None, "n": 40, "positives": 0}}
    )
    assert none.headline() == "test AUROC undefined (0 positives in 40 rows)"
    assert "t.sequence" not in report.comparison_table([]) and "<td></td>" in report.comparison_table([none])


def test_a_patients_several_rows_are_resampled_together(spark):
    """Readmission scores a patient's every stay: 60 patients with 4 identical stays each hold no
    more evidence than their 60 first stays, and the patient bootstrap's AUROC interval says so
    (as wide as the 60 rows', where resampling the 240 rows would halve it); the draws are a
    seeded function of the keys, and average one copy of each row."""
    from ehrlake.models import evaluate

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.25, 60), 0, 1)
    once = [(f"p{i}", float(scores[i]), int(labels[i])) for i in range(60)]
    schema = "patient_key string, score double, label int"
    four = spark.createDataFrame(once * 4, schema)
    single = spark.createDataFrame(once, schema)

    def width(m):
        return m["auroc"]["ci_high"] - m["auroc"]["ci_low"]

    clustered, per_patient = evaluate.metrics(four), evaluate.metrics(single)
    by_rows = evaluate.summarise(evaluate.histogram(four))
    assert clustered["auroc"]["value"] == pytest.approx(per_patient["auroc"]["value"])
    assert width(clustered) == pytest.approx(width(per_patient), rel=0.25)
    assert width(by_rows) < 0.7 * width(clustered)
    draws = evaluate.patient_draws(four, bootstrap=400)
    assert np.array_equal(draws, evaluate.patient_draws(four, bootstrap=400))
    assert not np.array_equal(draws, evaluate.patient_draws(four, bootstrap=400, seed=8))
    assert draws.sum(axis=(1, 2)).mean() == pytest.approx(240, rel=0.05)
    assert evaluate.resampling(single) is None  # one row a patient: rows, as before


def test_two_models_on_the_same_patients_are_compared_by_a_paired_interval(spark):
    """A model compared with itself differs by exactly 0 in every draw; a second model that ranks
    most patients alike but some better gains its point difference, with a paired interval above
    0 and much narrower than either model's own interval (the same patients drawn for both)."""
    from ehrlake.models import evaluate

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 150)
    base = np.clip(0.5 + 0.2 * (labels - 0.5) + rng.normal(0, 0.25, 150), 0, 1)
    better = base.copy()
    helped = rng.random(150) < 0.3  # a third of the patients scored nearer their label
    better[helped] = np.clip(better[helped] + 0.3 * (labels[helped] - 0.5), 0, 1)
    frame = lambda s: spark.createDataFrame(  # noqa: E731
        [(f"p{i // 2}", float(s[i]), int(labels[i])) for i in range(150)],
        "patient_key string, score double, label int",
    )
    a, b = frame(base), frame(better)

    same = evaluate.paired_difference(a, a, bootstrap=200)
    assert same["value"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0

    got = evaluate.paired_difference(a, b, bootstrap=200)
    alone = [evaluate.metrics(df, bootstrap=200)["auroc"] for df in (a, b)]
    assert got["value"] == pytest.approx(alone[1]["value"] - alone[0]["value"])
    assert 0 < got["ci_low"] < got["value"] < got["ci_high"] and got["share_above_0"] > 0.975
    assert got["ci_high"] - got["ci_low"] < 0.5 * (alone[0]["ci_high"] - alone[0]["ci_low"])


def test_accuracy_threshold_is_the_most_accurate_cut_nearest_the_default(spark):
    """An image model's finding threshold is chosen on its validation labels: the cut with the most
    correct calls (here only cuts in (0.65, 0.70] call all five right, where 0.5 calls four), the
    nearest to the default among equals; one class only keeps the default."""
    from ehrlake.models import evaluate

    rows = spark.createDataFrame(
        [(0.1, 0), (0.2, 0), (0.65, 0), (0.7, 1), (0.9, 1)], "score double, label int"
    )
    cut = evaluate.accuracy_threshold(rows)
    assert 0.65 < cut <= 0.70
    accuracy = lambda t: evaluate.metrics(rows, threshold=t, bootstrap=10)["accuracy"]["value"]  # noqa: E731
    assert accuracy(cut) == 1.0 and accuracy(0.5) == pytest.approx(0.8)
    assert evaluate.accuracy_threshold(rows.where("label = 1")) == evaluate.FINDING_THRESHOLD
    assert evaluate.accuracy_threshold(rows, default=0.95) == pytest.approx(0.70)


def test_target_encodings_never_see_the_fold_they_encode(spark):
    """Code A is only in fold 0, all readmitted; fold 1 holds code B (2 of 5 readmitted) and a
    missing code. Out of fold, A's rows get fold 1's rate (2 of 6), never their own labels, and
    fold 1's rows fold 0's (1.0);
    rows a model is not fitted on get every fitting row's statistics, shrunk towards the rate."""
    from ehrlake.models import target_encoding as te

    rows = spark.createDataFrame(
        [(0, "A", 1)] * 5 + [(1, "B", 1)] * 2 + [(1, "B", 0)] * 3 + [(1, None, 0)],
        "cv_fold int, code string, label int",
    )
    encoded = {(r.cv_fold, r.code): r.te_code for r in te.out_of_fold(rows, ["code"], strength=4.0).collect()}
    assert encoded[(0, "A")] == pytest.approx(2 / 6)  # fold 1's rate: A unseen there
    assert encoded[(1, "B")] == pytest.approx(1.0) and encoded[(1, None)] == pytest.approx(1.0)
    new = spark.createDataFrame([("A",), ("C",), (None,)], "code string")
    got = {r.code: r.te_code for r in te.encode(rows, new, ["code"], strength=4.0).collect()}
    rate = 7 / 11
    assert got["A"] == pytest.approx((5 + 4 * rate) / (5 + 4))
    assert got["C"] == pytest.approx(rate)  # never seen: the rate
    assert got[None] == pytest.approx((0 + 4 * rate) / (1 + 4))  # missing is a level of its own


def test_a_fold_encoded_learner_is_fitted_out_of_fold_and_saves_its_encoding(spark, tmp_path):
    """Each patient's code is unique and their label is the code's: an in-sample encoding would
    hand the learner every label. The learner sees out-of-fold encodings, in which a unique code
    says only its other folds' rate (both labels share every value); the saved model encodes new
    rows from every fitting row."""
    from pyspark.ml import Estimator, Pipeline, PipelineModel
    from pyspark.ml.feature import SQLTransformer

    from ehrlake.models import target_encoding as te

    seen = []

    class Looks(Estimator):  # the learner's place: keeps what it is fitted on
        def _fit(self, df):
            seen.extend(df.select("te_code", "label").collect())
            return SQLTransformer(statement="SELECT * FROM __THIS__")

    rows = spark.createDataFrame(
        [(f"p{i}", f"c{i}", i % 2) for i in range(200)], "patient_key string, code string, label int"
    )
    model = te.FoldEncoded(Pipeline(stages=[Looks()]), ["code"], seed=3).fit(rows)
    by_value: dict[float, set] = {}
    for r in seen:
        by_value.setdefault(r.te_code, set()).add(r.label)
    assert len(seen) == 200 and 2 <= len(by_value) <= te.INNER_FOLDS
    assert all(labels == {0, 1} for labels in by_value.values())  # the encoding tells no label apart
    model.save(str(tmp_path / "m"))
    again = PipelineModel.load(str(tmp_path / "m"))
    new = spark.createDataFrame([("c1",), ("c2",), ("never",), (None,)], "code string")
    got = {r.code: r.te_code for r in again.transform(new).collect()}
    assert got["c1"] == pytest.approx((1 + 20 * 0.5) / 21) and got["c2"] == pytest.approx(10 / 21)
    assert got["never"] == pytest.approx(0.5) and got[None] == pytest.approx(0.5)


def test_xgboost_fits_few_rows_on_the_driver_into_the_same_model_class_as_spark(spark, tmp_path):
    """Below ``driver_rows`` the fit is one xgboost process on the driver; above it xgboost.spark's.
    Both give a SparkXGBClassifierModel that scores, saves and loads alike, and learn the same trees
    up to the quantile sketch (one process's instead of two workers')."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.sql import functions as F
    from xgboost.spark import SparkXGBClassifierModel

    from ehrlake.models import algorithms

    rows = (
        spark.range(3000)
        .select(
            F.rand(1).alias("a"),
            F.rand(2).alias("b"),
            F.when(F.rand(3) > 0.9, None).otherwise(F.rand(4)).alias("c"),
        )
        .withColumn("label", (F.col("a") + F.col("b") + F.rand(5) / 2 > 1.2).cast("int"))
        .withColumn("weight", F.lit(1.0))
        .persist()
    )
    auroc = BinaryClassificationEvaluator(rawPredictionCol="rawPrediction")
    found, fitted = {}, {}
    try:
        for bound in (10_000, 2_999, 0):  # 3,000 rows: on the driver, then on Spark twice
            pipe, _ = algorithms.pipeline("xgboost", ["a", "b", "c"], seed=42, grid="tiny", driver_rows=bound)
            model = pipe.fit(rows)
            learner = model.stages[-1]
            assert isinstance(learner, SparkXGBClassifierModel)
            found[bound], fitted[bound] = (learner.fitted_on, auroc.evaluate(model.transform(rows))), model
        assert found[10_000][0].startswith("driver, ")
        assert found[2_999][0] == found[0][0] == "spark, 2 workers"
        assert found[10_000][1] > 0.9 and found[10_000][1] == pytest.approx(found[0][1], abs=0.01)
        fitted[10_000].save(str(tmp_path / "m"))
        again = PipelineModel.load(str(tmp_path / "m"))
        reloaded = auroc.evaluate(again.transform(rows))
        assert reloaded == pytest.approx(found[10_000][1], abs=1e-5)  # to the saved floats' precision
    finally:
        rows.unpersist()
