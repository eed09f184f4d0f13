"""Benchmark: the record update's ANN against the usual imputers, on lab values hidden at random.

Per lake, panels of labs (``conf/features.yaml``: the latest value of each lab in its window, age,
sex, conditions) are taken at anchors: the feature rows' as-of dates (``--anchors features``) or
the end of every encounter (``--anchors encounters``: MIMIC's stays). Patients are split by a hash
of their key: the models learn from all rows of 70% of them; of each other patient, the latest
panel with two labs or more is the test row (``--every-row``: each of their panels), and
``--hide`` (20%) of its observed lab values are hidden at random (seeded). Every method
estimates the same hidden values:

- **ANN**: ``ehrlake.estimates.fit`` (a masked-value MLP per lab, 80% conformal intervals);
- **mean** of the training rows;
- **LOCF**, last observation carried forward: the patient's measurement of that lab before the
  hidden one (the panel's history column, ``estimates.history``; the mean where there is none,
  counted);
- **kNN** (scikit-learn ``KNNImputer``, 10 neighbours) and **MICE** (``IterativeImputer``), fitted
  on the same training rows, standardised, with the same context columns; and **MICE+history**,
  given each lab's previous value and its age as well, as the ANN is (``estimates.history``).

Reported per lab (at least 10 hidden values): RMSE over the training rows' standard deviation
(normalised RMSE; the mean scores about 1), and the ANN's 80% interval coverage. Aim: the ANN's
mean normalised RMSE at least 10% below MICE's (reported against both MICEs), coverage 75-85%.

Results: ``bench/results/record_update-<lake folder>-<date>.json``.

    .venv/bin/python bench/record_update.py --lake mimic-lake --anchors encounters --every-row
    .venv/bin/python bench/record_update.py --lake smart-lake
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

import ehrlake.lake  # noqa: E402
from ehrlake import estimates  # noqa: E402
from ehrlake.features import definitions, pointintime  # noqa: E402

MIN_HIDDEN = 10


def panels(lake, anchors: str, defs) -> pd.DataFrame:
    """Every anchor's panel (bounded by the lake: thousands of rows here), as the job builds it."""
    if anchors == "features":
        rows = lake.read(estimates.FEATURES)
    else:
        enc = lake.read("silver.encounter")
        index = enc.select(
            "patient_key", F.col("encounter_id").alias("index_id"),
            (F.coalesce("end_at", "start_at") + F.expr("INTERVAL 1 SECOND")).alias("index_time"),
        ).where(F.col("index_time").isNotNull() & F.col("patient_key").isNotNull())  # fmt: skip
        rows = pointintime.build(lake, index.dropDuplicates(["patient_key", "index_id"]), defs)
    # with each lab's history (the measurement before the latest): what the ANN reads besides the panel
    got = estimates.panel(lake, rows, list(defs.labs)).toPandas()
    return got.sort_values(["patient_key", "index_time"]).reset_index(drop=True)  # masks repeat run to run


