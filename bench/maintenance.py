"""Benchmark: reading tables grown by many increments, before and after ``ehrlake lake maintain``.

Generated Synthea CSV patients (copies of the sample patients: volume only) arrive in ``--batches``
landing batches, each ingested on its own as a hospital's nightly export would be, so every bronze
table grows by a few files per batch. The same analyst-style scans (a group-by over the biggest
bronze tables, read by the engine ehrlake uses) are timed, median of ``--repeat``, before and after
maintenance; the maintenance's own seconds and the files before and after are reported. Results go
to ``bench/results/maintenance-<date>.json``.

    .venv/bin/python bench/maintenance.py [--patients 2000] [--batches 10] [--repeat 5]
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

from _lake import machine, save_result, secured_lake  # noqa: E402

from ehrlake import config, ingest, synth  # noqa: E402
from ehrlake.ingest import SourceKind  # noqa: E402
from ehrlake.lake.maintenance import maintain  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402

TABLES = ("encounters", "conditions", "observations")
SCANNED = ("bronze.synthea_observations", "bronze.synthea_encounters", "bronze.synthea_conditions")


def scans(lake, repeat: int) -> dict[str, float]:
    """Median seconds of a group-by over each scanned table (every file opened)."""
    out = {}
    for table in SCANNED:
        seconds = []
        for _ in range(repeat):
            began = time.perf_counter()
            lake.read(table).groupBy("code").count().collect()
            seconds.append(time.perf_counter() - began)
        out[table] = statistics.median(seconds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000, help="in all, over the batches")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    spark = get_spark(config.Config())
    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-maintenance-"))
    lake = secured_lake(work / "lake", spark, work / "secrets", "auto")
    for batch in range(args.batches):
        landing = str(work / f"in-{batch}")
        synth.run(spark, args.patients // args.batches, landing, seed=100 + batch, tables=TABLES)
        ingest.run(lake, SourceKind.SYNTHEA_CSV, landing, source_system=f"hospital-{batch}")
    scans(lake, 1)  # warm: the JVM's classes and the file system cache, for both sides alike
    before = scans(lake, args.repeat)
    began = time.perf_counter()
    done = maintain(lake)
    maintain_seconds = time.perf_counter() - began
    after = scans(lake, args.repeat)
    files = {t.table: [t.files_before, t.files_after] for t in done if t.table in SCANNED}
    result = {
        "benchmark": "maintenance",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(spark),
        "engine": lake.engine.name,
        "conditions": f"--patients {args.patients} --batches {args.batches} --repeat {args.repeat}",
        "files_before_after": files,
        "lake_files_before_after": [sum(t.files_before for t in done), sum(t.files_after for t in done)],
        "maintain_seconds": round(maintain_seconds, 2),
        "scan_seconds_before": before,
        "scan_seconds_after": after,
        "ratio_after_to_before": {t: round(after[t] / before[t], 3) for t in SCANNED},
    }
    print(f"{args.patients:,} patients in {args.batches} batches ({lake.engine.name} engine)")
    for table in SCANNED:
        print(
            f"  {table:<30} files {files[table][0]:>4} -> {files[table][1]:<3} scan "
            f"{before[table]:.2f}s -> {after[table]:.2f}s ({result['ratio_after_to_before'][table]}x)"
        )
    lake_files = result["lake_files_before_after"]
    print(f"  lake: {lake_files[0]} files -> {lake_files[1]}; maintain took {maintain_seconds:.1f}s")
    print(f"saved {save_result(args.out, 'maintenance', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
