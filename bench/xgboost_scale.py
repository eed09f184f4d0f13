"""Benchmark: where distributed XGBoost starts to pay, by the number of training rows.

``bench/models.py`` compares ``xgboost.spark`` with single-process ``xgboost`` on the 24,000
training stays of the shipped Diabetes 130-US extract, where one process wins by far. Here the
same training rows are copied up to ``--rows`` (volume only: copies add no information, so the
held-out AUROC says only that each mode learnt the same model) and written once as Parquet; then
each mode trains on them with the same parameters, each in a fresh process of its own so that its
peak memory (the process and its children, the JVM included, sampled every 0.2 s) is its own:

- ``spark``: ``SparkXGBClassifier``, 2 workers, reading the Parquet in Spark (local mode here);
- ``single``: the Parquet read into one NumPy array, ``xgboost.train`` with 2 threads;
- ``external``: xgboost's external memory (``ExtMemQuantileDMatrix`` over the Parquet files one
  at a time, its pages cached on disk): one process whose memory need not hold every row.

Timed: from reading the Parquet to a trained booster (the Spark session's start is reported
apart: a cluster's job has it anyway). The AUROC is on the real held-out patients of the extract,
never on copies. Results: ``bench/results/xgboost_scale-<date>.json``.

    .venv/bin/python bench/xgboost_scale.py [--rows 1000000,4000000] [--rounds 200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

PARAMS = {
    "max_depth": 5,
    "learning_rate": 0.05,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 5,
    "tree_method": "hist",
    "max_bin": 256,
}  # fmt: skip  bench/models.py's
MODES = ("single", "external", "spark")
THREADS = 2


class PeakMemory:
    """Peak resident memory of this process and its descendants (a JVM too), sampled."""

    def __init__(self, every: float = 0.2):
        import psutil

        self._me, self._every, self.peak = psutil.Process(), every, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._done.is_set():
            total = 0
            for p in [self._me, *self._me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a child that ended meanwhile
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._done.wait(self._every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def prepare(work: Path, sizes: list[int], driver_memory: str) -> dict:
    """The extract's features; its training rows copied to each size, and its held-out rows,
    as Parquet under ``work``. Returns what the modes need to know."""
    from _lake import machine, secured_lake
    from pyspark.sql import functions as F

    from ehrlake import config, features, ingest
    from ehrlake.ingest import SourceKind
    from ehrlake.models.train import split, with_weights
    from ehrlake.session import get_spark

    conf = config.Config()
    conf.spark.conf["spark.driver.memory"] = driver_memory
    spark = get_spark(conf)
    try:
        lake = secured_lake(work / "d130", spark, work / "secrets")
        extract = str(REPO / "data/sample/diabetes_130_us")
        ingest.run(lake, SourceKind.CSV_EXTRACT, extract, extract="diabetes130")
        features.run(lake)
        t = features.task("diabetes130_readmission_30d")
        cols = features.model_inputs(t)
        train_df, test_df = split(features.training_frame(lake, t), seed=42)
        n = train_df.count()
        pos = train_df.where("label = 1").count()
        numeric = [F.col(c).cast("float").alias(c) for c in cols]
        rows = with_weights(train_df, (n - pos) / pos).select(*numeric, "label", "weight").cache()
        rows.count()
        test_df.select(*numeric, "label").coalesce(1).write.parquet(str(work / "test"))
        for size in sizes:
            copies = -(-size // n)
            amplified = rows.crossJoin(spark.range(copies).withColumnRenamed("id", "_copy")).drop("_copy")
            files = max(4, size // 250_000)  # ~250k rows a file: what a feature table's files hold
            amplified.limit(size).repartition(files).write.parquet(str(work / f"rows-{size}"))
        return {"features": cols, "training_rows_real": n, "machine": machine(spark)}
    finally:
        spark.stop()


def _auroc(booster, test: Path, cols: list[str]) -> float:
    """The booster's AUROC on the held-out rows (real patients), however it was trained."""
    import pyarrow.parquet as pq
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    table = pq.read_table(test)
    labels = table.column("label").to_numpy()
    return float(roc_auc_score(labels, booster.predict(xgb.DMatrix(_numpy(table, cols)))))


def _numpy(table, cols):
    import numpy as np

    return np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in cols]).astype("float32")


