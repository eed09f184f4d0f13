"""Benchmark: each programme's progress hierarchy against XGBoost, and how stable its leaves are.

Per programme of ``conf/hierarchy.yaml`` with a tree on the lake (docs/hierarchy.md):

1. **Discrimination**: the tree exactly as ``ehrlake hierarchy build`` fits it (depth <= 4, leaves of
   k patients) and XGBoost (``xgboost.spark``, depth 3, 200 rounds) on the same inputs, the same
   filled values and the same patient split; test AUROC of each with a patient-level bootstrap
   interval (``evaluate.metrics``). Aim: the tree within 0.03 of XGBoost.
2. **Stability**: ``--refits`` (20) trees fitted on bootstrap resamples of the training patients
   (each patient drawn with replacement, all their rows with them), every cohort row placed by each;
   agreement with the build's tree is the share of row pairs that both trees put together or both
   apart (Rand index), and its chance-corrected form (adjusted Rand index). Aim: agreement >= 0.8.
   Leaf ids differ between trees, so pairs, not ids, are compared; the rows placed are at most
   ``--max-rows`` (a seeded sample), the only thing brought to the driver.

With ``--diabetes130``, the same two measures on a population whose outcome is real: the Diabetes
130-US extract's stays (real records of diabetic inpatients) and their recorded 30-day
readmission (:func:`diabetes130`); the programmes' own outcomes on the bundled Synthea data carry
too little signal to tell a good method from a bad one (docs/hierarchy.md).

Results: ``bench/results/hierarchy-<lake folder>-<date>.json``.

    .venv/bin/ehrlake pipeline conf/pipelines/smart_programmes.yaml --lake smart-lake
    .venv/bin/python bench/hierarchy.py --lake smart-lake
    .venv/bin/ehrlake ingest --source csv-extract --extract diabetes130 \\
        --input data/sample/diabetes_130_us --lake d130
    .venv/bin/python bench/hierarchy.py --lake d130 --diabetes130
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result  # noqa: E402
from pyspark.ml.functions import vector_to_array  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

import ehrlake.lake  # noqa: E402
from ehrlake import hierarchy  # noqa: E402
from ehrlake.clean.codes import lookup  # noqa: E402
from ehrlake.errors import EhrlakeError  # noqa: E402
from ehrlake.models import algorithms, evaluate  # noqa: E402
from ehrlake.models.train import split  # noqa: E402


def rand_indices(a: list, b: list) -> tuple[float, float]:
    """(Rand index, adjusted Rand index) of two labellings of the same rows."""
    from sklearn.metrics import adjusted_rand_score, rand_score

    return float(rand_score(a, b)), float(adjusted_rand_score(a, b))


def resample(train, seed: int):
    """The training rows of a bootstrap sample of their patients: each patient's rows repeated as
    many times as the patient is drawn (``evaluate.poisson_weight`` of the key: about once each)."""
    copies = evaluate.poisson_weight(F.col("patient_key"), seed=seed)
    repeated = train.select("*", F.posexplode(F.array_repeat(F.lit(0), copies)).alias("_copy", "_drawn"))
    # a patient drawn twice is two patients for the leaf-size rule, as in any bootstrap
    copy = F.col("_copy").cast("string")
    return (
        repeated.withColumn("patient_key", F.concat_ws("#", "patient_key", copy))
        .withColumn(hierarchy.PERSON, F.concat_ws("#", hierarchy.PERSON, copy))
        .drop("_copy", "_drawn")
    )


def one(lake, settings, p, refits: int, max_rows: int) -> dict:
    """A programme of ``conf/hierarchy.yaml`` on the lake's point-in-time feature rows."""
    rows = hierarchy.with_people(lake, hierarchy.programme_rows(lake, p))
    names = hierarchy.inputs(p, rows.columns)
    placed = lambda tree, fill: hierarchy.placed(lake, p, tree, names, fill)  # noqa: E731
    return compare(p.name, rows, names, settings, placed, ["patient_key", "index_time"], refits, max_rows)


