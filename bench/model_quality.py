"""Benchmark: readmission model quality on patients the models never saw, per learner and feature set.

On a lake holding the Diabetes 130-US extract (the shared 30% subset: real stays of diabetic
inpatients of 130 US hospitals and their recorded 30-day readmission), the stays are split by
patient exactly as ``ehrlake train`` splits them (``models.train.split``: 20% of patients held
out). For each learner (XGBoost, L1 logistic regression, random forest; each at the first point
of its ``small`` grid, so no choice is made on these numbers) and each feature set:

- **CV**: patient-grouped ``--folds``-fold cross-validation on the training patients, AUROC per
  fold (mean and range);
- **held out**: fitted on every training patient, AUROC on the held-out ones with a
  patient-level bootstrap interval (``evaluate.metrics``).

Feature sets: ``stay`` (the stay and the counts of the year before, Strack et al. 2014) and
``stay+history`` (with the patient's earlier encounters in the extract, ``diabetes130.HISTORY``).
Issue 21's aim: held-out AUROC >= 0.70 for the best model, its CV mean within 0.01 of it.

Results: ``bench/results/model_quality-<lake folder>-<date>.json``.

    .venv/bin/ehrlake ingest --source csv-extract --extract diabetes130 \\
        --input data/sample/diabetes_130_us --lake d130
    .venv/bin/python bench/model_quality.py --lake d130
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result  # noqa: E402
from pyspark.ml.evaluation import BinaryClassificationEvaluator  # noqa: E402
from pyspark.ml.functions import vector_to_array  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

import ehrlake.lake  # noqa: E402
from ehrlake.errors import EhrlakeError  # noqa: E402
from ehrlake.features import DIABETES130_BRONZE  # noqa: E402
from ehrlake.features import diabetes130 as d130  # noqa: E402
from ehrlake.models import algorithms, evaluate  # noqa: E402
from ehrlake.models.train import split, with_weights  # noqa: E402

FEATURE_SETS = {
    "stay": [f for f in d130.FEATURES if f not in d130.HISTORY],
    "stay+history": list(d130.FEATURES),
}


def fit(algorithm: str, features: list[str], rows, seed: int):
    """The learner at the first point of its small grid, classes weighted as ``train`` weights them."""
    positives, n = rows.agg(F.sum("label"), F.count("*")).first()
    pipe, grid = algorithms.pipeline(algorithm, features, seed, grid="small")
    return pipe.fit(with_weights(rows, (n - positives) / positives), params=grid[0])


def scored(model, rows):
    return model.transform(rows).withColumn("score", vector_to_array("probability")[1])


def one(algorithm: str, features: list[str], train, test, folds: int, seed: int, rate: float) -> dict:
    auroc = BinaryClassificationEvaluator(rawPredictionCol="score", labelCol="label")
    per_fold = []
    started = time.perf_counter()
    for fold in range(folds):
        model = fit(algorithm, features, train.where(F.col("cv_fold") != fold), seed)
        per_fold.append(auroc.evaluate(scored(model, train.where(F.col("cv_fold") == fold))))
    held = evaluate.metrics(scored(fit(algorithm, features, train, seed), test), rate)["auroc"]
    return {
        "cv_auroc_mean": round(statistics.mean(per_fold), 4),
        "cv_auroc_range": [round(min(per_fold), 4), round(max(per_fold), 4)],
        "test_auroc": round(held["value"], 4),
        "test_auroc_ci": [round(held["ci_low"], 4), round(held["ci_high"], 4)],
        "test_rows": held["n"],
        "test_positives": held["positives"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", required=True, help="a lake with bronze.diabetes130_encounters")
    parser.add_argument("--algorithms", default=",".join(algorithms.ALGORITHMS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    lake = ehrlake.lake.open(str(Path(args.lake).resolve()))
    if not lake.exists(DIABETES130_BRONZE):
        raise EhrlakeError(f"no {DIABETES130_BRONZE}: ingest --source csv-extract --extract diabetes130")
    rows = d130.build(lake.read(DIABETES130_BRONZE)).where(F.col("label").isNotNull())
    train, test = split(rows, args.seed, folds=args.folds)
    train, test = train.cache(), test.cache()
    positives, n = train.agg(F.sum("label"), F.count("*")).first()
    table = {}
    for algorithm in args.algorithms.split(","):
        for name, features in FEATURE_SETS.items():
            got = one(algorithm, features, train, test, args.folds, args.seed, positives / n)
            table[f"{algorithm} / {name}"] = got
            print(
                f"{algorithm:8} {name:13} CV AUROC {got['cv_auroc_mean']:.3f} "
                f"({got['cv_auroc_range'][0]:.3f}-{got['cv_auroc_range'][1]:.3f}), held out "
                f"{got['test_auroc']:.3f} ({got['test_auroc_ci'][0]:.3f}-{got['test_auroc_ci'][1]:.3f}), "
                f"{got['seconds']:.0f} s",
                flush=True,
            )
    best = max(table, key=lambda k: table[k]["test_auroc"])
    aims = {
        "best": best,
        "best_test_auroc_at_least_0_70": table[best]["test_auroc"] >= 0.70,
        "cv_mean_within_0_01_of_test": abs(table[best]["cv_auroc_mean"] - table[best]["test_auroc"]) <= 0.01,
    }
    print(f"best: {best}; aims: {aims}")
    path = save_result(
        args.out,
        f"model_quality-{Path(args.lake).resolve().name}",
        {"benchmark": "model_quality", "lake": str(args.lake), "machine": machine(lake.spark),
         "train_rows": n, "train_positives": positives, "folds": args.folds, "seed": args.seed,
         "features": {k: len(v) for k, v in FEATURE_SETS.items()}, "table": table, "aims": aims},
    )  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
