"""Benchmark: the EDA job on a generated population, against plain Spark SQL group-bys over the
same silver tables, in the same run and SparkSession.

Steps: ``synth`` N patients (default 100,000; India's states by population) -> ingest -> clean ->
EDA. Baseline: the group-bys an analyst would write by hand for the same views (persons by age
band x sex x state; persons per condition x year x state; encounters per class x year x state;
inpatient stays per facility x year), written to Parquet, without suppression, rates or the
complementary-suppression search. It runs before and after EDA; the ratio uses the median.
Setup stages are timed too (generation, ingest and clean throughput). Results go to
``bench/results/eda-<date>.json``.

    .venv/bin/python bench/eda.py [--patients N] [--keep DIR]
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

from ehrlake import clean, config, ingest, synth  # noqa: E402
from ehrlake.eda import aggregates  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402

TABLES = ("encounters", "conditions", "observations")  # what the EDA views read


def baseline(spark, lake, out: Path) -> float:
    """Plain group-bys over the silver tables (no suppression, no rates), written as Parquet."""
    for name in ("patient", "encounter", "condition"):
        lake.read(f"silver.{name}").createOrReplaceTempView(name)
    queries = {
        "demographics": """SELECT floor((year(current_date()) - birth_year) / 5) AS band, gender, state,
                                  count(*) AS persons FROM patient GROUP BY 1, 2, 3""",
        "prevalence": """SELECT year(c.onset_at) AS year, p.state, c.code,
                                count(DISTINCT c.patient_key) AS persons
                         FROM condition c JOIN patient p USING (patient_key) GROUP BY 1, 2, 3""",
        "utilisation": """SELECT year(start_at) AS year, state, encounter_class, count(*) AS encounters,
                                 count(DISTINCT patient_key) AS persons, avg(length_of_stay_days) AS los
                          FROM encounter GROUP BY 1, 2, 3""",
        "facility": """SELECT organization_id, year(start_at) AS year, count(*) AS stays FROM encounter
                       WHERE encounter_class = 'inpatient' GROUP BY 1, 2""",
    }
    started = time.perf_counter()
    for name, sql in queries.items():
        spark.sql(sql).write.mode("overwrite").parquet(str(out / name))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    parser.add_argument(
        "--driver-memory",
        default="8g",
        help="local mode runs the executors in the driver JVM; 100k patients are ~6M records, and 2g "
        "(the embedded default) runs out while ingest caches them",
    )
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="ehrlake-bench-eda-"))
    work.mkdir(parents=True, exist_ok=True)
    conf = config.Config()
    conf.spark.conf["spark.driver.memory"] = args.driver_memory
    spark = get_spark(conf)
    lake = secured_lake(work / "lake", spark, work / "secrets")
    timings, counts = {}, {}
    try:
        t = time.perf_counter()
        generated = synth.run(spark, args.patients, str(work / "input"), seed=1, tables=TABLES)
        timings["synth"] = time.perf_counter() - t
        counts["generated_rows"] = sum(generated.rows.values())
        print(f"synth: {timings['synth']:.0f} s", flush=True)
        t = time.perf_counter()
        report = ingest.run(lake, ingest.SourceKind.SYNTHEA_CSV, str(work / "input"), source_system="gen")
        timings["ingest"] = time.perf_counter() - t
        counts["ingested_records"] = report.records_read
        print(f"ingest: {timings['ingest']:.0f} s", flush=True)
        t = time.perf_counter()
        cleaned = clean.run(
            lake, mappings=[m for m in clean.load_mappings(clean.MAPPINGS_DIR / "synthea.yaml")]
        )
        timings["clean"] = time.perf_counter() - t
        counts["silver_rows"] = cleaned.rows
        print(f"clean: {timings['clean']:.0f} s", flush=True)
        base = [baseline(spark, lake, work / "baseline")]
        t = time.perf_counter()
        summary = aggregates.run(lake, reference=dt.date.today())
        timings["eda"] = time.perf_counter() - t
        base.append(baseline(spark, lake, work / "baseline"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    timings["baseline_median"] = statistics.median(base)
    result = {
        "benchmark": "eda",
        "date": dt.date.today().isoformat(),
        "machine": machine(spark),
        "patients": args.patients,
        "driver_memory": args.driver_memory,
        "counts": counts,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "baseline_runs": [round(b, 2) for b in base],
        "eda_patients_per_second": round(args.patients / timings["eda"], 1),
        "eda_vs_baseline": round(timings["eda"] / timings["baseline_median"], 2),
        "throughput_rows_per_second": {
            "synth": round(counts["generated_rows"] / timings["synth"]),
            "ingest": round(counts["ingested_records"] / timings["ingest"]),
            "clean": round(sum(counts["silver_rows"].values()) / timings["clean"]),
        },
        "eda_tables": summary,
    }
    path = save_result(REPO / "bench" / "results", "eda", result)
    print(
        f"EDA on {args.patients:,} patients: {timings['eda']:.1f} s = {result['eda_patients_per_second']:,} "
        f"patients/s; plain group-by baseline {timings['baseline_median']:.1f} s (median of "
        f"{result['baseline_runs']}); ratio {result['eda_vs_baseline']}x"
    )
    setup = ", ".join(f"{k} {timings[k]:.0f} s" for k in ("synth", "ingest", "clean"))
    print(f"setup: {setup}")
    print(f"saved {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