def diabetes130(lake, settings, refits: int, max_rows: int) -> dict:
    """A population with a real outcome: the Diabetes 130-US extract's inpatient stays of diabetic
    patients (UCI, real records of 130 US hospitals) and their recorded 30-day readmission, on the
    features the readmission models learn from (``features/diabetes130.py``). Its stays have no
    dates, so it is not a programme of the yearly feature rows: the same tree fitting, on the
    same k-patient leaves, where a signal is known to exist (Strack et al. 2014)."""
    from ehrlake.features import DIABETES130_BRONZE
    from ehrlake.features import diabetes130 as d130

    if not lake.exists(DIABETES130_BRONZE):
        raise EhrlakeError(f"no {DIABETES130_BRONZE}: ingest --source csv-extract --extract diabetes130")
    rows = d130.build(lake.read(DIABETES130_BRONZE)).where(F.col("label").isNotNull())
    rows = rows.withColumn(hierarchy.PERSON, F.col("patient_key"))
    names = list(d130.FEATURES)
    placed = lambda tree, fill: hierarchy.filled(rows, names, fill).withColumn(  # noqa: E731
        "node", hierarchy.leaf_of(tree)
    )
    name = "diabetes130_readmission_30d"
    return compare(name, rows, names, settings, placed, ["index_id"], refits, max_rows)


