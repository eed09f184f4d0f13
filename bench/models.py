"""Benchmark: distributed vs single-process XGBoost, and population scoring throughput.

1. Diabetes 130-US (shipped extract -> features): ``xgboost.spark`` with 2 workers against
   single-process ``xgboost`` (2 threads) on the same training rows and parameters: fit seconds and
   held-out AUROC, median of ``--repeats`` runs each. The single-process baseline needs the training
   rows in one Python process (fine at 24k rows; ``bench/xgboost_scale.py`` measures the two
   up to 10 million rows).
2. Scoring: a generated population of ``--patients`` (default 100,000) -> ingest -> clean ->
   features -> a mortality_12m model (logistic regression) -> ``scoring.score`` as of a date:
   patients/second, against a plain Spark baseline over the same patients (read silver.patient and
   the encounter counts per patient, write Parquet) as a ratio.

Results: ``bench/results/models-<date>.json``.

    .venv/bin/python bench/models.py [--patients N] [--repeats 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result, secured_lake  # noqa: E402

from ehrlake import clean, config, features, ingest, scoring, synth  # noqa: E402
from ehrlake.ingest import SourceKind  # noqa: E402
from ehrlake.models import registry, train  # noqa: E402
from ehrlake.models.train import split, with_weights  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402

PARAMS = {"max_depth": 5, "n_estimators": 200, "learning_rate": 0.05, "subsample": 0.8,
          "colsample_bytree": 0.8, "min_child_weight": 5, "tree_method": "hist"}  # fmt: skip
AS_OF = dt.date(2022, 1, 1)


def xgboost_pair(spark, lake, repeats: int) -> dict:
    import numpy as np
    import xgboost as xgb
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F
    from sklearn.metrics import roc_auc_score
    from xgboost.spark import SparkXGBClassifier

    t = features.task("diabetes130_readmission_30d")
    cols = features.model_inputs(t)
    train_df, test_df = split(features.training_frame(lake, t), seed=42)
    pos = train_df.where("label = 1").count()
    n = train_df.count()
    weight = (n - pos) / pos
    train_df = with_weights(train_df, weight).repartition(2, "patient_key").cache()
    assemble = VectorAssembler(inputCols=cols, outputCol="features", handleInvalid="keep")
    train_v = assemble.transform(train_df).cache()
    test_v = assemble.transform(test_df).cache()
    train_v.count(), test_v.count()
    labels = np.array([r.label for r in test_v.select("label").collect()])  # ~6k ints, bounded
    distributed, single = [], []
    auc_d = auc_s = None
    for _ in range(repeats):
        started = time.perf_counter()
        model = SparkXGBClassifier(
            features_col="features", label_col="label", weight_col="weight", num_workers=2, seed=42, **PARAMS
        ).fit(train_v)
        distributed.append(time.perf_counter() - started)
        scored = model.transform(test_v).select("label", vector_to_array(F.col("probability"))[1].alias("p"))
        rows = scored.collect()
        auc_d = roc_auc_score([r.label for r in rows], [r.p for r in rows])

        pdf = train_df.select(*cols, "label", "weight").toPandas()  # the baseline's one-process copy
        tdf = test_df.select(*cols, "label").toPandas()
        started = time.perf_counter()
        clf = xgb.XGBClassifier(n_jobs=2, random_state=42, **PARAMS)
        clf.fit(pdf[cols], pdf["label"], sample_weight=pdf["weight"])
        single.append(time.perf_counter() - started)
        auc_s = roc_auc_score(tdf["label"], clf.predict_proba(tdf[cols])[:, 1])
    return {
        "train_rows": n,
        "test_rows": int(len(labels)),
        "features": len(cols),
        "params": PARAMS,
        "spark_2_workers_seconds": [round(x, 2) for x in distributed],
        "single_process_seconds": [round(x, 2) for x in single],
        "spark_vs_single_time_ratio": round(statistics.median(distributed) / statistics.median(single), 2),
        "auroc_spark_2_workers": round(float(auc_d), 4),
        "auroc_single_process": round(float(auc_s), 4),
    }


def scoring_run(spark, lake, work: Path, patients: int) -> dict:
    timings = {}
    t = time.perf_counter()
    synth.run(spark, patients, str(work / "population"), seed=5, tables=("encounters", "conditions",
              "observations", "medications", "procedures"))  # fmt: skip
    timings["synth"] = time.perf_counter() - t
    t = time.perf_counter()
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(work / "population"))
    timings["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    clean.run(lake)
    timings["clean"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = features.run(lake, [dt.date(y, 1, 1) for y in (2019, 2020, 2021)])
    timings["features"] = time.perf_counter() - t
    t = time.perf_counter()
    model = train(lake, "mortality_12m", ("logreg",), grid="tiny", folds=2, bootstrap=200)[0]
    timings["train_logreg"] = time.perf_counter() - t
    # straight to production: the benchmark times scoring, not the approval (models.governance)
    registry.set_production(lake, model.model_id, model.version)

    def baseline() -> float:
        started = time.perf_counter()
        counts = lake.read("silver.encounter").groupBy("patient_key").count()
        lake.read("silver.patient").join(counts, "patient_key", "left").write.mode("overwrite").parquet(
            str(work / "baseline")
        )
        return time.perf_counter() - started

    before = baseline()
    run = scoring.score(lake, "mortality_12m", AS_OF)
    after = baseline()
    base = statistics.median([before, after])
    return {
        "patients": patients,
        "labels": summary["tasks"].get("mortality_12m"),
        "model": model.label,
        "model_test_auroc": model.metrics["auroc"],
        "scored": run.scored,
        "bands": run.bands,
        "score_seconds": round(run.seconds, 2),
        "patients_per_second": round(run.scored / run.seconds, 1),
        "baseline_seconds": [round(before, 2), round(after, 2)],
        "score_vs_baseline": round(run.seconds / base, 2),
        "setup_seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-scoring", action="store_true", help="only the XGBoost comparison")
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    parser.add_argument("--driver-memory", default="8g", help="local mode: executors live in the driver JVM")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="ehrlake-bench-models-"))
    work.mkdir(parents=True, exist_ok=True)
    conf = config.Config()
    conf.spark.conf["spark.driver.memory"] = args.driver_memory
    spark = get_spark(conf)
    try:
        d130 = secured_lake(work / "d130", spark, work / "secrets")
        ingest.run(
            d130, SourceKind.CSV_EXTRACT, str(REPO / "data/sample/diabetes_130_us"), extract="diabetes130"
        )
        features.run(d130)
        result = {"benchmark": "models", "date": dt.date.today().isoformat(), "machine": machine(spark)}
        result["xgboost"] = xgboost_pair(spark, d130, args.repeats)
        print(f"xgboost: {result['xgboost']}")
        if not args.skip_scoring:
            pop = secured_lake(work / "population_lake", spark, work / "secrets")
            result["scoring"] = scoring_run(spark, pop, work, args.patients)
            print(f"scoring: {result['scoring']}")
        print(f"saved {save_result(REPO / 'bench' / 'results', 'models', result)}")
    finally:
        spark.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
