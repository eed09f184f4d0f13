"""Models on the feature tables: training (``train.py``), the three learners (``algorithms.py``),
the registry (``registry.py``), model versions and their recorded evaluations for every kind of model
(``versions.py``), evaluation (``evaluate.py``) and explanations (``explain.py``).

::

    ehrlake train --task diabetes130_readmission_30d          # xgboost, logreg, rf -> candidates
    ehrlake models list
    ehrlake models promote --model diabetes130_readmission_30d.xgboost --version 1
    ehrlake evaluate --model diabetes130_readmission_30d.xgboost --input new_extract.csv.gz
"""

from __future__ import annotations

import os

from pyspark.sql import functions as F

from ehrlake import features as feats
from ehrlake.errors import EhrlakeError
from ehrlake.features import diabetes130
from ehrlake.models import evaluate, registry
from ehrlake.models.train import DEFAULT_SEED, score_column, split, train
from ehrlake.models.versions import record

__all__ = ["train", "evaluate_model", "registry"]


def evaluate_model(
    lake, model_id: str, version: int | None = None, input_path: str | None = None, role=None
) -> dict:
    """Evaluate a registered model without retraining: on new data (``input_path``: an extract file
    of the format it was trained on, or a new hospital's FHIR / Synthea dump for a model of silver
    features or sequences, :mod:`ehrlake.models.external`), or else on its held-out patients.
    Results go to the gold model tables under the evaluation id ``<model>.v<N>.<dataset>``."""
    mv = registry.get(lake, model_id, version)
    t = feats.task(mv.task)
    if input_path and t.level != "diabetes130":  # a new hospital's dump: ingested apart, then scored
        from ehrlake.models import external

        return external.evaluate(lake, mv, input_path, role)
    if input_path:
        if not os.path.exists(input_path):
            raise EhrlakeError(f"no file {input_path}")
        rows = diabetes130.build(diabetes130.read_file(lake.spark, input_path))
        data = rows.where(F.col("label").isNotNull())
        dataset = os.path.basename(input_path.rstrip("/")).split(".")[0]
    else:
        seed = int(mv.params.get("seed", DEFAULT_SEED))
        _, data = split(feats.training_frame(lake, t), seed, int(mv.params.get("test_percent", 20)))
        dataset = "test"
    if data.limit(1).count() == 0:
        raise EhrlakeError(f"no labelled rows to evaluate {mv.label} on")
    model = mv.load(lake)
    pred = model.transform(data).withColumn("score", score_column(mv.params.get("pos_weight", 1.0)))
    with lake.security.job("evaluate", ["gold"], role) as (_, audit):
        overall = record(lake, mv, pred, dataset)
        audit.append(
            (
                "gold.model_metrics",
                f"{mv.label} on {dataset}: AUROC {evaluate.format_value(overall['auroc']['value'])}",
            )
        )
    return {"model": mv.label, "dataset": dataset, "metrics": overall}
