"""Training: patient-grouped split, grouped cross-validated search, fit, evaluate, register.

Reproducible by construction: the split and the folds are hashes of ``patient_key`` with the seed
(no patient is on both sides, and the same seed gives the same sides); the training rows are
partitioned by patient and sorted, so every learner sees the same rows in the same order; every
learner is seeded. Re-running with the same seed and data versions gives the same metrics.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil

import numpy as np
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.functions import vector_to_array
from pyspark.ml.tuning import CrossValidator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake.errors import EhrlakeError
from ehrlake.lake import WriteMode
from ehrlake.models import algorithms, evaluate, explain, registry

DEFAULT_SEED = 42


def _bucket(seed: int, buckets: int) -> F.Column:
    key = F.coalesce(F.col("patient_key"), F.col("index_id"))
    return F.pmod(F.xxhash64(key, F.lit(seed)), F.lit(buckets)).cast("int")


def split(df: DataFrame, seed: int, test_percent: int = 20, folds: int = 3) -> tuple[DataFrame, DataFrame]:
    """(train with ``cv_fold``, test), grouped by patient."""
    marked = df.withColumn("_bucket", _bucket(seed, 100))
    train = marked.where(F.col("_bucket") >= test_percent).withColumn("cv_fold", _bucket(seed + 1, folds))
    return train.drop("_bucket"), marked.where(F.col("_bucket") < test_percent).drop("_bucket")


def with_weights(train: DataFrame, pos_weight: float) -> DataFrame:
    return train.withColumn("weight", F.when(F.col("label") == 1, F.lit(pos_weight)).otherwise(F.lit(1.0)))


def score_column(pos_weight: float = 1.0) -> F.Column:
    """The calibrated probability of the positive class.

    Weighting positives by ``w`` during training multiplies the odds the learner predicts by ``w``;
    subtracting ``log(w)`` from the log-odds undoes it (exact for logistic regression's intercept,
    close for boosted trees' log-loss), so scores read as risks and calibration is meaningful.
    Monotone, so ranking metrics (AUROC, AUPRC) are unchanged."""
    p = F.least(F.greatest(vector_to_array(F.col("probability"))[1], F.lit(1e-7)), F.lit(1 - 1e-7))
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
) -> list[registry.ModelVersion]:
    """Train each algorithm for a task; every fitted model is registered as a candidate and
    evaluated on the held-out patients (gold.model_metrics and friends)."""
    t = feats.task(task_name)
    versions = {table: lake.version(table) for table in (t.feature_table, "gold.labels")}
    wanted = feats.model_inputs(t)
    df = feats.training_frame(lake, t, versions)
    train_df, test_df = split(df, seed, test_percent, folds)
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
    if n == 0 or positives == 0 or positives == n:
        raise EhrlakeError(
            f"task {task_name}: {n} training rows with {positives} positives; both classes are needed "
            "(run ehrlake features on more data)"
        )
    pos_weight = (n - positives) / positives
    base_rate = positives / n  # decision threshold of the threshold metrics (calibrated scores)
    # a feature never observed in training cannot be imputed or learned; leave it out, recorded
    inputs = [c for c in wanted if stats[f"nonnull_{c}"] > 0]
    train_df = (
        with_weights(train_df, pos_weight)
        .repartition(num_workers, "patient_key")
        .sortWithinPartitions("patient_key", "index_id")
        .cache()
    )
    trained = []
    with lake.security.job("train", ["gold"], role) as (_, audit):
        for algorithm in algorithms_:
            pipe, grid_maps = algorithms.pipeline(algorithm, inputs, seed, num_workers, grid)
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
            h = evaluate.histogram(pred)
            metrics = evaluate.summarise(h, bootstrap, threshold=base_rate)
            metrics["cv_auroc"] = {"value": float(fitted.avgMetrics[best]), "folds": folds}
            metrics["train_seconds"] = {"value": round(seconds, 1)}
            q = pred.approxQuantile("score", [0.7, 0.9], 0.001)
            model_id = f"{task_name}.{algorithm}"
            version = registry.next_version(lake, model_id)
            artifact = registry.artifact_dir(model_id, version)
            path = os.path.join(lake.root, artifact)
            if os.path.exists(path):  # left by a crashed run before it registered: not a model yet
                shutil.rmtree(path)
            model.save(path)
            params = algorithms.params_of(explain.learner(model))
            params.update(
                {
                    "grid": grid,
                    "seed": seed,
                    "folds": folds,
                    "test_percent": test_percent,
                    "pos_weight": pos_weight,
                    "threshold": base_rate,
                }
            )
            mv = registry.ModelVersion(
                model_id=model_id,
                version=version,
                task=task_name,
                algorithm=algorithm,
                params=params,
                features=inputs,
                training_data=versions,
                metrics=metrics,
                bands={"medium": q[0], "high": q[1]} if len(q) == 2 else {},
                artifact=artifact,
                created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
                status="candidate",
            )
            registry.register(lake, mv)
            record(lake, mv, pred, "test", importance=explain.importance(algorithm, model, inputs))
            audit.append((registry.TABLE, f"{mv.label}: test AUROC {metrics['auroc']['value']:.3f}"))
            trained.append(mv)
    train_df.unpersist()
    return trained


def record(
    lake, mv: registry.ModelVersion, pred: DataFrame, dataset: str, importance: dict | None = None
) -> dict:
    """Write an evaluation (overall and subgroup metrics, calibration, error cells, importance) to the
    gold model tables, replacing an earlier evaluation of the same model version on the same data."""
    evaluation = f"{mv.model_id}.v{mv.version}.{dataset}"
    spark = lake.spark
    base = {"evaluation": evaluation, "model_id": mv.model_id, "version": mv.version, "dataset": dataset}
    h = evaluate.histogram(pred)
    threshold = float(mv.params.get("threshold", evaluate.THRESHOLD))
    overall = evaluate.summarise(h, threshold=threshold)
    rows = [
        {**base, "kind": "overall", "subgroup": "all", "metric": m, **v, "gap": 0.0}
        for m, v in overall.items()
    ]
    for g in evaluate.subgroup_metrics(pred, threshold=threshold):
        for m, v in g["metrics"].items():
            gap = (
                None
                if v["value"] is None or overall[m]["value"] is None
                else v["value"] - overall[m]["value"]
            )
            rows.append({**base, "kind": g["kind"], "subgroup": g["value"], "metric": m, **v, "gap": gap})
        if not g["metrics"]:
            rows.append(
                {
                    **base,
                    "kind": g["kind"],
                    "subgroup": g["value"],
                    "metric": "too_few",
                    "value": None,
                    "ci_low": None,
                    "ci_high": None,
                    "n": g["n"],
                    "positives": g["positives"],
                    "gap": None,
                }
            )
    metric_schema = (
        "evaluation string, model_id string, version int, dataset string, kind string, subgroup string, "
        "metric string, value double, ci_low double, ci_high double, n long, positives long, gap double"
    )
    fields = [f.split()[0] for f in metric_schema.split(", ")]
    frames = {
        "gold.model_metrics": spark.createDataFrame(
            [tuple(r.get(f) for f in fields) for r in rows], metric_schema
        ),
        "gold.model_calibration": spark.createDataFrame(
            [
                (
                    evaluation,
                    mv.model_id,
                    mv.version,
                    dataset,
                    c["bin"],
                    c["mean_predicted"],
                    c["observed_rate"],
                    c["n"],
                )
                for c in evaluate.calibration(h)
            ],
            "evaluation string, model_id string, version int, dataset string, bin int, "
            "mean_predicted double, observed_rate double, n long",
        ),
        "gold.model_errors": evaluate.error_cells(
            pred, lake.security.small_cell_k, threshold=threshold
        ).select(
            F.lit(evaluation).alias("evaluation"),
            F.lit(mv.model_id).alias("model_id"),
            F.lit(mv.version).alias("version"),
            F.lit(dataset).alias("dataset"),
            "*",
        ),
    }
    if importance is not None:
        frames["gold.model_importance"] = spark.createDataFrame(
            [
                (evaluation, mv.model_id, mv.version, dataset, f, float(v), i + 1)
                for i, (f, v) in enumerate(importance.items())
            ],
            "evaluation string, model_id string, version int, dataset string, feature string, "
            "importance double, rank int",
        )
    for table, frame in frames.items():
        lake.write(
            frame,
            table,
            mode=WriteMode.OVERWRITE,
            partition_by=["evaluation"],
            where={"evaluation": evaluation},
            commit_info={"ehrlakeJob": "evaluate"},
        )
    return overall