def compare(name, rows, names, settings, placed, order: list[str], refits: int, max_rows: int) -> dict:
    """The tree against XGBoost on ``rows`` (``label``, ``patient_key``, the person), and its
    leaves' agreement across bootstrap refits over the rows ``placed(tree, fill)`` puts in a node."""
    train, test = split(rows, settings.seed)
    train = train.cache()
    counts = train.agg(F.count("*"), F.countDistinct(hierarchy.PERSON), F.sum("label")).first()
    if not 0 < (counts[2] or 0) < counts[0]:
        train.unpersist()
        raise EhrlakeError(f"{name}: {counts[2] or 0} of {counts[0]} training rows with the outcome")
    fill = hierarchy.medians(train, names)
    fitted = hierarchy.filled(train, names, fill).cache()
    started = time.perf_counter()
    model, tree, min_rows, _ = hierarchy.fit(fitted, names, settings, name, (counts[2], counts[0]))
    tree_s = time.perf_counter() - started
    risk = {n.node_id: n.probability for n in tree if n.leaf}
    scored = hierarchy.filled(test, names, fill).withColumn("_leaf", hierarchy.leaf_of(tree))
    tree_pred = scored.withColumn("score", lookup(risk, F.col("_leaf"))).cache()
    rate = counts[2] / counts[0]
    tree_metrics = evaluate.metrics(tree_pred, rate)

    pipe, grid = algorithms.pipeline("xgboost", names, settings.seed, grid="small")
    started = time.perf_counter()
    xgb = pipe.fit(fitted.withColumn("weight", F.lit(1.0)), params=grid[0])  # depth 3, 200 rounds
    xgb_s = time.perf_counter() - started
    xgb_pred = (
        xgb.transform(hierarchy.filled(test, names, fill))
        .withColumn("score", vector_to_array("probability")[1])
        .cache()
    )
    xgb_metrics = evaluate.metrics(xgb_pred, rate)

    cohort = placed(tree, fill)
    total = cohort.count()
    sample = cohort.sample(fraction=min(1.0, max_rows / max(total, 1)), seed=settings.seed).cache()
    base = [r.node for r in sample.orderBy(*order).select("node").collect()]
    agreements, adjusted, leaves = [], [], []
    for i in range(refits):
        again = hierarchy.filled(resample(train, settings.seed + 1 + i), names, fill)
        try:
            _, other, _, _ = hierarchy.fit(again, names, settings, name)
        except EhrlakeError:
            continue  # a resample with no tree of k-patient leaves: counted below
        got = sample.select(*order, hierarchy.leaf_of(other).alias("_other"))
        refit = [r._other for r in got.orderBy(*order).select("_other").collect()]
        rand, ari = rand_indices(base, refit)
        agreements.append(rand)
        adjusted.append(ari)
        leaves.append(sum(n.leaf for n in other))
    for frame in (train, fitted, tree_pred, xgb_pred, sample):
        frame.unpersist()
    if not tree_metrics:
        raise EhrlakeError(f"{name}: no test rows")
    auroc = tree_metrics["auroc"]["value"], xgb_metrics["auroc"]["value"]
    return {
        "programme": name,
        "train_rows": counts[0],
        "train_patients": counts[1],
        "train_outcome_rate": round(rate, 4),
        "test_rows": tree_metrics["auroc"]["n"],
        "test_positives": tree_metrics["auroc"]["positives"],
        "tree": {
            "leaves": len(risk),
            "min_leaf_rows": min_rows,
            "fit_s": round(tree_s, 1),
            "leaf_rules": {
                hierarchy.rule_words(n, lambda f, op, t: f"{f} {op} {t:.4g}"): round(n.probability, 4)
                for n in tree
                if n.leaf
            },
            **tree_metrics,
        },
        "xgboost": {"max_depth": 3, "rounds": 200, "fit_s": round(xgb_s, 1), **xgb_metrics},
        "auroc_gap": None if None in auroc else round(auroc[1] - auroc[0], 4),
        "auroc_within_0_03": None if None in auroc else auroc[1] - auroc[0] <= 0.03,
        "stability": {
            "refits": refits,
            "refits_with_a_tree": len(agreements),
            "rows_compared": len(base),
            "rand_index_mean": round(statistics.mean(agreements), 4) if agreements else None,
            "rand_index_min": round(min(agreements), 4) if agreements else None,
            "adjusted_rand_mean": round(statistics.mean(adjusted), 4) if adjusted else None,
            "leaves_per_refit": sorted(leaves),
            "aim_met": bool(agreements) and statistics.mean(agreements) >= 0.8,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", required=True, help="a lake with gold.features_patient")
    parser.add_argument("--programme", action="append", help="one programme (default: every one)")
    parser.add_argument(
        "--diabetes130",
        action="store_true",
        help="the Diabetes 130-US stays and their real 30-day readmission (the lake's extract); "
        "with --programme, those programmes too",
    )
    parser.add_argument("--refits", type=int, default=20)
    parser.add_argument("--max-rows", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    lake = ehrlake.lake.open(str(Path(args.lake).resolve()))
    settings = hierarchy.load()
    results, skipped = [], {}
    programmes = args.programme or ([] if args.diabetes130 else list(settings.programmes))
    runs = {n: functools.partial(one, lake, settings, settings.programme(n)) for n in programmes}
    if args.diabetes130:
        runs["diabetes130_readmission_30d"] = functools.partial(diabetes130, lake, settings)
    for name, bench in runs.items():
        try:
            result = bench(args.refits, args.max_rows)
        except EhrlakeError as e:
            skipped[name] = str(e)
            print(f"{name}: skipped ({e})")
            continue
        results.append(result)
        t, x, s = result["tree"]["auroc"], result["xgboost"]["auroc"], result["stability"]
        print(
            f"{name}: tree AUROC {evaluate.format_value(t['value'])} ({evaluate.format_value(t['ci_low'])}-"
            f"{evaluate.format_value(t['ci_high'])}), XGBoost {evaluate.format_value(x['value'])} "
            f"({evaluate.format_value(x['ci_low'])}-{evaluate.format_value(x['ci_high'])}); "
            f"leaf agreement over {s['refits_with_a_tree']} refits: Rand {s['rand_index_mean']}, "
            f"adjusted {s['adjusted_rand_mean']}"
        )
    path = save_result(
        args.out,
        f"hierarchy-{Path(args.lake).resolve().name}",
        {"benchmark": "hierarchy", "lake": str(args.lake), "machine": machine(lake.spark),
         "programmes": results, "skipped": skipped},
    )  # fmt: skip
    print(f"results: {path}")
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
