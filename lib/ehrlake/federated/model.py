"""The federation's weights as the central ``logreg`` pipeline: a Spark ML ``PipelineModel`` of
imputer, assembler, scaler and logistic regression, so the registry, the evaluation, reasons,
scoring and drift treat a federated model exactly as a centrally trained one."""

from __future__ import annotations

import numpy as np
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegressionModel
from pyspark.ml.feature import Imputer, StandardScalerModel, VectorAssembler
from pyspark.sql import Column
from pyspark.sql import functions as F

from ehrlake.federated.learner import Scaling


def _vector(spark, values: np.ndarray):
    array = spark.sparkContext._gateway.new_array(spark._jvm.double, len(values))
    for i, v in enumerate(values):
        array[i] = float(v)
    return spark._jvm.org.apache.spark.ml.linalg.Vectors.dense(array)


def pipeline(spark, inputs: list[str], scaling: Scaling, weights: np.ndarray) -> PipelineModel:
    """Spark ML stages holding exactly these values. The imputer is fitted on one row of the
    means (its mean is that row); the scaler and the regression are built from their values
    (their JVM constructors: Spark has no fit that takes given coefficients)."""
    imputed = [f"_imp_{c}" for c in inputs]
    means = spark.createDataFrame([tuple(float(m) for m in scaling.mean)], inputs)
    impute = Imputer(inputCols=inputs, outputCols=imputed, strategy="mean").fit(means)
    assemble = VectorAssembler(inputCols=imputed, outputCol="raw_features")
    jvm = spark._jvm.org.apache.spark.ml
    scale = StandardScalerModel(
        jvm.feature.StandardScalerModel(
            "federated_scaler", _vector(spark, scaling.std), _vector(spark, scaling.mean)
        )
    )
    scale._transfer_params_from_java()
    scale._set(inputCol="raw_features", outputCol="features", withMean=True, withStd=True)
    regression = LogisticRegressionModel(
        jvm.classification.LogisticRegressionModel(
            "federated_logreg", _vector(spark, weights[:-1]), float(weights[-1])
        )
    )
    regression._transfer_params_from_java()
    regression._set(featuresCol="features", labelCol="label", elasticNetParam=1.0)
    return PipelineModel([impute, assemble, scale, regression])


def log_odds(inputs: list[str], scaling: Scaling, weights: np.ndarray) -> Column:
    """The model's calibrated log-odds as a column (a round's weights scored without building a
    pipeline): the weighting of positives taken back out, as :func:`ehrlake.models.train.score_column`."""
    z = F.lit(float(weights[-1]))
    for c, m, s, w in zip(inputs, scaling.mean, scaling.std, weights[:-1], strict=True):
        if w:
            z = z + F.lit(float(w)) * (
                (F.coalesce(F.col(c).cast("double"), F.lit(float(m))) - float(m)) / float(s)
            )
    return z - F.lit(float(np.log(scaling.pos_weight)))
