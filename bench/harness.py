"""Benchmark harness: every pipeline stage at several population sizes, each against a baseline
measured in the same run, with the cost-vs-size slope and the driver's peak memory.

Each size runs in its own process (so peak-memory readings belong to that size): synth -> ingest ->
clean -> quality -> eda -> features -> train (mortality_12m, logistic regression) -> score -> the
nightly score (the same date again, the version's drift bins kept); then, up to ``--fhir-max``
patients, the same patients as bulk FHIR NDJSON into a lake of their own (ingest_fhir). Each
stage's baseline is the plain Spark work over the same data a hand-written job would do at least
(CSV -> Parquet for ingest, NDJSON -> Parquet for ingest_fhir; read the input tables and write
them as Parquet for clean, features and score; one group-by count per silver table that quality or
eda reads); the figure reported is the ratio.

Memory: the Python driver's peak RSS (where anything collected would land) must stay flat as N
grows; the JVM's peak RSS (in local mode the executors live in it) is reported beside it.
``--quick`` also fails when either ingest's ratio at 1,000 patients is 1.5x that of the newest
committed quick result.
Optionally (``--workers-compare N``) the ingest + clean stages run on a local standalone cluster with
1 and then 2 workers at N patients (scaling efficiency).

Writes ``bench/results/harness-<date>.json``, ``.md`` (table) and ``.png`` (time per stage vs size).

    .venv/bin/python bench/harness.py [--sizes 1000,10000,100000] [--quick] [--workers-compare 10000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
RESULTS = REPO / "bench" / "results"
# score: a model version's first scoring (it bins the training snapshot for drift, once);
# score_nightly: the scheduler's next full scoring of the date with the same version
# ingest_fhir: the same generated patients as bulk FHIR NDJSON, into a lake of their own, against
# spark.read.json + write.parquet of the same files (sizes up to --fhir-max only: it is the slow format)
STAGES = (
    "synth", "ingest", "clean", "quality", "eda", "features", "train", "score", "score_nightly",
    "ingest_fhir",
)  # fmt: skip
EVENT_TABLES = ("encounters", "conditions", "observations", "medications", "procedures")
AS_OF = dt.date(2022, 1, 1)
FLAT_LIMIT_MB = 150  # the driver's peak RSS may not grow more than this from the smallest size
# --quick fails when ingest's ratio to its bare pass at 1,000 patients is this much worse than in the
# newest committed quick result (a fixed-cost regression shows there first; noise stays well inside)
RATIO_REGRESSION = 1.5
CHECKED_AT = 1000


def _jvm_peak_mb(spark) -> float | None:
    """Peak RSS of the JVM behind this session (VmHWM of the java process)."""
    try:
        pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except Exception:  # noqa: BLE001 - not Linux, or no JVM handle: report nothing rather than fail
        return None
    return None


def _python_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def one_size(patients: int, work: Path, driver_memory: str, fhir_max: int = 0) -> dict:
    """All stages at one size, in this process; returns seconds, baselines, counts and memory."""
    from _lake import secured_lake

    from ehrlake import clean, config, features, ingest, quality, scoring, synth
    from ehrlake.clean.model import ENTITIES
    from ehrlake.eda import aggregates
    from ehrlake.ingest import SourceKind
    from ehrlake.models import registry, train
    from ehrlake.quality import checks
    from ehrlake.session import get_spark

    conf = config.Config()
    conf.spark.conf["spark.driver.memory"] = driver_memory
    spark = get_spark(conf)
    lake = secured_lake(work / "lake", spark, work / "secrets")
    out, base, counts = {}, {}, {}

    def parquet_copy(tables: list[str], name: str) -> float:
        started = time.perf_counter()
        for t in tables:
            if lake.exists(t):
                lake.read(t).write.mode("overwrite").parquet(str(work / "baseline" / name / t))
        return time.perf_counter() - started

    out["synth"], report = _timed(
        lambda: synth.run(spark, patients, str(work / "input"), seed=11, tables=EVENT_TABLES)
    )
    counts["generated_rows"] = sum(report.rows.values())

    def csv_baseline() -> float:
        started = time.perf_counter()
        for f in ("patients", *EVENT_TABLES):
            spark.read.csv(str(work / "input" / f"{f}.part-*.csv.gz"), header=True).write.mode(
                "overwrite"
            ).parquet(str(work / "baseline" / "csv" / f))
        return time.perf_counter() - started

    base["ingest"] = csv_baseline()
    out["ingest"], run = _timed(lambda: ingest.run(lake, SourceKind.SYNTHEA_CSV, str(work / "input")))
    counts["records"] = run.total.records_in
    bronze = [str(t.name) for t in lake.tables() if t.layer == "bronze"]
    base["clean"] = parquet_copy(bronze, "clean")
    out["clean"], _ = _timed(lambda: clean.run(lake))
    silver = [str(t.name) for t in lake.tables() if t.layer == "silver"]
    counts["silver_rows"] = sum(lake.row_count(t) for t in silver)

    def groupbys(by: dict[str, tuple[str, ...]]) -> float:
        """One plain group-by count per silver table, written as Parquet: ``by`` maps a table to
        the columns its count is grouped by."""
        started = time.perf_counter()
        for table, columns in by.items():
            if lake.exists(f"silver.{table}"):
                lake.read(f"silver.{table}").groupBy(*columns).count().write.mode("overwrite").parquet(
                    str(work / "baseline" / "gb" / table)
                )
        return time.perf_counter() - started

    # the baselines read the same silver tables as the stage, once each: the quality checks' tables
    # by source system (as the checks count), EDA's tables by the dimensions of its aggregates.
    # Until 2026-12-05 both stages were held against the first two group-bys of EDA's alone
    # (patient and encounter): kept as ``ratio_two_groupbys`` so older results still compare.
    checked = sorted({ENTITIES[c.table].table.removeprefix("silver.") for c in checks.load()})
    two = {"patient": ("state", "gender"), "encounter": ("state", "encounter_class")}
    by_dimensions = {**two, "condition": ("code_system", "code"), "observation": ("code",)}
    two_groupbys = {"quality": groupbys(two)}
    base["quality"] = groupbys({table: ("source_system",) for table in checked})
    out["quality"], _ = _timed(lambda: quality.run(lake, checks.load()))
    two_groupbys["eda"] = groupbys(two)
    base["eda"] = groupbys(by_dimensions)
    out["eda"], _ = _timed(lambda: aggregates.run(lake, reference=AS_OF))
    base["features"] = parquet_copy(silver, "features")
    as_of = [dt.date(y, 1, 1) for y in range(2012, 2022)]
    out["features"], summary = _timed(lambda: features.run(lake, as_of))
    counts["feature_rows"] = summary.get("gold.features_patient")
    counts["mortality_labels"] = summary["tasks"].get("mortality_12m")
    base["train"] = parquet_copy(["gold.features_patient", "gold.labels"], "train")
    try:
        out["train"], models = _timed(
            lambda: train(lake, "mortality_12m", ("logreg",), grid="tiny", folds=2, bootstrap=100)
        )
        # straight to production: the benchmark times scoring, not the approval (models.governance)
        registry.set_production(lake, models[0].model_id, models[0].version)
        base["score"] = parquet_copy(silver, "score")
        out["score"], scored = _timed(lambda: scoring.score(lake, "mortality_12m", AS_OF))
        counts["scored"] = scored.scored
        base["score_nightly"] = base["score"]
        out["score_nightly"], _ = _timed(lambda: scoring.score(lake, "mortality_12m", AS_OF))
    except Exception as exc:  # noqa: BLE001 - too few deaths at tiny sizes: reported, not fatal
        counts["train_skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if patients <= fhir_max:
        ndjson = work / "fhir"
        synth.run(spark, patients, str(ndjson), seed=11, fmt="fhir-ndjson", tables=EVENT_TABLES)
        files = str(ndjson / "*.ndjson*")
        started = time.perf_counter()
        spark.read.json(files).write.mode("overwrite").parquet(str(work / "baseline" / "fhir"))
        base["ingest_fhir"] = time.perf_counter() - started
        fhir_lake = secured_lake(work / "lake_fhir", spark, work / "secrets_fhir")
        out["ingest_fhir"], run = _timed(lambda: ingest.run(fhir_lake, SourceKind.FHIR_NDJSON, str(ndjson)))
        counts["fhir_resources"] = run.total.records_in
    result = {
        "patients": patients,
        "seconds": {k: round(v, 2) for k, v in out.items()},
        "baseline_seconds": {k: round(v, 2) for k, v in base.items()},
        "ratio": {k: round(out[k] / base[k], 2) for k in out if k in base and base[k] > 0},
        "ratio_two_groupbys": {k: round(out[k] / v, 2) for k, v in two_groupbys.items() if v > 0},
        "counts": counts,
        "python_driver_peak_mb": round(_python_peak_mb(), 1),
        "jvm_peak_mb": _jvm_peak_mb(spark),
    }
    spark.stop()
    return result


def workers_compare(patients: int, work: Path) -> dict:
    """Ingest + clean on a local standalone cluster with 1 worker, then 2 (1 core each)."""
    python = sys.executable
    bin_dir = Path(python).parent
    timings = {}
    subprocess.run(
        [
            python,
            "-m",
            "ehrlake.cli",
            "synth",
            "--patients",
            str(patients),
            "--out",
            str(work / "input"),
            "--tables",
            ",".join(EVENT_TABLES),
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "lib")},
    )
    for workers in (1, 2):
        cluster = work / f"cluster{workers}"
        env = {
            **os.environ,
            "PYTHON": python,
            "EHRLAKE_CLUSTER_DIR": str(cluster),
            "SPARK_WORKER_MEMORY": "3g",
        }
        master = (
            subprocess.run(
                ["bash", "infra/standalone/start.sh", str(workers)],
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
                check=True,
                timeout=300,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        try:
            lake = work / f"lake{workers}"
            submit = [
                str(bin_dir / "spark-submit"),
                "--master",
                master,
                "--conf",
                f"spark.pyspark.python={python}",
                "--conf",
                "spark.driver.host=127.0.0.1",
                "--conf",
                "spark.executor.memory=2g",
            ]
            started = time.perf_counter()
            for job in (
                ["jobs/ingest.py", "--source", "synthea-csv", "--input", str(work / "input")],
                ["jobs/clean.py"],
            ):
                subprocess.run(
                    [*submit, *job, "--lake", str(lake)],
                    check=True,
                    capture_output=True,
                    cwd=REPO,
                    env={**os.environ, "PYSPARK_PYTHON": python},
                    timeout=3600,
                )
            timings[workers] = round(time.perf_counter() - started, 1)
        finally:
            subprocess.run(["bash", "infra/standalone/stop.sh"], env=env, cwd=REPO, capture_output=True)
    return {
        "patients": patients,
        "seconds_1_worker": timings[1],
        "seconds_2_workers": timings[2],
        "speedup": round(timings[1] / timings[2], 2),
        "scaling_efficiency": round(timings[1] / timings[2] / 2, 2),
    }


def slopes(runs: list[dict]) -> dict:
    """Least-squares slope of log(seconds) against log(patients) per stage (1 = linear)."""
    out = {}
    for stage in STAGES:
        pts = [
            (math.log(r["patients"]), math.log(r["seconds"][stage])) for r in runs if r["seconds"].get(stage)
        ]
        if len(pts) >= 2:
            mx = sum(x for x, _ in pts) / len(pts)
            my = sum(y for _, y in pts) / len(pts)
            den = sum((x - mx) ** 2 for x, _ in pts)
            out[stage] = round(sum((x - mx) * (y - my) for x, y in pts) / den, 2) if den else None
    return out


def markdown(result: dict) -> str:
    runs = result["runs"]
    head = (
        "| stage | " + " | ".join(f"{r['patients']:,} patients: s (x baseline)" for r in runs) + " | slope |"
    )
    lines = [head, "|---" * (len(runs) + 2) + "|"]
    for stage in STAGES:
        cells = []
        for r in runs:
            s = r["seconds"].get(stage)
            ratio = r["ratio"].get(stage)
            cells.append("" if s is None else f"{s:.1f}" + (f" ({ratio:.1f}x)" if ratio else ""))
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {result['slopes'].get(stage, '')} |")
    cores = result["machine"]["cores"] or 1

    def per_core(stage: str, count: str) -> str:
        cells = []
        for r in runs:
            seconds, n = r["seconds"].get(stage), r["counts"].get(count)
            cells.append(f"{n / seconds / cores:,.0f}" if seconds and n else "")
        return " | ".join(cells)

    lines.append(f"| ingest records/s per core | {per_core('ingest', 'records')} | |")
    lines.append(f"| FHIR ingest resources/s per core | {per_core('ingest_fhir', 'fhir_resources')} | |")
    lines.append(f"| clean silver rows/s per core | {per_core('clean', 'silver_rows')} | |")
    lines.append(f"| score patients/s per core | {per_core('score', 'scored')} | |")
    lines.append(
        "| Python driver peak RSS (MB) | "
        + " | ".join(f"{r['python_driver_peak_mb']:.0f}" for r in runs)
        + " | |"
    )
    lines.append("| JVM peak RSS (MB) | " + " | ".join(f"{r['jvm_peak_mb'] or 0:.0f}" for r in runs) + " | |")
    if result.get("workers"):
        w = result["workers"]
        lines.append(
            f"\nIngest + clean of {w['patients']:,} patients on a local standalone cluster: 1 worker "
            f"{w['seconds_1_worker']} s, 2 workers {w['seconds_2_workers']} s: speed-up {w['speedup']}x "
            f"(scaling efficiency {w['scaling_efficiency']:.0%})."
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [r["patients"] for r in result["runs"]]
    for stage in STAGES:
        ys = [r["seconds"].get(stage) for r in result["runs"]]
        if all(y is not None for y in ys):
            ax.plot(sizes, ys, marker="o", label=f"{stage} (slope {result['slopes'].get(stage)})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("patients")
    ax.set_ylabel("seconds")
    ax.set_title(f"ehrlake stages vs population size ({result['machine']['cores']} cores)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def ratio_regression(runs: list[dict], committed: Path | None) -> str | None:
    """Why an ingest's ratio (Synthea CSV, FHIR NDJSON) at :data:`CHECKED_AT` patients is a regression
    against ``committed`` (the newest earlier quick result), or None."""
    if committed is None:
        return None
    earlier = json.loads(committed.read_text())["runs"]
    for stage in ("ingest", "ingest_fhir"):
        before = {r["patients"]: r["ratio"].get(stage) for r in earlier}
        now = {r["patients"]: r["ratio"].get(stage) for r in runs}
        old, new = before.get(CHECKED_AT), now.get(CHECKED_AT)
        if old and new and new > RATIO_REGRESSION * old:
            return (
                f"{stage} at {CHECKED_AT:,} patients costs {new}x its bare pass, {new / old:.2f}x the {old}x "
                f"of {committed.name} (limit {RATIO_REGRESSION}x)"
            )
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated patient counts")
    parser.add_argument("--quick", action="store_true", help="CI: sizes 200,1000; no cluster comparison")
    parser.add_argument("--workers-compare", type=int, default=0, help="patients for the 1 vs 2 worker run")
    parser.add_argument("--driver-memory", default="8g")
    parser.add_argument(
        "--fhir-max", type=int, default=10_000, help="largest size that also times FHIR NDJSON ingest"
    )
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)  # internal: run one size here
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_size:
        print(json.dumps(one_size(args.one_size, Path(args.work), args.driver_memory, args.fhir_max)))
        return 0
    sizes = [200, 1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    runs = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"ehrlake-harness-{n}-"))
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one-size",
                    str(n),
                    "--work",
                    str(work),
                    "--driver-memory",
                    args.driver_memory,
                    "--fhir-max",
                    str(args.fhir_max),
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO / "lib")},
            )
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{n:>9,} patients: {runs[-1]['seconds']}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "harness",
        "date": dt.date.today().isoformat(),
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "mode": "quick" if args.quick else "full",
        "runs": runs,
        "slopes": slopes(runs),
    }
    if args.workers_compare and not args.quick:
        work = Path(tempfile.mkdtemp(prefix="ehrlake-harness-workers-"))
        try:
            result["workers"] = workers_compare(args.workers_compare, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    growth = runs[-1]["python_driver_peak_mb"] - runs[0]["python_driver_peak_mb"]
    result["driver_memory_growth_mb"] = round(growth, 1)
    name = "harness-quick" if args.quick else "harness"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}-{dt.date.today().isoformat()}"
    earlier = sorted(p for p in RESULTS.glob("harness-quick-*.json") if p.stem != stem.name)
    regression = ratio_regression(runs, earlier[-1] if earlier else None) if args.quick else None
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    plot(result, stem.with_suffix(".png"))
    print(markdown(result))
    print(f"saved {stem}.json/.md/.png")
    if growth > FLAT_LIMIT_MB:
        print(
            f"FAIL: the Python driver's peak memory grew {growth:.0f} MB from {sizes[0]:,} to {sizes[-1]:,} "
            f"patients (limit {FLAT_LIMIT_MB} MB): something collects data proportional to the rows",
            file=sys.stderr,
        )
        return 1
    if regression:
        print(f"FAIL: {regression}: something in ingest got slower", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
