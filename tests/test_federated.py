"""Federated learning across sites (issue 24): each site reads only its own rows through the policy,
Flower's SuperLink and one SuperNode per site train the L1 logistic regression over 127.0.0.1, the
server receives model updates only, and differential privacy's epsilon is accounted and stored."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import SAMPLE, diabetes_extract
from pyspark.ml.functions import vector_to_array
from pyspark.sql import functions as F

from ehrlake import features, ingest
from ehrlake.errors import AccessDenied, EhrlakeError
from ehrlake.federated import learner, model, privacy, sites
from ehrlake.federated import train as federated
from ehrlake.ingest import SourceKind
from ehrlake.models import registry
from ehrlake.security.audit import TABLE as AUDIT

TASK = "diabetes130_readmission_30d"
ROWS = 4000  # of the shipped extract: enough positives at every site


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory, security_conf):
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    folder = tmp_path_factory.mktemp("federated")
    extract = diabetes_extract(folder, ROWS)
    root = str(folder / "lake")
    lake = Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))
    ingest.run(lake, SourceKind.CSV_EXTRACT, str(extract), extract="diabetes130")
    features.run(lake)
    summary = sites.prepare(lake, TASK, seed=42)
    return lake, summary


def test_each_site_reads_only_its_own_rows_and_nothing_else(prepared):
    lake, summary = prepared
    table = sites.table(TASK)
    everything = {r["site"]: r["count"] for r in lake.read(table).groupBy("site").count().collect()}
    assert set(everything) == {"emergency", "referral", "other"} and summary["unsited"] == 0
    assert {s: sum(v.values()) for s, v in summary["sites"].items()} == everything
    own = lake.read(table, role="site:emergency")
    assert {r["site"] for r in own.select("site").distinct().collect()} == {"emergency"}
    assert own.count() == everything["emergency"]
    # asking for another site's rows gets none: the policy's condition is applied under the query
    assert own.where(F.col("site") == "referral").count() == 0
    with pytest.raises(AccessDenied, match="may not read gold.features_diabetes130"):
        lake.read("gold.features_diabetes130", role="site:emergency")
    denied = (
        lake.read(AUDIT)
        .where((F.col("role") == "site:emergency") & (F.col("outcome") == "denied"))
        .select("table_name")
        .collect()
    )
    assert [r.table_name for r in denied] == ["gold.features_diabetes130"]
    # a site's extract holds its own training rows only
    with pytest.raises(EhrlakeError, match="reads no training rows of site referral"):
        sites.extract(lake, TASK, "referral", "/tmp/never.npz", role_name="site:emergency")


def test_a_lake_without_features_is_told_to_build_them(lake):
    with pytest.raises(
        EhrlakeError, match="no gold.features_diabetes130 / gold.labels yet: run ehrlake features"
    ):
        sites.prepare(lake, TASK, seed=42)


def test_sites_moments_pool_to_the_whole_and_a_site_fit_lowers_its_objective():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    x[rng.random(x.shape) < 0.2] = np.nan
    y = (rng.random(300) < 1 / (1 + np.exp(-np.nan_to_num(x[:, 0])))).astype(float)
    whole = learner.Moments.of(x, y)
    pooled = learner.pool([learner.Moments.of(x[:100], y[:100]), learner.Moments.of(x[100:], y[100:])])
    for a, b in zip(whole.arrays(), pooled.arrays(), strict=True):
        np.testing.assert_allclose(a, b)
    scaling = learner.Scaling.of(pooled)
    np.testing.assert_allclose(scaling.mean, np.nanmean(x, 0))
    np.testing.assert_allclose(scaling.std, np.nanstd(x, 0, ddof=1))
    z, weight = scaling.apply(x), learner.weights_of(y, scaling.pos_weight)
    start = np.zeros(5)
    fitted = learner.fit(start, z, y, weight, 0.001, 50)
    assert learner.loss(fitted, z, y, weight, 0.001) < learner.loss(start, z, y, weight, 0.001) - 0.05
    assert fitted[0] > 0.5  # the one informative input


def test_the_federations_weights_score_the_same_as_a_spark_pipeline(spark):
    """The registered artifact is the central logreg's pipeline holding the federation's values."""
    scaling = learner.Scaling(np.array([1.0, 10.0]), np.array([2.0, 5.0]), 3.0)
    weights = np.array([0.8, -0.4, 0.2])
    rows = spark.createDataFrame([(3.0, None), (None, 20.0), (-1.0, 5.0)], "a double, b double")
    pipe = model.pipeline(spark, ["a", "b"], scaling, weights)
    scored = pipe.transform(rows).select(vector_to_array("probability")[1].alias("p"))
    got = [r.p for r in scored.collect()]
    x = np.array([[3.0, np.nan], [np.nan, 20.0], [-1.0, 5.0]])
    z = scaling.apply(x) @ weights[:-1] + weights[-1]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-z)), rtol=1e-9)
    by_column = [r.z for r in rows.select(model.log_odds(["a", "b"], scaling, weights).alias("z")).collect()]
    np.testing.assert_allclose(by_column, z - np.log(3.0), rtol=1e-9)


def test_epsilon_grows_with_rounds_and_the_noise_for_a_target_meets_it():
    for level in privacy.LEVELS:
        spent = [privacy.epsilon(level, 1.0, r, 1e-5, 25, 0.1) for r in (1, 2, 5, 10)]
        assert spent == sorted(spent) and spent[0] < spent[-1]
        noise = privacy.noise_for(3.0, level, 10, 1e-5, 25, 0.1)
        assert 2.9 < privacy.epsilon(level, noise, 10, 1e-5, 25, 0.1) <= 3.0
    assert privacy.epsilon(privacy.PATIENT, 0.0, 10, 1e-5, 25, 0.1) == float("inf")


@pytest.mark.slow
def test_three_sites_two_rounds_over_flower_register_a_model_from_updates_only(prepared):
    lake, _ = prepared
    run = federated.train(lake, TASK, rounds=2, bootstrap=100)
    mv = run.model
    assert mv.model_id == f"{TASK}.logreg-federated" and mv.algorithm == "logreg"
    assert mv.params["sites"] == ["emergency", "referral", "other"] and mv.params["rounds"] == 2
    assert mv.params["epsilon"] is None  # no privacy asked for
    losses = mv.params["round_train_loss"]
    assert len(losses) == 2 and losses[1] < losses[0]  # the global model improves on round 1
    assert mv.metrics["auroc"]["value"] > 0.55
    assert registry.get(lake, mv.model_id, mv.version).status == registry.CANDIDATE
    # what the server received: each site's moments (5 vectors of one value per input, 2 counts)
    # and each round one weight vector per site; nothing the size of a site's rows
    inputs = len(sites.inputs(TASK))
    assert {r["stage"] for r in run.received} == {"query", "train"} and all(
        "error" not in r for r in run.received
    )
    assert len([r for r in run.received if r["stage"] == "train"]) == 3 * 2
    for reply in run.received:
        shapes = [s for arrays in reply["arrays"].values() for s in arrays]
        assert all(len(s) == 1 and s[0] <= inputs + 1 for s in shapes)
    assert max(run.site_rows.values()) > inputs + 1
    # the federated model is evaluated like any other: subgroups in the model tables
    subgroups = lake.read("gold.model_metrics").where(
        (F.col("model_id") == mv.model_id) & (F.col("version") == mv.version)
    )
    assert subgroups.where(F.col("subgroup") != "all").count() > 0


@pytest.mark.slow
def test_a_federated_model_is_approved_promoted_and_evaluated_on_new_stays_like_any(prepared, tmp_path):
    from ehrlake.models import card, evaluate_model, governance
    from ehrlake.models.report import comparison_table

    lake, _ = prepared
    mv = registry.get(lake, f"{TASK}.logreg-federated")  # trained by the test above, or here
    if mv.params.get("epsilon") is not None:
        mv = federated.train(lake, TASK, rounds=2, bootstrap=100).model
    registry.nominate(lake, mv.model_id, mv.version)
    promoted = governance.decide(
        lake, mv.model_id, mv.version, "reviewer", "federated: card and subgroups read"
    )
    assert promoted.status == registry.PRODUCTION and registry.production(lake, TASK).model_id == mv.model_id
    written, _ = card.write(lake, mv.model_id, mv.version, str(tmp_path))
    assert "Federated: fedavg, 2 rounds over 3 sites (emergency " in open(written).read()
    assert "<td>logreg-federated</td>" in comparison_table([promoted])  # told apart from central logreg
    # stays of the extract the lake never held: the scoring path of an extract task
    with gzip.open(SAMPLE / "diabetes_130_us" / "diabetic_data_dev.csv.gz", "rt") as src:
        lines = list(src)
    new_file = tmp_path / "hospital_c.csv.gz"
    with gzip.open(new_file, "wt") as out:
        out.writelines([lines[0], *lines[ROWS + 1 : ROWS + 4001]])
    result = evaluate_model(lake, mv.model_id, mv.version, str(new_file))
    assert result["dataset"] == "hospital_c" and 0.55 < result["metrics"]["auroc"]["value"] < 0.9


@pytest.mark.slow
def test_a_private_fedprox_run_spends_at_most_its_epsilon_and_records_it(prepared):
    lake, _ = prepared
    run = federated.train(lake, TASK, rounds=2, strategy="fedprox", epsilon=8.0, bootstrap=100)
    p = run.model.params
    assert p["strategy"] == "fedprox" and p["privacy"] == "patient" and p["delta"] == 1e-5
    assert 7.9 < p["epsilon"] <= 8.0 and p["noise_multiplier"] > 0
    assert "patient-level epsilon 8.00" in run.lines()[0]


@pytest.mark.slow
def test_secure_aggregation_reaches_the_plain_model_and_shows_the_server_only_masked_updates(prepared):
    """SecAgg+ (Flower's workflow and client mod): the server learns only the sum of the sites'
    updates, so a secure FedAvg run lands on the plain run's weights (up to SecAgg+'s quantisation)
    while no site's weights reach the server in the clear."""
    from pyspark.ml import PipelineModel

    lake, _ = prepared
    with pytest.raises(EhrlakeError, match="use --privacy patient"):
        federated.train(lake, TASK, rounds=2, epsilon=8.0, level="site", secure=True)
    plain = [
        m for m in registry.versions(lake, TASK)
        if m.model_id == f"{TASK}.logreg-federated" and m.params["rounds"] == 2
        and m.params["strategy"] == "fedavg" and not m.params["epsilon"] and not m.params.get("secure_aggregation")
    ] or [federated.train(lake, TASK, rounds=2, bootstrap=100).model]  # fmt: skip
    run = federated.train(lake, TASK, rounds=2, secure=True, bootstrap=100)
    assert run.model.params["secure_aggregation"] is True and "SecAgg+" in run.lines()[2]

    def weights(mv):
        fitted = PipelineModel.load(mv.artifact_path(lake)).stages[-1]
        return np.append(fitted.coefficients.toArray(), fitted.intercept)

    np.testing.assert_allclose(weights(run.model), weights(plain[-1]), atol=1e-3)
    trained = [r for r in run.received if r["stage"] == "train"]
    assert trained and all("error" not in r for r in trained)
    # each site's reply in every stage: the protocol's record (keys, shares, the masked vector), and
    # array records emptied by the mod; what is in the clear is the fit's status and metrics
    assert all("secaggplus_configs" in r["configs"] for r in trained)
    assert all(not shapes for r in trained for shapes in r["arrays"].values())
    assert {c for r in trained for c in r["configs"]} <= {
        "secaggplus_configs",
        "fitres.status",
        "fitres.metrics",
    }
