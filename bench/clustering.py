"""Benchmark: silver tables clustered by patient_key (the clean job's layout) against unclustered.

Generated Synthea CSV patients (copies of the sample patients: volume only) are ingested once;
then the clean job rebuilds silver without and with clustering, alternating. Reported for each: the
clean job's seconds, and for the big silver tables the data files and how many of them a reader
after one patient must open, judged by the files' min/max statistics of patient_key in the Delta
log (what Delta's data skipping uses), averaged over sampled patients; and the seconds of one-patient
queries through ``spark.table`` by name (Delta's reader, data skipping on). Results go to
``bench/results/clustering-<date>.json``. Needs the Delta JARs (``make setup``).

    .venv/bin/python bench/clustering.py [--patients 10000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

import pyarrow as pa  # noqa: E402
from _lake import machine, save_result, secured_lake  # noqa: E402
from deltalake import DeltaTable  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from ehrlake import clean, config, ingest, synth  # noqa: E402
from ehrlake.ingest import SourceKind  # noqa: E402
from ehrlake.session import LAKE_CATALOG, get_spark  # noqa: E402

TABLES = ("encounters", "conditions", "observations", "medications", "procedures")
SILVER = ("observation", "encounter", "condition", "medication", "procedure")
LOOKUPS = 20


def layout(lake, table: str, keys: list[str]) -> dict:
    """Data files of ``table``, and the mean number whose patient_key range holds each of ``keys``."""
    adds = pa.table(DeltaTable(lake.path(f"silver.{table}")).get_add_actions(flatten=True)).to_pydict()
    ranges = list(zip(adds["min.patient_key"], adds["max.patient_key"], strict=True))
    touched = [sum(1 for lo, hi in ranges if lo is None or lo <= k <= hi) for k in keys]
    return {"files": len(ranges), "files_per_patient": round(statistics.mean(touched), 2)}


def one_run(spark, lake, cluster: bool, keys: list[str]) -> dict:
    started = time.perf_counter()
    clean.run(lake, cluster=cluster)
    seconds = time.perf_counter() - started
    tables = {t: layout(lake, t, keys) for t in SILVER if lake.exists(f"silver.{t}")}
    query = []
    for key in keys:
        began = time.perf_counter()
        spark.table("silver.observation").where(F.col("patient_key") == key).count()
        query.append(time.perf_counter() - began)
    return {"clean_seconds": seconds, "tables": tables, "lookup_seconds": statistics.median(query)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each layout (alternating)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    spark = get_spark(config.Config(lake=config.LakeConfig(engine="native")))  # Delta JARs loaded
    if spark.conf.get("spark.sql.catalog.spark_catalog", "") != LAKE_CATALOG:
        print("the lake catalog is not on Spark's class path: make setup builds it", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-clustering-"))
    synth.run(spark, args.patients, str(work / "in"), seed=11, tables=TABLES)
    lake = secured_lake(work / "lake", spark, work / "secrets", "auto")
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(work / "in"))
    keys = [
        r.patient_key
        for r in lake.read("bronze.synthea_patients")
        .select("patient_key")
        .sample(0.05, seed=3)
        .limit(LOOKUPS)
        .collect()
    ]
    runs = {"unclustered": [], "clustered": []}
    for i in range(args.repeat):
        for name in ("unclustered", "clustered") if i % 2 == 0 else ("clustered", "unclustered"):
            runs[name].append(one_run(spark, lake, name == "clustered", keys))
    result = {
        "benchmark": "clustering",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(spark),
        "patients": args.patients,
        "conditions": f"--patients {args.patients} --repeat {args.repeat}; lookups of {LOOKUPS} patients",
        "runs": {name: results[-1] for name, results in runs.items()},
        "clean_seconds_median": {
            n: statistics.median(r["clean_seconds"] for r in rs) for n, rs in runs.items()
        },
    }
    base, new = result["runs"]["unclustered"], result["runs"]["clustered"]
    result["ratio_clustered_to_unclustered"] = {
        "clean_seconds": round(
            result["clean_seconds_median"]["clustered"] / result["clean_seconds_median"]["unclustered"], 3
        ),
        "lookup_seconds": round(new["lookup_seconds"] / base["lookup_seconds"], 3),
    }
    print(f"{args.patients:,} patients")
    for name, run in result["runs"].items():
        tables = ", ".join(f"{t} {v['files_per_patient']}/{v['files']}" for t, v in run["tables"].items())
        timing = f"clean {run['clean_seconds']:.1f}s; lookup {run['lookup_seconds']:.2f}s"
        print(f"  {name:<12} {timing}; files per patient / files: {tables}")
    print(f"  clustered / unclustered: {result['ratio_clustered_to_unclustered']}")
    print(f"saved {save_result(args.out, 'clustering', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
