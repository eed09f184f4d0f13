"""The three learners on one feature table, as Spark ML pipelines with their search grids.

- ``xgboost``: gradient-boosted trees (``xgboost.spark``, ``num_workers`` Spark tasks in barrier
  mode; a fit on few rows on the driver: :mod:`ehrlake.models.sized_xgboost`); missing values
  stay missing (NaN), which trees handle natively.
- ``logreg``: L1-regularised logistic regression (Spark ML, ``elasticNetParam=1``) on median-imputed,
  standardised features, so coefficients compare across features and read as reasons.
- ``rf``: random forest (Spark ML) on median-imputed features.

Class imbalance: every learner gets a per-row ``weight`` (positives weighted negatives/positives).
"""

from __future__ import annotations

import logging
import os

from pyspark.ml import Pipeline
from pyspark.ml.classification import LogisticRegression, RandomForestClassifier
from pyspark.ml.feature import Imputer, StandardScaler, VectorAssembler
from pyspark.ml.tuning import ParamGridBuilder

from ehrlake.errors import EhrlakeError

ALGORITHMS = ("xgboost", "logreg", "rf")
# registered by the deep-learning runtime (ehrlake.dl.finetune): reads gold.sequences, not features
SEQUENCE_TRANSFORMER = "sequence-transformer"
GRIDS = ("tiny", "small", "full")


def pipeline(
    algorithm: str,
    features: list[str],
    seed: int,
    num_workers: int = 2,
    grid: str = "small",
    driver_rows: int | None = None,
):
    """(Pipeline, param maps to search) for one algorithm over ``features`` (columns of doubles).
    ``driver_rows``: XGBoost fits on at most so many rows run on the driver, larger ones on
    ``num_workers`` Spark tasks (:mod:`ehrlake.models.sized_xgboost`: its ``DRIVER_ROWS`` when
    None; 0: always on Spark)."""
    if algorithm not in ALGORITHMS:
        raise EhrlakeError(f"unknown algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    if grid not in GRIDS:
        raise EhrlakeError(f"unknown grid {grid!r} (known: {', '.join(GRIDS)})")
    imputed = [f"_imp_{c}" for c in features]
    impute = Imputer(inputCols=features, outputCols=imputed, strategy="median")
    if algorithm == "xgboost":
        from ehrlake.models import sized_xgboost  # xgboost.spark: imported by the fits that use it

        # xgboost.spark logs every fit at INFO on the driver's stderr; the job reports its own result
        if not os.environ.get("EHRLAKE_DEBUG"):
            logging.getLogger("XGBoost-PySpark").setLevel(logging.WARNING)

        assemble = VectorAssembler(inputCols=features, outputCol="features", handleInvalid="keep")
        model = sized_xgboost.SizedXGBClassifier(
            driver_rows=sized_xgboost.DRIVER_ROWS if driver_rows is None else driver_rows,
            features_col="features",
            label_col="label",
            weight_col="weight",
            num_workers=num_workers,
            seed=seed,
            n_estimators={"tiny": 30, "small": 200, "full": 400}[grid],
            learning_rate=0.05,
            subsample=0.8,
            colsample_bytree=0.8,
            min_child_weight=5,
            tree_method="hist",
            missing=float("nan"),
            verbose=False,  # no log line per boosting round
        )
        depths = {"tiny": [3], "small": [3, 5], "full": [3, 4, 6]}[grid]
        builder = ParamGridBuilder().addGrid(model.max_depth, depths)
        if grid == "full":
            builder = builder.addGrid(model.learning_rate, [0.03, 0.08])
        return Pipeline(stages=[assemble, model]), builder.build()
    if algorithm == "logreg":
        assemble = VectorAssembler(inputCols=imputed, outputCol="raw_features")
        scale = StandardScaler(inputCol="raw_features", outputCol="features", withMean=True, withStd=True)
        # each L-BFGS / OWL-QN iteration is a Spark job: the tiny grid stops at 30, as its trees stop
        # at 20-30 (the suite's mortality model took 79-125 iterations a fit for the same AUROC)
        model = LogisticRegression(
            featuresCol="features",
            labelCol="label",
            weightCol="weight",
            elasticNetParam=1.0,
            maxIter=30 if grid == "tiny" else 200,
        )
        regs = {
            "tiny": [0.003],  # tests: one candidate per learner, as for the trees
            "small": [0.0003, 0.001, 0.003, 0.01],
            "full": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        }[grid]
        return Pipeline(stages=[impute, assemble, scale, model]), ParamGridBuilder().addGrid(
            model.regParam, regs
        ).build()
    assemble = VectorAssembler(inputCols=imputed, outputCol="features")
    model = RandomForestClassifier(
        featuresCol="features",
        labelCol="label",
        weightCol="weight",
        seed=seed,
        numTrees={"tiny": 20, "small": 200, "full": 300}[grid],
        minInstancesPerNode=5,
        featureSubsetStrategy="sqrt",
    )
    depths = {"tiny": [5], "small": [8, 12], "full": [6, 10, 14]}[grid]
    return Pipeline(stages=[impute, assemble, model]), ParamGridBuilder().addGrid(
        model.maxDepth, depths
    ).build()


def params_of(model_stage) -> dict:
    """The learner's explicitly set and default parameters that matter, as plain values."""
    out = {}
    for p in model_stage.params:
        if model_stage.isDefined(p):
            value = model_stage.getOrDefault(p)
            if (
                isinstance(value, (int, float, str, bool))
                and not p.name.endswith("Col")
                and not p.name.endswith("_col")
            ):
                out[p.name] = value
    return out
