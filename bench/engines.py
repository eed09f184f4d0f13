"""Benchmark: the two commit engines on the same work, in one SparkSession and one run.

For each size, generated Synthea CSV patients (copies of the sample patients: volume only) go
through ingest and clean, then a 1% increment of new patients is ingested (a merge into every
bronze table), ``clean --incremental`` brings silver up to date, and a full clean rebuilds it (the
baseline the incremental clean is measured against, in the same run; both must leave the same row
counts), on a fresh lake per engine; the engines alternate run by run so drift hits both.
Reported per stage: seconds (median of --repeat), files and bytes in the lake afterwards, and the
ratio native / delta-rs (below 1: native faster). Also the increment's cost against the full
ingest and the incremental clean's against the rebuild, since that is what a nightly pipeline pays.
Results go to ``bench/results/engines-<date>.json``. Needs the Delta JARs (``make setup``).

    .venv/bin/python bench/engines.py [--patients 1000,10000] [--repeat 1] [--engines delta-rs,native]
                                      [--driver-memory 8g]   (100,000 patients need more than 2g)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result, secured_lake  # noqa: E402

from ehrlake import clean, config, ingest, synth  # noqa: E402
from ehrlake.ingest import SourceKind  # noqa: E402
from ehrlake.lake import _native  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402

ENGINES = ("delta-rs", "native")
TABLES = ("encounters", "conditions", "observations", "medications", "procedures")
STAGES = ("ingest", "clean", "ingest_increment", "clean_incremental", "clean_rebuild")


def lake_size(root: Path) -> tuple[int, int]:
    """(data files, bytes) under a lake root, Delta logs included in the bytes."""
    files = total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            total += os.path.getsize(os.path.join(folder, name))
            files += name.endswith(".parquet")
    return files, total


def one_run(spark, engine: str, base: Path, increment: Path, work: Path) -> dict:
    lake = secured_lake(work / "lake", spark, work / "secrets", engine)
    seconds = {}
    for stage, action in (
        ("ingest", lambda: ingest.run(lake, SourceKind.SYNTHEA_CSV, str(base))),
        ("clean", lambda: clean.run(lake)),
        ("ingest_increment", lambda: ingest.run(lake, SourceKind.SYNTHEA_CSV, str(increment))),
        ("clean_incremental", lambda: clean.run(lake, incremental=True)),
        ("clean_rebuild", lambda: clean.run(lake)),
    ):
        started = time.perf_counter()
        report = action()
        seconds[stage] = time.perf_counter() - started
        if stage.startswith("ingest"):
            assert report.balanced, f"{engine} {stage}: counts do not add up"
        if stage == "clean_incremental":
            merged = (dict(report.rows), dict(report.flagged))  # carried from the last run's counts
            assert any(h.startswith("merged") for h in report.how.values()), report.how
        if stage == "clean_rebuild":  # counted over the tables
            rebuilt = (report.rows, report.flagged)
            assert rebuilt == merged, f"{engine}: incremental {merged} != rebuilt {rebuilt}"
    files, size = lake_size(work / "lake")
    rows = {t.name: t.rows for t in lake.tables() if t.layer in ("bronze", "silver")}
    return {"seconds": seconds, "files": files, "bytes": size, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", default="1000,10000", help="sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each engine per size (alternating)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="which, comma-separated")
    parser.add_argument("--driver-memory", help="the local driver's heap (spark.driver.memory)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    engines = tuple(e for e in ENGINES if e in args.engines.split(","))
    settings = config.Config(lake=config.LakeConfig(engine="native"))  # Delta JARs loaded
    if args.driver_memory:
        settings.spark.conf["spark.driver.memory"] = args.driver_memory
    spark = get_spark(settings)
    if not _native.available(spark):
        print("the Delta Lake JARs are not on Spark's class path: make setup fetches them", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-engines-"))
    result = {
        "benchmark": "engines",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(spark),
        "sizes": {},
    }
    try:
        for patients in (int(p) for p in args.patients.split(",")):
            base, increment = work / f"in-{patients}", work / f"inc-{patients}"
            synth.run(spark, patients, str(base), seed=11, tables=TABLES)
            synth.run(spark, max(patients // 100, 1), str(increment), seed=12, tables=TABLES)
            runs = {engine: [] for engine in engines}
            for i in range(args.repeat):
                for engine in engines if i % 2 == 0 else reversed(engines):
                    runs[engine].append(
                        one_run(spark, engine, base, increment, work / f"{engine}-{patients}-{i}")
                    )
                    shutil.rmtree(work / f"{engine}-{patients}-{i}" / "lake", ignore_errors=True)
            first = runs[engines[0]][0]["rows"]
            assert all(runs[e][0]["rows"] == first for e in engines), "the engines wrote different tables"
            size = {}
            for engine in engines:
                size[engine] = {
                    stage: round(statistics.median(r["seconds"][stage] for r in runs[engine]), 2)
                    for stage in STAGES
                }
                size[engine]["files"] = runs[engine][0]["files"]
                size[engine]["bytes"] = runs[engine][0]["bytes"]
            if len(engines) == 2:
                size["ratio_native_to_delta_rs"] = {
                    stage: round(size["native"][stage] / size["delta-rs"][stage], 3) for stage in STAGES
                }
            size["increment_to_full_ingest"] = {
                engine: round(size[engine]["ingest_increment"] / size[engine]["ingest"], 3)
                for engine in engines
            }
            size["incremental_to_rebuild_clean"] = {
                engine: round(size[engine]["clean_incremental"] / size[engine]["clean_rebuild"], 3)
                for engine in engines
            }
            size["rows"] = sum(first.values())
            result["sizes"][str(patients)] = size
            print(f"{patients:,} patients ({size['rows']:,} bronze and silver rows)")
            for engine in engines:
                stages = ", ".join(f"{s} {size[engine][s]:.1f}s" for s in STAGES)
                print(
                    f"  {engine:<8} {stages}; {size[engine]['files']} files, "
                    f"{size[engine]['bytes'] / 1e6:.1f} MB"
                )
            if len(engines) == 2:
                print(f"  native / delta-rs: {size['ratio_native_to_delta_rs']}")
            print(f"  incremental clean / rebuild: {size['incremental_to_rebuild_clean']}")
        # one engine alone is saved apart, so it never overwrites the day's comparison
        path = save_result(args.out, "engines" if len(engines) == 2 else f"engines-{engines[0]}", result)
        print(f"saved {path}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
