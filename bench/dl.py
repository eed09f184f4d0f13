"""Deep-learning benchmark (run in the deep-learning runtime: .venv-dl/bin/python bench/dl.py).

1. Reader throughput from a Delta snapshot, samples/s: Petastorm (``make_batch_reader``) against the
   Arrow-native reader (pyarrow.dataset -> tf.data), same shard, same decoding, in the same run.
2. Training consumption: samples/s one CNN worker consumes, against what the readers deliver (a
   reader slower than consumption would starve training).
3. Horovod on Spark with 1 and 2 workers: samples/s and scaling efficiency (2-worker rate over twice
   the 1-worker rate), plus the barrier-MWMS launcher with 2 workers.

Data: PneumoniaMNIST (2,428 train images, 64x64 float32 after ingest), ingested and cleaned by the
main runtime into a scratch lake. Results: bench/results/dl-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from ehrlake.dl import datasets, launch, runtime  # noqa: E402
from ehrlake.dl import train as dl_train  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "medmnist"


def prepare(root: Path, env: dict) -> None:
    cli = REPO / ".venv" / "bin" / "ehrlake"
    npz = root.parent / "npz"
    npz.mkdir(exist_ok=True)
    link = npz / "pneumoniamnist.npz"
    if not link.exists():
        os.symlink(SHARED / "pneumoniamnist_balanced_trainval.npz", link)
    for args in (
        [
            "ingest",
            "--source",
            "images",
            "--input",
            str(npz),
            "--source-system",
            "pneumoniamnist",
            "--follow-links",
        ],
        ["clean"],
    ):
        subprocess.run([str(cli), *args, "--lake", str(root)], check=True, env=env, capture_output=True)


def reader_rate(shard, sel, backend: str, samples: int) -> float:
    with datasets.open_dataset(shard, sel, backend, batch_size=64, repeat=True, shuffle=0) as ds:
        it = iter(ds)
        next(it)  # reader start-up (threads, file footers) is not throughput
        n, started = 0, time.perf_counter()
        while n < samples:
            x, _ = next(it)
            n += int(x.shape[0])
        return n / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=20_000, help="samples read per reader measurement")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training measurement")
    parser.add_argument("--repeats", type=int, default=3, help="reader measurements per backend (median)")
    args = parser.parse_args()

    from ehrlake.config import Config, SecurityConfig, SparkConfig
    from ehrlake.security import init_keys
    from ehrlake.session import get_spark

    work = Path(tempfile.mkdtemp(prefix="ehrlake-bench-dl-"))
    keys = SecurityConfig(
        str(work / "master.key"), str(work / "keystore"), reveal_key_file=str(work / "reveal.key")
    )
    init_keys(keys)
    conf = work / "conf.yaml"
    conf.write_text(
        f"security:\n  master_key_file: {keys.master_key_file}\n  key_store: {keys.key_store}\n"
        f"  reveal_key_file: {keys.reveal_key_file}\n"
        f"  access_policy: {REPO / 'conf' / 'access_policy.yaml'}\n"
    )
    env = {**os.environ, "EHRLAKE_CONF": str(conf)}
    env.pop("PYSPARK_PYTHON", None)
    root = work / "lake"
    started = time.perf_counter()
    prepare(root, env)
    setup_s = time.perf_counter() - started

    snap = datasets.snapshot(str(root), "silver.imaging")
    sel = dl_train.image_selection("pneumoniamnist", "train", (64, 64))
    whole = datasets.plan_shards(snap, sel, 1)[0]
    readers = {}
    for backend in ("arrow", "petastorm"):
        rates = sorted(reader_rate(whole, sel, backend, args.samples) for _ in range(args.repeats))
        readers[backend] = {
            "samples_per_s": round(rates[len(rates) // 2], 1),
            "all": [round(r, 1) for r in rates],
        }
        print(f"reader {backend:<10} {readers[backend]['samples_per_s']:>10,.0f} samples/s")

    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = get_spark(Config(spark=SparkConfig(master="local[2]", app_name="bench-dl")))
    cfg = runtime.load()
    hyper = dataclasses.replace(cfg.cnn, batch_size=32)

    def train(workers: int, launcher: str) -> dict:
        payload = dl_train.plan("cnn", snap, sel, None, hyper, "auto", workers, args.epochs, 42, None)
        results = launch.run(spark, dl_train.fit_worker, payload, workers, launcher)
        seconds = max(r["seconds"] for r in results)
        samples = sum(r["samples"] for r in results)
        row = {
            "workers": workers,
            "launcher": launcher,
            "seconds": round(seconds, 1),
            "samples_per_s": round(samples / seconds, 1),
            "identical_weights": len({r["digest"] for r in results}) == 1,
        }
        rate = row["samples_per_s"]
        print(f"train {launcher:<8} {workers} worker(s) {rate:>8,.1f} samples/s ({seconds:.1f} s)")
        return row

    training = [train(1, "horovod"), train(2, "horovod"), train(2, "barrier")]
    one, two = training[0]["samples_per_s"], training[1]["samples_per_s"]
    efficiency = two / (2 * one)
    consumption = one
    result = {
        "date": dt.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "data": f"PneumoniaMNIST train {whole.rows} images 64x64 float32, silver.imaging v{snap.version} "
        f"({len(snap.files)} files)",
        "setup_seconds": round(setup_s, 1),
        "readers": readers,
        "petastorm_over_arrow": round(
            readers["petastorm"]["samples_per_s"] / readers["arrow"]["samples_per_s"], 2
        ),
        "training": training,
        "consumption_samples_per_s_one_worker": consumption,
        "reader_headroom": {b: round(r["samples_per_s"] / consumption, 1) for b, r in readers.items()},
        "horovod_scaling_efficiency_2_workers": round(efficiency, 2),
        "epochs": args.epochs,
    }
    out = REPO / "bench" / "results" / f"dl-{result['date']}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Deep-learning benchmark {result['date']} ({result['machine']['cpus']} cores, CPU TensorFlow)",
        "",
        f"Data: {result['data']}.",
        "",
        "| reader | samples/s | x training consumption (1 worker) |",
        "|---|---|---|",
        *[
            f"| {b} | {r['samples_per_s']:,.0f} | {result['reader_headroom'][b]}x |"
            for b, r in readers.items()
        ],
        "",
        "| launcher | workers | samples/s | seconds | identical weights |",
        "|---|---|---|---|---|",
        *[
            f"| {t['launcher']} | {t['workers']} | {t['samples_per_s']:,.1f} | {t['seconds']} "
            f"| {t['identical_weights']} |"
            for t in training
        ],
        "",
        f"Horovod scaling efficiency, 2 workers: {efficiency:.0%} (2-worker rate / twice the 1-worker rate).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
