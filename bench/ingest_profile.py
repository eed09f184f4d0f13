"""Ingest's cost against a bare Spark pass as the population grows, with the Spark profile of each.

For each size, in a fresh process (its own JVM and event log): generated Synthea CSV (cached under
``gen/bench-input/<N>`` so sizes can be rerun), the bare pass (the same files read by
``spark.read.csv`` and written as Parquet), then ``ingest.run`` with sealing, patient keys,
lineage, quarantine and the audit on, then the bare pass again (the ratio uses their mean). The
Spark event log is read back by :mod:`spark_profile` into the heaviest jobs of each phase, so what
grows with size is in the committed result, not in somebody's memory.

    .venv/bin/python bench/ingest_profile.py [--sizes 10000,100000] [--top 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
sys.path.insert(0, str(REPO / "bench"))

EVENT_TABLES = ("encounters", "conditions", "observations", "medications", "procedures")
PHASE = "ehrlake.bench.phase"


def _input(patients: int) -> Path:
    """Generated Synthea CSV for ``patients``, made once (by a separate process) and kept."""
    folder = REPO / "gen" / "bench-input" / str(patients)
    if not (folder / "_done").exists():
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "ehrlake.cli", "synth", "--patients", str(patients), "--seed", "11",
             "--out", str(folder), "--tables", ",".join(EVENT_TABLES)],
            check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "lib")},
        )  # fmt: skip
        (folder / "_done").write_text("")
    return folder


def one_size(patients: int, work: Path, driver_memory: str) -> dict:
    """Bare pass, ingest, bare pass, in this process with the event log on."""
    from _lake import secured_lake
    from harness import _jvm_peak_mb

    from ehrlake import config, ingest
    from ehrlake.ingest import SourceKind
    from ehrlake.security.columns import jvm_sealing
    from ehrlake.session import get_spark

    source = _input(patients)
    logs = work / "events"
    logs.mkdir(parents=True)
    conf = config.Config()
    conf.spark.conf.update(
        {
            "spark.driver.memory": driver_memory,
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": logs.as_uri(),
            "spark.eventLog.compress": "false",
        }
    )
    spark = get_spark(conf)
    sc = spark.sparkContext
    spark.range(1000).selectExpr("sum(id)").collect()  # the JVM and Python workers warm for both

    def bare(tag: str) -> float:
        sc.setLocalProperty(PHASE, f"bare-{tag}")
        started = time.perf_counter()
        for f in ("patients", *EVENT_TABLES):
            spark.read.csv(str(source / f"{f}.part-*.csv.gz"), header=True).write.mode("overwrite").parquet(
                str(work / "bare" / f)
            )
        return time.perf_counter() - started

    before = bare("before")
    lake = secured_lake(work / "lake", spark, work / "secrets")
    sc.setLocalProperty(PHASE, "ingest")
    started = time.perf_counter()
    report = ingest.run(lake, SourceKind.SYNTHEA_CSV, str(source))
    seconds = time.perf_counter() - started
    after = bare("after")
    jvm = _jvm_peak_mb(spark)
    engine = "jvm" if jvm_sealing(spark) else "python"
    spark.stop()
    return {
        "patients": patients,
        "records": report.total.records_in,
        "input_bytes": sum(p.stat().st_size for p in source.glob("*.csv.gz")),
        "ingest_seconds": round(seconds, 2),
        "bare_seconds": [round(before, 2), round(after, 2)],
        "ratio": round(seconds / ((before + after) / 2), 2),
        "balanced": report.balanced,
        "jvm_peak_mb": jvm,
        "seal_engine": engine,
        "event_log": str(logs),
    }


def profile_of(logs: Path, top: int) -> dict:
    import spark_profile

    profile = spark_profile.read(spark_profile.event_log(logs))
    phases: dict[str, spark_profile.Profile] = {}
    for job in profile.jobs:
        phase = job.phase or "setup"
        phases.setdefault(phase, spark_profile.Profile(0.0)).jobs.append(job)
    for stage in profile.stages:
        owner = next((j for j in profile.jobs if j.job == stage.job), None)
        phase = (owner.phase if owner else None) or "setup"
        phases.setdefault(phase, spark_profile.Profile(0.0)).stages.append(stage)
    out = {}
    for phase, p in phases.items():
        heaviest = p.by_name()
        out[phase] = {
            "total": p.total(),
            "heaviest": heaviest[:top],
            "stages": p.heaviest_stages(top),
            "table": spark_profile.table(heaviest, top),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument("--tag", default="", help="a suffix for the result's name (e.g. a variant)")
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_size:
        print(json.dumps(one_size(args.one_size, Path(args.work), args.driver_memory)))
        return 0
    runs = []
    for n in (int(s) for s in args.sizes.split(",")):
        _input(n)
        work = Path(tempfile.mkdtemp(prefix=f"ehrlake-ingest-profile-{n}-"))
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one-size", str(n), "--work", str(work),
                 "--driver-memory", args.driver_memory],
                capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "lib")},
            )  # fmt: skip
            if proc.returncode != 0:
                log = Path(tempfile.gettempdir()) / f"ingest-profile-{n}.stderr"
                log.write_text(proc.stderr)
                causes = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "Exception:" in ln]
                print("\n".join(causes[:10]), f"\n(whole output: {log})", file=sys.stderr)
                return 1
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["profile"] = profile_of(Path(run.pop("event_log")), args.top)
            runs.append(run)
            print(
                f"{n:>9,} patients, {run['records']:,} records: ingest {run['ingest_seconds']} s, bare "
                f"{run['bare_seconds']} s, ratio {run['ratio']}x, JVM peak {run['jvm_peak_mb']:.0f} MB",
                flush=True,
            )
            print(run["profile"]["ingest"]["table"], flush=True)
            for stage in run["profile"]["ingest"]["stages"]:
                print(f"  stage {stage['stage']} ({stage['task_s']} s of tasks): {stage['operators']}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "ingest-profile",
        "date": dt.date.today().isoformat(),
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "runs": runs,
    }
    out = REPO / "bench" / "results" / f"ingest-profile{args.tag}-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
