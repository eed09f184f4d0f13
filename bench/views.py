"""Benchmark: flattening FHIR through the bronze ViewDefinitions, against a bare Spark pass and the
full ingest, same NDJSON files, same SparkSession, same run.

- baseline: ``spark.read.json`` per resource type + ``write.parquet`` (schema inference, no checks);
- views: every file's resources through its type's view (``ehrlake.views.run``, tolerant, as ingest
  runs them) + ``write.parquet``: the cost of the views alone;
- ingest: ``ehrlake.ingest.run`` (views plus envelope checks, dedupe, sealing, Delta merge, audit).

- pathling (when its environment exists, ``make pathling-env``): Pathling 6.3.1 encoding the same
  NDJSON into Parquet (every element of the FHIR schema), in its own Spark 3.3 process
  (``bench/pathling_encode.py``); its start-up is not counted.

Rows per type must agree; bytes on disk are reported per variant.
Results: ``bench/results/views-<date>.json``.

    .venv/bin/python bench/views.py [--bundles DIR] [--pathling .venv-pathling/bin/python]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import fhir_arguments, machine, save_result, secured_lake  # noqa: E402
from ingest import bundles_to_ndjson  # noqa: E402

from ehrlake import config, ingest, views  # noqa: E402
from ehrlake.ingest import fhir_views  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fhir_arguments(parser)
    pathling = REPO / ".venv-pathling" / "bin" / "python"
    parser.add_argument("--pathling", type=Path, default=pathling if pathling.exists() else None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-views-"))
    try:
        resources, nbytes = bundles_to_ndjson(args.bundles, work / "ndjson")
        spark = get_spark(config.Config())
        spark.range(1000).selectExpr("sum(id)").collect()
        files = sorted((work / "ndjson").glob("*.ndjson"))
        bronze = fhir_views.load()

        start = time.perf_counter()
        base_rows = {}
        for f in files:
            frame = spark.read.json(str(f))
            frame.write.mode("overwrite").parquet(str(work / "baseline" / f.stem))
            base_rows[f.stem] = spark.read.parquet(str(work / "baseline" / f.stem)).count()
        baseline_s = time.perf_counter() - start
        # ingest keeps one row per (type, id): bundles repeat shared Organizations and Practitioners
        distinct = {
            t: spark.read.parquet(str(work / "baseline" / t)).select("id").distinct().count()
            for t in base_rows
        }

        start = time.perf_counter()
        view_rows = {}
        for f in files:
            if f.stem not in bronze:
                continue
            b = bronze[f.stem]
            text = spark.read.text(str(f)).withColumnRenamed("value", "resource")
            out = views.run(b.view, text, tolerant=True, drift=b.drift)
            out.write.mode("overwrite").parquet(str(work / "views" / f.stem))
            view_rows[f.stem] = spark.read.parquet(str(work / "views" / f.stem)).count()
        views_s = time.perf_counter() - start

        lake = secured_lake(work / "lake", spark, work / "secrets")
        start = time.perf_counter()
        report = ingest.run(lake, ingest.SourceKind.FHIR_NDJSON, str(work / "ndjson"))
        ingest_s = time.perf_counter() - start
        ingest_rows = {t: lake.row_count(b.table) for t, b in bronze.items() if lake.exists(b.table)}

        agree = all(base_rows[t] == view_rows.get(t) and distinct[t] == ingest_rows.get(t) for t in view_rows)
        info = machine(spark)
        pathling_result = None
        if args.pathling:
            spark.stop()  # the machine to itself, as for the others
            script = REPO / "bench" / "pathling_encode.py"
            command = [str(args.pathling), str(script), str(work / "ndjson"), str(work / "pathling")]
            run = subprocess.run(command, capture_output=True, text=True, check=True)
            pathling_result = json.loads(run.stdout.strip().splitlines()[-1])
            agree = agree and all(pathling_result["rows"].get(t) == n for t, n in base_rows.items())
        result = {
            "benchmark": "views",
            "machine": info,
            "input": {"bundles": str(args.bundles), "resources": resources, "ndjson_bytes": nbytes},
            "seconds": {
                "baseline": round(baseline_s, 1),
                "views": round(views_s, 1),
                "ingest": round(ingest_s, 1),
            },
            "ratio_to_baseline": {
                "views": round(views_s / baseline_s, 2),
                "ingest": round(ingest_s / baseline_s, 2),
            },
            "bytes": {
                "baseline_parquet": _size(work / "baseline"),
                "views_parquet": _size(work / "views"),
                "lake": _size(work / "lake"),
            },
            "rows": {
                "baseline": base_rows,
                "views": view_rows,
                "distinct_ids": distinct,
                "ingest": ingest_rows,
            },
            "pathling": pathling_result,
            "rows_agree": agree,
            "ingest_balanced": report.balanced,
            "records_with_issues": report.total.with_issues,
        }
        path = save_result(args.out, "views", result)
        print(
            f"{resources:,} resources: baseline {baseline_s:.1f}s, views {views_s:.1f}s "
            f"({views_s / baseline_s:.2f}x), ingest {ingest_s:.1f}s ({ingest_s / baseline_s:.2f}x)"
            + (f", Pathling {pathling_result['seconds']}s" if pathling_result else "")
            + "; "
            f"rows agree: {agree}; wrote {path}"
        )
        return 0 if agree and report.balanced else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