def run_single(rows: Path, test: Path, cols: list[str], rounds: int, external: bool) -> dict:
    import pyarrow.parquet as pq
    import xgboost as xgb

    started = time.perf_counter()
    if external:
        files = sorted(rows.glob("*.parquet"))
        cache = Path(tempfile.mkdtemp(prefix="xgb-extmem-"))

        class Files(xgb.DataIter):
            """The Parquet files one at a time: only one file's rows in memory at once."""

            def __init__(self):
                self._i = 0
                super().__init__(cache_prefix=str(cache / "cache"))

            def next(self, input_data) -> bool:
                if self._i == len(files):
                    return False
                table = pq.read_table(files[self._i])
                input_data(
                    data=_numpy(table, cols),
                    label=table.column("label").to_numpy(),
                    weight=table.column("weight").to_numpy(),
                )
                self._i += 1
                return True

            def reset(self) -> None:
                self._i = 0

        matrix = xgb.ExtMemQuantileDMatrix(Files(), max_bin=PARAMS["max_bin"])
    else:
        table = pq.read_table(rows)
        matrix = xgb.QuantileDMatrix(
            _numpy(table, cols),
            label=table.column("label").to_numpy(),
            weight=table.column("weight").to_numpy(),
            max_bin=PARAMS["max_bin"],
        )
        del table
    loaded = time.perf_counter() - started
    params = {**PARAMS, "objective": "binary:logistic", "nthread": THREADS, "seed": 42}
    booster = xgb.train(params, matrix, num_boost_round=rounds)
    seconds = time.perf_counter() - started
    if external:
        shutil.rmtree(cache, ignore_errors=True)
    auroc = _auroc(booster, test, cols)
    return {"seconds": round(seconds, 1), "load_seconds": round(loaded, 1), "auroc": round(auroc, 4)}


def run_spark(rows: Path, test: Path, cols: list[str], rounds: int, driver_memory: str) -> dict:
    from pyspark.ml.feature import VectorAssembler
    from xgboost.spark import SparkXGBClassifier

    from ehrlake import config
    from ehrlake.session import get_spark

    started = time.perf_counter()
    conf = config.Config()
    conf.spark.conf["spark.driver.memory"] = driver_memory
    spark = get_spark(conf)
    session = time.perf_counter() - started
    try:
        started = time.perf_counter()
        assemble = VectorAssembler(inputCols=cols, outputCol="features", handleInvalid="keep")
        train = assemble.transform(spark.read.parquet(str(rows)))
        params = {k: v for k, v in PARAMS.items() if k != "max_bin"}
        model = SparkXGBClassifier(
            features_col="features", label_col="label", weight_col="weight", num_workers=THREADS,
            n_estimators=rounds, seed=42, max_bin=PARAMS["max_bin"], **params,
        ).fit(train)  # fmt: skip
        seconds = time.perf_counter() - started
        booster = model.get_booster()  # the trained model, scored here like the others'
    finally:
        spark.stop()
    auroc = _auroc(booster, test, cols)
    return {"seconds": round(seconds, 1), "session_seconds": round(session, 1), "auroc": round(auroc, 4)}


def one_mode(args) -> int:
    """A child process: one mode on one size; prints its result as JSON on the last line."""
    meta = json.loads((args.work / "meta.json").read_text())
    rows, test = args.work / f"rows-{args.size}", args.work / "test"
    with PeakMemory() as memory:
        if args.mode == "spark":
            result = run_spark(rows, test, meta["features"], args.rounds, args.driver_memory)
        else:
            result = run_single(rows, test, meta["features"], args.rounds, args.mode == "external")
    result["peak_rss_gb"] = round(memory.peak / 2**30, 2)
    print(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,4000000", help="training rows per size (copies)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: temporary)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # the child process's
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return one_mode(args)
    sizes = [int(s) for s in args.rows.split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="ehrlake-bench-xgb-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        meta = prepare(work, sizes, args.driver_memory)
        (work / "meta.json").write_text(json.dumps(meta))
        result = {
            "benchmark": "xgboost_scale",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": meta["machine"],
            "params": {**PARAMS, "rounds": args.rounds, "threads_or_workers": THREADS},
            "features": len(meta["features"]),
            "training_rows_real": meta["training_rows_real"],
            "sizes": {},
        }
        for size in sizes:
            found = {}
            for mode in args.modes.split(","):
                command = [sys.executable, __file__, "--mode", mode, "--size", str(size), "--work", str(work),
                           "--rounds", str(args.rounds), "--driver-memory", args.driver_memory]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
                if done.returncode:
                    found[mode] = {"failed": done.stderr.strip().splitlines()[-1:]}
                else:
                    found[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{size:>11,} rows  {mode:<9} {found[mode]}", flush=True)
            single = found.get("single", {}).get("seconds")
            for mode in ("spark", "external"):
                if single and found.get(mode, {}).get("seconds"):
                    found[f"{mode}_vs_single"] = round(found[mode]["seconds"] / single, 2)
            result["sizes"][str(size)] = found
        sys.path.insert(0, str(REPO / "bench"))
        from _lake import save_result

        print(f"saved {save_result(REPO / 'bench' / 'results', 'xgboost_scale', result)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "bench"))
    sys.exit(main())
