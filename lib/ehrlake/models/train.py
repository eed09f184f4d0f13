"""Training: patient-grouped split, grouped cross-validated search, fit, evaluate, register.

Reproducible by construction: the split and the folds are hashes of ``patient_key`` with the seed
(no patient is on both sides, and the same seed gives the same sides); the training rows are
partitioned by patient and sorted, so every learner sees the same rows in the same order; every
learner is seeded. Re-running with the same seed and data versions gives the same metrics.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.functions import vector_to_array
from pyspark.ml.tuning import CrossValidator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake.errors import EhrlakeError
from ehrlake.models import algorithms, evaluate, explain, registry, scope, target_encoding, versions

DEFAULT_SEED = 42


def _bucket(seed: int, buckets: int) -> F.Column:
    key = F.coalesce(F.col("template_key"), F.col("patient_key"), F.col("index_id"))
    return F.pmod(F.xxhash64(key, F.lit(seed)), F.lit(buckets)).cast("int")


def only_generated(df: DataFrame) -> bool:
    """Whether every row is a generated patient's (a throughput run over ``ehrlake synth`` output
    alone): there is no real patient to test on."""
    if "template_key" not in df.columns:
        return False
    return df.where(F.col("template_key").isNull()).limit(1).count() == 0


def split(
    df: DataFrame, seed: int, test_percent: int = 20, folds: int = 3, generated_only: bool | None = None
) -> tuple[DataFrame, DataFrame]:
    """(train with ``cv_fold``, test), grouped by patient.

    A generated patient (``template_key`` set: :func:`ehrlake.clean.origin.with_templates`) goes
    with the sample patient it copies: into train and its CV fold when the template is there, and
    nowhere when the template is a test patient (it would be that patient seen in training). So
    the test split holds real patients only. Without the column every patient counts as real.
    A frame of generated patients only (:func:`only_generated`: a throughput run) is split by
    patient, so the machinery runs; copies of one template may then sit on both sides and the
    metrics flatter, which ``train`` records (``params.test_patients``). ``generated_only``: that
    answer when the caller has it already (None: asked here)."""
    if generated_only is None:
        generated_only = only_generated(df)
    if "template_key" not in df.columns or generated_only:
        df = df.withColumn("template_key", F.lit(None).cast("string"))
    marked = df.withColumn("_bucket", _bucket(seed, 100))
    train = marked.where(F.col("_bucket") >= test_percent).withColumn("cv_fold", _bucket(seed + 1, folds))
    test = marked.where((F.col("_bucket") < test_percent) & F.col("template_key").isNull())
    return train.drop("_bucket", "template_key"), test.drop("_bucket", "template_key")


def stratified_share(df: DataFrame, key: str, strata: list, fraction: float, seed: int) -> DataFrame:
    """The rows of ``df`` (one per ``key``) that are ``fraction`` of each stratum, at least one:
    each stratum's lowest hashes of ``seed`` and ``key``. Nested across fractions at one seed (the
    keys of 5% are among those of 10%), and the same keys for every caller given the seed: the
    label-efficiency shares of the sequence models' patients and of the image tasks' images."""
    from pyspark.sql import Window

    stratum = Window.partitionBy(*strata)
    ranked = df.withColumn(
        "_rank", F.row_number().over(stratum.orderBy(F.xxhash64(F.lit(seed), key), key))
    ).withColumn("_count", F.count("*").over(stratum))
    return ranked.where(F.col("_rank") <= F.ceil(F.col("_count") * F.lit(fraction))).drop("_rank", "_count")


def require_both_classes(task_name: str, n: int, positives: int) -> None:
    """A learner given one class learns a constant: refuse, saying how many of each there were."""
    if n == 0 or positives == 0 or positives == n:
        raise EhrlakeError(
            f"task {task_name}: {n} training rows with {positives} positives; both classes are needed "
            "(run ehrlake features on more data)"
        )


_REVIEWED = "_reviewed"


def reviewed_labels(lake, task_name: str, train_df: DataFrame) -> tuple[DataFrame, dict]:
    """``train_df`` with each reviewed row's label replaced by the clinician's, and what changed."""
    from ehrlake import review

    reviewed = review.feedback(lake, task_name)
    weight = review.rules().feedback_weight
    if reviewed is None:
        return train_df.withColumn(_REVIEWED, F.lit(False)), {"rows": 0, "changed": 0, "weight": weight}
    joined = train_df.join(reviewed, ["patient_key", "index_id"], "left")
    counts = joined.agg(
        F.count("reviewed_label").alias("rows"),
        F.sum((F.col("reviewed_label") != F.col("label")).cast("int")).alias("changed"),
    ).first()
    out = joined.withColumn(_REVIEWED, F.col("reviewed_label").isNotNull()).withColumn(
        "label", F.coalesce(F.col("reviewed_label"), F.col("label"))
    )
    return out.drop("reviewed_label"), {
        "rows": counts["rows"],
        "changed": counts["changed"] or 0,
        "weight": weight,
    }


def with_weights(train: DataFrame, pos_weight: float) -> DataFrame:
    return train.withColumn("weight", F.when(F.col("label") == 1, F.lit(pos_weight)).otherwise(F.lit(1.0)))


def score_column(pos_weight: float = 1.0, probability: F.Column | None = None) -> F.Column:
    """The calibrated probability of the positive class (``probability``: the learner's weighted
    one, by default the second entry of its ``probability`` vector).

    Weighting positives by ``w`` during training multiplies the odds the learner predicts by ``w``;
    subtracting ``log(w)`` from the log-odds undoes it (exact for logistic regression's intercept,
    close for boosted trees' log-loss), so scores read as risks and calibration is meaningful.
    Monotone, so ranking metrics (AUROC, AUPRC) are unchanged."""
    if probability is None:
        probability = vector_to_array(F.col("probability"))[1]
    p = F.least(F.greatest(probability, F.lit(1e-7)), F.lit(1 - 1e-7))
    logit = F.log(p / (1 - p)) - F.lit(float(np.log(pos_weight)))
    return 1 / (1 + F.exp(-logit))


def train(
    lake,
    task_name: str,
    algorithms_: tuple[str, ...] = algorithms.ALGORITHMS,
    grid: str = "small",
    folds: int = 3,
    seed: int = DEFAULT_SEED,
    num_workers: int = 2,
    test_percent: int = 20,
    role: str | None = None,
    bootstrap: int = evaluate.BOOTSTRAP,
    with_feedback: bool = False,
    xgboost_driver_rows: int | None = None,
) -> list[registry.ModelVersion]:
    """Train each algorithm for a task; every fitted model is registered as a candidate and
    evaluated on the held-out patients (gold.model_metrics and friends). ``with_feedback``: the
    training rows a clinician reviewed take the reviewed label, weighted (:mod:`ehrlake.review`).
    ``xgboost_driver_rows``: XGBoost fits on at most so many rows run on the driver, larger ones
    on ``num_workers`` Spark tasks (None: :data:`ehrlake.models.sized_xgboost.DRIVER_ROWS`; 0: on
    Spark at every size)."""
    t = feats.task(task_name)
    data_versions = {table: lake.version(table) for table in (t.feature_table, "gold.labels")}
    wanted = feats.model_inputs(t)
    df = feats.training_frame(lake, t, data_versions)
    generated_only = only_generated(df)
    train_df, test_df = split(df, seed, test_percent, folds, generated_only)
    feedback = {}
    if with_feedback:  # training rows only: the test split keeps the outcome it is judged by
        train_df, feedback = reviewed_labels(lake, task_name, train_df)
    stats = (
        train_df.groupBy()
        .agg(
            F.sum("label").alias("pos"),
            F.count("*").alias("n"),
            *[F.count(c).alias(f"nonnull_{c}") for c in wanted],
        )
        .first()
    )
    positives, n = int(stats["pos"] or 0), int(stats["n"])
    require_both_classes(task_name, n, positives)
    pos_weight = (n - positives) / positives
    base_rate = positives / n  # decision threshold of the threshold metrics (calibrated scores)
    # a feature never observed in training cannot be imputed or learned; leave it out, recorded
    codes = feats.model_codes(t)
    inputs = [c for c in wanted if stats[f"nonnull_{c}"] > 0] + [target_encoding.name(c) for c in codes]
    weighted = with_weights(train_df, pos_weight)
    if feedback:
        reviewed = F.col(_REVIEWED)
        weighted = weighted.withColumn(
            "weight", F.when(reviewed, F.col("weight") * feedback["weight"]).otherwise(F.col("weight"))
        ).drop(_REVIEWED)
    train_df = (
        weighted.repartition(num_workers, "patient_key")
        .sortWithinPartitions("patient_key", "index_id")
        .cache()
    )
    # what the models accept: each input's range over the training rows (ehrlake.models.scope)
    accepts = scope.ranges(train_df, [c for c in inputs if c in wanted])
    trained = []
    with lake.security.job("train", ["gold"], role) as (_, audit):
        for algorithm in algorithms_:
            pipe, grid_maps = algorithms.pipeline(
                algorithm, inputs, seed, num_workers, grid, driver_rows=xgboost_driver_rows
            )
            if codes:  # encoded inside every fit's rows, so no row's label reaches its own features
                pipe = target_encoding.FoldEncoded(pipe, codes, seed)
            search = CrossValidator(
                estimator=pipe,
                estimatorParamMaps=grid_maps,
                evaluator=BinaryClassificationEvaluator(labelCol="label", metricName="areaUnderROC"),
                foldCol="cv_fold",
                numFolds=folds,
                seed=seed,
                parallelism=1,
            )
            started = dt.datetime.now(dt.UTC)
            fitted = search.fit(train_df)
            seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
            model = fitted.bestModel
            best = max(range(len(grid_maps)), key=lambda i: fitted.avgMetrics[i])
            pred = model.transform(test_df).withColumn("score", score_column(pos_weight))
            metrics = evaluate.metrics(pred, base_rate, bootstrap)
            metrics["cv_auroc"] = {"value": float(fitted.avgMetrics[best]), "folds": folds}
            metrics["train_seconds"] = {"value": round(seconds, 1)}
            model_id = f"{task_name}.{algorithm}"
            version, artifact, path = versions.new_artifact(lake, model_id)
            model.save(path)
            learner = explain.learner(model)
            params = algorithms.params_of(learner)
            if hasattr(learner, "fitted_on"):  # XGBoost: on the driver or on Spark's workers
                params["fitted_on"] = learner.fitted_on
            params.update(
                {
                    "grid": grid,
                    "seed": seed,
                    "folds": folds,
                    "test_percent": test_percent,
                    "test_patients": "generated copies only" if generated_only else "real",
                    "pos_weight": pos_weight,
                    "threshold": base_rate,
                    "target_encoded": codes,
                    "target_encoding_strength": target_encoding.STRENGTH,
                    "accepts": accepts,
                    "trained_by": role or lake.security.default_role,  # who may not approve it
                    "feedback": feedback or None,  # reviewed labels used: rows, changed, weight
                }
            )
            mv = registry.ModelVersion(
                model_id=model_id,
                version=version,
                task=task_name,
                algorithm=algorithm,
                params=params,
                features=inputs,
                training_data=data_versions,
                metrics=metrics,
                bands=evaluate.risk_bands(pred),
                artifact=artifact,
                created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
                status="candidate",
            )
            importance = explain.importance(algorithm, model, inputs)
            trained.append(versions.register(lake, audit, mv, pred, importance))
    train_df.unpersist()
    return trained
