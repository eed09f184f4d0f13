"""Model versions: the one place where a trained model of any kind (Spark ML learners, the ANN, the
CNN, and the encoders, trees and federated models to come) becomes a registered version.

Trainers differ in how they fit; what follows a fit is the same for all, and lives here: a fresh
artifact folder for the next version number, the registry row (parameters, features, training data
versions, metrics, risk bands), the evaluation tables (overall and subgroup metrics with intervals,
calibration, error cells, feature importance) and the audit line.
"""

from __future__ import annotations

import os
import shutil

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.lake import WriteMode
from ehrlake.models import evaluate, registry


def evaluation_name(model_id: str, version: int, dataset: str = "test") -> str:
    """The key of a model version's evaluation on ``dataset`` in the gold model tables."""
    return f"{model_id}.v{version}.{dataset}"


def new_artifact(lake, model_id: str) -> tuple[int, str, str]:
    """The next version number of ``model_id``, its artifact folder relative to the lake root, and
    that folder's absolute path, which does not exist (one left by a run that crashed before it
    registered is not a model yet, and is removed)."""
    version = registry.next_version(lake, model_id)
    artifact = registry.artifact_dir(model_id, version)
    path = os.path.join(lake.root, artifact)
    if os.path.exists(path):
        shutil.rmtree(path)
    return version, artifact, path


def register(
    lake, audit, mv: registry.ModelVersion, test: DataFrame, importance: dict | None = None
) -> registry.ModelVersion:
    """Register ``mv`` (its artifact already saved), record its evaluation on the held-out
    predictions ``test`` (``patient_key``, ``label``, ``score`` and the subgroup columns), and add
    the audit line of the job ``audit`` belongs to."""
    registry.register(lake, mv)
    # the trainer measured these on ``test`` already, as record would (evaluate.metrics at the
    # model's threshold): the table holds the registry's figures, not a second bootstrap of them
    overall = {m: mv.metrics[m] for m in evaluate.METRICS if m in mv.metrics}
    record(lake, mv, test, "test", importance=importance, overall=overall or None)
    audit.append((registry.TABLE, f"{mv.label}: {mv.headline()}"))
    return mv


def record(
    lake,
    mv: registry.ModelVersion,
    pred: DataFrame,
    dataset: str,
    importance: dict | None = None,
    overall: dict | None = None,
) -> dict:
    """Write an evaluation (overall and subgroup metrics, calibration, error cells, importance) to the
    gold model tables, replacing an earlier evaluation of the same model version on the same data.
    ``overall``: the overall metrics where the caller has them (:func:`evaluate.metrics` of ``pred``)."""
    evaluation = evaluation_name(mv.model_id, mv.version, dataset)
    spark = lake.spark
    base = {"evaluation": evaluation, "model_id": mv.model_id, "version": mv.version, "dataset": dataset}
    h = evaluate.histogram(pred)
    threshold = float(mv.params.get("threshold", evaluate.THRESHOLD))
    if overall is None:
        overall = evaluate.summarise(h, threshold=threshold, draws=evaluate.resampling(pred))
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
