"""Benchmark: FHIR NDJSON ingest versus the bare baseline, same files, same SparkSession, same run.

Baseline: ``spark.read.json(files)`` + ``write.parquet`` (schema inference, no validation, no lineage,
no dedupe, no Delta commit). Ingest: ``ehrlake.ingest.run`` (parse, type, validate, quarantine, lineage,
dedupe, seal identifiers, merge into Delta, audit). The baseline runs before and after ingest; the
ratio uses their median so a noisy moment does not decide it.
Results go to ``bench/results/ingest-<date>.json``.

Input: the SMART 625-patient bundles flattened to bulk NDJSON (one file per resource type) when the
developer data set is beside the checkout, else the bundled sample.

    .venv/bin/python bench/ingest.py [--bundles DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import fhir_arguments, machine, save_result, secured_lake  # noqa: E402

from ehrlake import config, ingest  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402


def bundles_to_ndjson(bundle_dir: Path, out: Path) -> tuple[int, int]:
    """Flatten bundles into one NDJSON file per resource type (the bulk-export layout)."""
    out.mkdir(parents=True, exist_ok=True)
    handles, count = {}, 0
    for path in sorted(bundle_dir.glob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            doc = json.load(fh)
        for entry in doc.get("entry", []):
            resource = entry["resource"]
            rtype = resource["resourceType"]
            if rtype not in handles:
                handles[rtype] = open(out / f"{rtype}.ndjson", "w")
            handles[rtype].write(json.dumps(resource, separators=(",", ":")) + "\n")
            count += 1
    for handle in handles.values():
        handle.close()
    return count, sum(f.stat().st_size for f in out.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fhir_arguments(parser)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-"))
    try:
        resources, nbytes = bundles_to_ndjson(args.bundles, work / "ndjson")
        spark = get_spark(config.Config())
        spark.range(1000).selectExpr("sum(id)").collect()  # warm the JVM and the Python workers
        files = str(work / "ndjson")

        def baseline(tag: str) -> float:
            start = time.perf_counter()
            spark.read.json(files).write.mode("overwrite").parquet(str(work / f"baseline-{tag}"))
            return time.perf_counter() - start

        base = [baseline("before")]
        start = time.perf_counter()
        lake = secured_lake(work / "lake", spark, work / "secrets")
        report = ingest.run(lake, ingest.SourceKind.FHIR_NDJSON, files)
        ingest_s = time.perf_counter() - start
        base.append(baseline("after"))
        base_s = statistics.median(base)
        result = {
            "benchmark": "ingest-fhir-ndjson",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(spark),
            "input": {"bundles": str(args.bundles), "resources": resources, "bytes": nbytes},
            "baseline_seconds": [round(b, 2) for b in base],
            "ingest_seconds": round(ingest_s, 2),
            "ratio_ingest_to_baseline": round(ingest_s / base_s, 2),
            "ingest_resources_per_second": round(resources / ingest_s),
            "baseline_resources_per_second": round(resources / base_s),
            "ingest_resources_per_second_per_core": round(resources / ingest_s / (os.cpu_count() or 1)),
            "report_balanced": report.balanced,
            "quarantined": report.total.quarantined,
        }
        path = save_result(args.out, "ingest", result)
        print(f"resources: {resources:,} ({nbytes / 1e6:.0f} MB NDJSON)")
        print(
            f"baseline read.json+write.parquet: {', '.join(f'{b:.1f}s' for b in base)} (median {base_s:.1f}s)"
        )
        print(f"ehrlake ingest:                   {ingest_s:.1f}s")
        print(
            f"ratio ingest/baseline: {result['ratio_ingest_to_baseline']}x   "
            f"ingest {result['ingest_resources_per_second']:,} resources/s "
            f"({result['ingest_resources_per_second_per_core']:,}/s per core)"
        )
        print(f"saved {path}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