def run(panel: pd.DataFrame, defs, hide: float, seed: int, every_row: bool = False) -> dict:
    """One repeat: a patient split and a hidden mask drawn from ``seed``, every method scored."""
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer

    names = list(defs.labs)
    cols = [f"last_{n}" for n in names]
    context = estimates.context_columns(list(panel.columns))
    codes = pd.util.hash_pandas_object(panel["patient_key"].astype(str) + f"#{seed}", index=False).to_numpy()
    is_test = (codes % 10) < 3
    train = panel[~is_test].reset_index(drop=True)
    candidates = panel[is_test & (panel[cols].notna().sum(axis=1) >= 2)]
    if not every_row:
        candidates = candidates.sort_values("index_time").groupby("patient_key").tail(1)
    test = candidates.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    mask = test[cols].notna().to_numpy() & (rng.random((len(test), len(cols))) < hide)
    hidden = test.copy()
    hidden[cols] = hidden[cols].mask(mask)
    truth = test[cols].to_numpy(float)

    mean = train[cols].mean().to_numpy()
    std = train[cols].std().replace(0, 1).fillna(1).to_numpy()
    started = time.perf_counter()
    ann = estimates.fit(train, names, seed)
    ann_s = time.perf_counter() - started
    got = ann.estimate(hidden.assign(input_hash=0)).set_index(["patient_key", "as_of", "lab"])

    def standard(frame, with_history: bool = False):
        parts = [(frame[cols].to_numpy(float) - mean) / std, np.nan_to_num(frame[context].to_numpy(float))]
        if with_history:  # each lab's previous value and its age, as the ANN reads them
            priors = frame[[f"prior_{n}" for n in names]].to_numpy(float)
            days = frame[[f"prior_days_{n}" for n in names]].to_numpy(float)
            parts += [(priors - mean) / std, np.log1p(np.clip(days, 0, None)) / np.log1p(3650.0)]
        return np.column_stack(parts)

    estimates_by = {}
    for method, imputer, with_history in (
        ("kNN", KNNImputer(n_neighbors=10, keep_empty_features=True), False),  # an empty lab keeps its column
        ("MICE", IterativeImputer(max_iter=10, random_state=seed, keep_empty_features=True), False),
        ("MICE+history", IterativeImputer(max_iter=10, random_state=seed, keep_empty_features=True), True),
    ):
        started = time.perf_counter()
        fitted = imputer.fit(standard(train, with_history))
        out = fitted.transform(standard(hidden, with_history))[:, : len(cols)] * std + mean
        estimates_by[method] = (out, time.perf_counter() - started)

    per_lab, fallbacks = {}, 0
    for j, lab in enumerate(names):
        rows = np.flatnonzero(mask[:, j])
        if len(rows) < MIN_HIDDEN:
            continue
        t = truth[rows, j]
        scale = std[j]
        ann_values, inside, ann_rows = [], 0, 0
        for i in rows:
            key = (test.at[i, "patient_key"], test.at[i, "index_time"], lab)
            if key in got.index:
                e = got.loc[key]
                ann_values.append(e["value"])
                inside += bool(e["low"] <= truth[i, j] <= e["high"])
                ann_rows += 1
            else:  # a lab without a model (too few training rows): the ANN falls back to the mean
                ann_values.append(mean[j])
        # LOCF: the panel's history of an observed lab is the measurement before it (estimates.history)
        before = test[f"prior_{lab}"].to_numpy(float)[rows]
        fallbacks += int(np.isnan(before).sum())
        carried = np.where(np.isnan(before), mean[j], before)
        nrmse = lambda v: float(np.sqrt(np.mean((np.asarray(v) - t) ** 2)) / scale)  # noqa: E731
        per_lab[lab] = {
            "hidden": len(rows),
            "ANN": nrmse(ann_values),
            "mean": nrmse(np.full(len(rows), mean[j])),
            "LOCF": nrmse(carried),
            "kNN": nrmse(estimates_by["kNN"][0][rows, j]),
            "MICE": nrmse(estimates_by["MICE"][0][rows, j]),
            "MICE+history": nrmse(estimates_by["MICE+history"][0][rows, j]),
            "ann_coverage_80": inside / ann_rows if ann_rows else None,
            "ann_inside": inside,
            "ann_intervals": ann_rows,
        }
    methods = ("ANN", "mean", "LOCF", "kNN", "MICE", "MICE+history")
    average = {m: float(np.mean([v[m] for v in per_lab.values()])) for m in methods} if per_lab else {}
    covered = sum(v["ann_inside"] for v in per_lab.values())
    intervals = sum(v["ann_intervals"] for v in per_lab.values())
    coverage = covered / intervals if intervals else None
    return {
        "seed": seed,
        "train_rows": len(train),
        "train_patients": int(train["patient_key"].nunique()),
        "test_patients": len(test),
        "hidden_values": int(mask.sum()),
        "locf_fell_back_to_mean": fallbacks,
        "ann_fit_s": round(ann_s, 1),
        "imputer_fit_s": {m: round(v[1], 1) for m, v in estimates_by.items()},
        "per_lab": per_lab,
        "mean_nrmse": average,
        "ann_vs_mice": (1 - average["ANN"] / average["MICE"]) if average else None,
        "ann_vs_mice_history": (1 - average["ANN"] / average["MICE+history"]) if average else None,
        "ann_coverage_80": coverage,
        "covered": covered,
        "intervals": intervals,
    }


