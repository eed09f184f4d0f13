"""XGBoost fitted where it is fastest for its size: on the driver, or on Spark's workers.

``bench/xgboost_scale.py`` measured ``xgboost.spark`` at 2.5x a single process's time on a million
training rows and 1.5x on ten million, on the same two cores (a fixed ~17 s a fit for the barrier
job, each worker's Arrow to pandas to DMatrix copy and the allreduce tracker, and 1.44x the
marginal cost). A cross-validated search fits many times (a grid point per fold, then the best
on every row), so on the training tables most tasks have (tens of thousands to a few hundred
thousand patient x as-of rows) the distributed path is mostly overhead.

:class:`SizedXGBClassifier` is ``SparkXGBClassifier`` with one change: a fit on at most
``driver_rows`` rows collects them (bounded: about 1 GB of driver memory per million rows at 53
features) and trains one xgboost process on the driver's cores, through the same parameter
handling and DMatrix construction as the workers use; above it, or with ``driver_rows=0``, it is
the distributed fit. Either way the result is a ``SparkXGBClassifierModel``: it is saved, loaded,
scored on the executors and explained (TreeSHAP) exactly as before, so nothing downstream knows
where it was fitted except the registry, which records it (``fitted_on``).
"""

from __future__ import annotations

import os

from xgboost.spark import SparkXGBClassifier

DRIVER_ROWS = 1_000_000  # default bound of a fit on the driver (0: always distributed)


class SizedXGBClassifier(SparkXGBClassifier):
    """``SparkXGBClassifier`` that fits up to ``driver_rows`` rows on the driver (see module)."""

    def __init__(self, *, driver_rows: int = DRIVER_ROWS, **kwargs):
        super().__init__(**kwargs)
        self.driver_rows = driver_rows  # a plain attribute: estimator copies (the CV's) keep it

    def _fit(self, dataset):
        if self.driver_rows <= 0 or dataset.count() > self.driver_rows:
            model = super()._fit(dataset)
            model.fitted_on = f"spark, {self.getOrDefault(self.num_workers)} workers"
            return model
        return self._fit_on_driver(dataset)

    def _fit_on_driver(self, dataset):
        # xgboost.spark's own steps (core._SparkXGBEstimator._fit), with the barrier job replaced by
        # one process: the same columns, parameters and DMatrix, so the same model up to the
        # quantile sketch of one process instead of several
        from xgboost.sklearn import _can_use_qdm
        from xgboost.spark.core import XGBoostTrainingSummary, worker_train
        from xgboost.spark.data import create_dmatrix_from_partitions

        self._validate_params()
        columns, feature_prop = self._prepare_input_columns_and_feature_prop(dataset)
        booster_params, train_kwargs, dmatrix_kwargs = self._get_xgb_parameters(dataset)
        threads = _driver_cores(dataset)
        booster_params["nthread"] = dmatrix_kwargs["nthread"] = threads
        if booster_params.get("max_bin") is not None:
            dmatrix_kwargs["max_bin"] = booster_params["max_bin"]
        rows = dataset.select(*columns).toPandas()  # at most driver_rows rows
        dtrain, _ = create_dmatrix_from_partitions(
            iterator=iter([rows]),
            feature_cols=feature_prop.features_cols_names,
            dev_ordinal=None,
            use_qdm=_can_use_qdm(booster_params.get("tree_method"), booster_params.get("device")),
            kwargs=dmatrix_kwargs,
            enable_sparse_data_optim=feature_prop.enable_sparse_data_optim,
            has_validation_col=feature_prop.has_validation_col,
        )
        del rows
        evals: dict = {}
        booster = worker_train(
            booster_params, dtrain, evals=[(dtrain, "training")], evals_result=evals, **train_kwargs
        )
        fitted = self._convert_to_sklearn_model(bytearray(booster.save_raw("json")), booster.save_config())
        model = self._create_pyspark_model(fitted, XGBoostTrainingSummary.from_metrics(evals))
        model._resetUid(self.uid)  # pyspark ML's convention, as xgboost.spark does
        model = self._copyValues(model)
        model.fitted_on = f"driver, {threads} threads"
        return model


def _driver_cores(dataset) -> int:
    """The driver's cores: ``spark.driver.cores`` where set (a cluster), else the machine's."""
    conf = dataset.sparkSession.sparkContext.getConf()
    return int(conf.get("spark.driver.cores", "0")) or os.cpu_count() or 1


__all__ = ["DRIVER_ROWS", "SizedXGBClassifier"]
