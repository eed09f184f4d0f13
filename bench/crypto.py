"""Benchmark: what sealing identifiers costs at ingest. Same input, same SparkSession, same run.

Plain: ``ingest.run(..., encrypt=False)`` (no sealing, no patient keys, no audit). Sealed: the real
ingest (identifiers and ``raw`` sealed on the executors, each FHIR record's de-identified processing
copy ``raw_deid`` made and sealed beside it, ``patient_key`` HMACs, audit events). After one
untimed warm-up ingest, the two alternate (plain, sealed, plain, ...) into fresh lakes so drift hits
both; the ratio uses medians. Also printed: the MB of plaintext sealed, the marginal throughput
(sealed MB / extra seconds), and the single-core speed of the sealing kernel alone.
Results go to ``bench/results/crypto-<date>.json``. Aims: less than 30% extra ingest time (issue 4),
at most 15% (issue 22).

    .venv/bin/python bench/crypto.py [--bundles DIR] [--repeat N]
    EHRLAKE_SEAL_ENGINE=python .venv/bin/python bench/crypto.py   # the Arrow UDF sealer instead
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
from ingest import bundles_to_ndjson  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from ehrlake import config, ingest  # noqa: E402
from ehrlake.lake import Lake  # noqa: E402
from ehrlake.security import crypto  # noqa: E402
from ehrlake.security.columns import jvm_sealing  # noqa: E402
from ehrlake.security.protection import declared  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402


def sealed_plaintext_bytes(lake: Lake) -> int:
    """Bytes of plaintext the sealed ingest encrypts: every column it seals, in the plain lake (FHIR
    records count twice: as sent, and their processing copy, about as long)."""
    total = 0
    for info in lake.tables():
        twice = ["raw"] if info.name.startswith("bronze.fhir_") else []
        columns = [
            c for c in (*declared(info.name).identifiers, "raw", *twice) if c in lake.schema(info.name).names
        ]
        if columns:
            sizes = [F.coalesce(F.length(F.col(c).cast("string")), F.lit(0)) for c in columns]
            total += lake.read(info.name).select(sum(sizes).alias("n")).agg(F.sum("n")).first()[0] or 0
    return int(total)


def kernel_mb_per_s(lake: Lake) -> float:
    """Single-core speed of the batch sealer (compress + seal + base64) on 20,000 real raw records."""
    values = [
        r.raw.encode() for r in lake.read("bronze.fhir_observation").select("raw").limit(20_000).collect()
    ]
    key = crypto.DataKey("bench#v1", os.urandom(32))
    ids = [f"bench\x1f{i}".encode() for i in range(len(values))]
    start = time.perf_counter()
    crypto.seal_many(key, values, ids, "raw", compress=True)
    seconds = time.perf_counter() - start
    return sum(len(v) for v in values) / 1e6 / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = REPO.parent / "shared" / "data" / "synthea_fhir_r4_smart" / "bundles"
    parser.add_argument(
        "--bundles", type=Path, default=default if default.exists() else REPO / "data/sample/fhir_bundles"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant (alternating)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-crypto-"))
    try:
        resources, nbytes = bundles_to_ndjson(args.bundles, work / "ndjson")
        files = str(work / "ndjson")
        spark = get_spark(config.Config())
        # warm-up, untimed: the first ingest in a JVM pays class loading and JIT (measured ~15 s here)
        ingest.run(
            secured_lake(work / "warm-up", spark, work / "secrets"), ingest.SourceKind.FHIR_NDJSON, files
        )
        times: dict[str, list[float]] = {"plain": [], "sealed": []}
        plain_lake = None
        for i in range(args.repeat):
            for variant in ("plain", "sealed"):
                lake = secured_lake(work / f"{variant}-{i}", spark, work / "secrets")
                start = time.perf_counter()
                report = ingest.run(lake, ingest.SourceKind.FHIR_NDJSON, files, encrypt=variant == "sealed")
                times[variant].append(time.perf_counter() - start)
                assert report.balanced
                if variant == "plain":
                    plain_lake = lake
        engine = "jvm" if jvm_sealing(spark) else "python"
        plain_s, sealed_s = statistics.median(times["plain"]), statistics.median(times["sealed"])
        sealed_mb = sealed_plaintext_bytes(plain_lake) / 1e6
        extra_s = max(sealed_s - plain_s, 1e-9)
        result = {
            "benchmark": "crypto-ingest-fhir-ndjson",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(spark),
            "seal_engine": engine,
            "input": {"bundles": str(args.bundles), "resources": resources, "bytes": nbytes},
            "plain_seconds": [round(t, 2) for t in times["plain"]],
            "sealed_seconds": [round(t, 2) for t in times["sealed"]],
            "ratio_sealed_to_plain": round(sealed_s / plain_s, 3),
            "extra_percent": round(100 * (sealed_s / plain_s - 1), 1),
            "sealed_plaintext_mb": round(sealed_mb, 1),
            "sealed_mb_per_s_of_ingest": round(sealed_mb / sealed_s, 1),
            "sealed_mb_per_extra_second": round(sealed_mb / extra_s, 1),
            "kernel_mb_per_s_one_core": round(kernel_mb_per_s(plain_lake), 1),
            "aim": "extra_percent < 30 (issue 4); <= 15 (issue 22)",
        }
        path = save_result(args.out, "crypto" if engine == "jvm" else "crypto-python-udf", result)
        print(f"resources: {resources:,} ({nbytes / 1e6:.0f} MB NDJSON)")
        print(f"plain ingest:  {', '.join(f'{t:.1f}s' for t in times['plain'])} (median {plain_s:.1f}s)")
        print(f"sealed ingest: {', '.join(f'{t:.1f}s' for t in times['sealed'])} (median {sealed_s:.1f}s)")
        print(
            f"ratio sealed/plain: {result['ratio_sealed_to_plain']}x ({result['extra_percent']:+}%); "
            f"{sealed_mb:.0f} MB sealed, {result['sealed_mb_per_s_of_ingest']} MB/s of ingest, "
            f"{result['sealed_mb_per_extra_second']} MB per extra second; "
            f"kernel {result['kernel_mb_per_s_one_core']} MB/s on one core"
        )
        print(f"saved {path}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