def summary(repeats: list[dict]) -> dict:
    """Per method, the mean normalised RMSE averaged over repeats (with its range), and the ANN's
    interval coverage pooled over every hidden value."""
    repeats = [r for r in repeats if r["mean_nrmse"]]  # a repeat with too few hidden values per lab
    if not repeats:
        raise SystemExit(f"no lab had {MIN_HIDDEN} hidden values in any repeat: too few test panels")
    methods = list(repeats[0]["mean_nrmse"])
    nrmse = {m: [r["mean_nrmse"][m] for r in repeats] for m in methods}
    mean = {m: float(np.mean(v)) for m, v in nrmse.items()}
    coverage = sum(r["covered"] for r in repeats) / max(1, sum(r["intervals"] for r in repeats))
    return {
        "mean_nrmse": mean,
        "mean_nrmse_range": {m: [float(min(v)), float(max(v))] for m, v in nrmse.items()},
        "ann_vs_mice": 1 - mean["ANN"] / mean["MICE"],
        "ann_vs_mice_history": 1 - mean["ANN"] / mean["MICE+history"],
        "ann_coverage_80": coverage,
        "hidden_values": sum(r["hidden_values"] for r in repeats),
        "repeats_scored": len(repeats),
        "aims": {
            "ann_10pct_below_mice": mean["ANN"] <= 0.9 * mean["MICE"],
            "ann_10pct_below_mice_with_history": mean["ANN"] <= 0.9 * mean["MICE+history"],
            "coverage_75_85": 0.75 <= coverage <= 0.85,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", required=True)
    parser.add_argument("--anchors", choices=("features", "encounters"), default="features")
    parser.add_argument("--hide", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=5, help="patient splits and masks, seeds 1..N")
    parser.add_argument(
        "--every-row", action="store_true",
        help="test on every panel of a test patient, not only the latest (MIMIC: each stay's labs)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    lake = ehrlake.lake.open(str(Path(args.lake).resolve()))
    defs = definitions.load()
    panel = panels(lake, args.anchors, defs)
    repeats = [run(panel, defs, args.hide, seed, args.every_row) for seed in range(1, args.repeats + 1)]
    total = summary(repeats)
    labs = sorted({lab for r in repeats for lab in r["per_lab"]})
    methods = list(total["mean_nrmse"])
    for lab in labs:
        got = [r["per_lab"][lab] for r in repeats if lab in r["per_lab"]]
        hidden = sum(g["hidden"] for g in got)
        print(
            f"{lab:>18} {hidden:>5} hidden  "
            + "  ".join(f"{m} {np.mean([g[m] for g in got]):.3f}" for m in methods)
        )
    print("mean normalised RMSE: " + ", ".join(f"{m} {v:.3f}" for m, v in total["mean_nrmse"].items()))
    print(
        f"ANN {total['ann_vs_mice']:+.1%} below MICE, {total['ann_vs_mice_history']:+.1%} below MICE with "
        "the same history; "
        f"ANN 80% interval coverage {total['ann_coverage_80']:.1%}"
    )
    path = save_result(
        args.out,
        f"record_update-{Path(args.lake).resolve().name}",
        {"benchmark": "record_update", "lake": args.lake, "anchors": args.anchors, "hide": args.hide,
         "every_row": args.every_row,
         "panels": len(panel), "machine": machine(lake.spark), **total, "repeats": repeats},
    )  # fmt: skip
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
