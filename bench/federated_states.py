"""Benchmark: federated learning at volume, a site per state of a generated population (issue 24).

A population of ``--patients`` generated patients in four Indian states (``ehrlake synth`` with
``conf/synth/india_demo.yaml``: Uttar Pradesh, Maharashtra, Bihar, West Bengal, weighted by
population) -> ingest -> clean -> features; the sites are the states (a ``site:<state>`` role
each, in a copy of the repository's policy), and the task is ``mortality_12m`` at three yearly
dates. ``ehrlake federated train`` then runs the L1 logistic regression over the four SuperNodes,
plain (FedAvg) and under SecAgg+, against the baseline of the same fit done centrally on the
pooled rows in one process (what a national lake does without federation).

What it measures: rows per site, the sites' extraction, the federated run's wall time and time
per round, and the bytes the server received per round, each as a ratio to the central fit.
What it does not: accuracy. Generated patients are copies of the sample patients, so they give
volume and never a test split (docs/features.md); Diabetes 130-US's real stays give the accuracy
(``bench/federated.py``).

    .venv/bin/python bench/federated_states.py [--patients 20000] [--rounds 10] [--out DIR]

Results: ``bench/results/federated-states-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result, secured_lake  # noqa: E402

from ehrlake import clean, config, features, ingest, synth  # noqa: E402
from ehrlake.federated import learner, sites  # noqa: E402
from ehrlake.federated import train as federated  # noqa: E402
from ehrlake.ingest import SourceKind  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402

TASK = "mortality_12m"
REGIONS = REPO / "conf" / "synth" / "india_demo.yaml"
AS_OF = [dt.date(y, 1, 1) for y in (2019, 2020, 2021)]
TABLES = ("encounters", "conditions", "observations", "medications", "procedures")


def slug(state: str) -> str:
    return state.lower().replace(" ", "_")


def federation_files(work: Path, states: list[str]) -> tuple[Path, Path]:
    """The sites (one per state) and a policy with a ``site:<state>`` role each, as
    ``conf/federated.yaml`` and ``conf/access_policy.yaml`` declare the shipped ones."""
    policy = yaml.safe_load((REPO / "conf" / "access_policy.yaml").read_text())
    template = policy["roles"]["site:emergency"]
    for state in states:
        policy["roles"][f"site:{slug(state)}"] = {
            **template, "description": f"federated client of {state}", "rows": f"site = '{slug(state)}'"
        }  # fmt: skip
    policy_file = work / "access_policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    shipped = yaml.safe_load((REPO / "conf" / "federated.yaml").read_text())
    conf = {"defaults": shipped["defaults"],
            "tasks": {TASK: {"sites": {slug(s): f"state = '{s}'" for s in states}}}}  # fmt: skip
    sites_file = work / "federated.yaml"
    sites_file.write_text(yaml.safe_dump(conf, sort_keys=False))
    return policy_file, sites_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-federated-states-"))
    states = list(yaml.safe_load(REGIONS.read_text())["regions"])
    policy_file, sites_file = federation_files(work, states)
    os.environ["EHRLAKE_FEDERATED_CONF"] = str(sites_file)  # sites.settings() reads it
    spark = get_spark(config.load())
    setup = {}
    t = time.perf_counter()
    synth.run(spark, args.patients, str(work / "population"), seed=5, regions=REGIONS, tables=TABLES)
    setup["synth"] = time.perf_counter() - t
    lake = secured_lake(work / "lake", spark, work / "secrets", policy=policy_file)
    for stage, step in (
        ("ingest", lambda: ingest.run(lake, SourceKind.SYNTHEA_CSV, str(work / "population"))),
        ("clean", lambda: clean.run(lake)),
        ("features", lambda: features.run(lake, AS_OF)),
    ):
        t = time.perf_counter()
        step()
        setup[stage] = round(time.perf_counter() - t, 1)
        print(f"{stage}: {setup[stage]:.0f} s", flush=True)

    conf = sites.settings()
    site_names = list(conf.of(TASK))
    prepared = sites.prepare(lake, TASK, 42)
    # the baseline: the same fit, on the pooled training rows of every site, in one process
    t = time.perf_counter()
    parts = {}
    for s in site_names:
        path = work / "extracts" / f"{s}.npz"
        sites.extract(lake, TASK, s, str(path))
        data = np.load(path)
        parts[s] = (data["x"], data["y"])
    extract_seconds = time.perf_counter() - t
    x = np.vstack([p[0] for p in parts.values()])
    y = np.concatenate([p[1] for p in parts.values()])
    t = time.perf_counter()
    scaling = learner.Scaling.of(learner.Moments.of(x, y))
    z = scaling.apply(x)
    learner.fit(np.zeros(x.shape[1] + 1), z, y, learner.weights_of(y, scaling.pos_weight), conf.l1,
                args.rounds * conf.local_steps)  # fmt: skip
    central_seconds = time.perf_counter() - t
    per_site = ", ".join(f"{s} {len(p[1]):,}" for s, p in parts.items())
    print(f"{TASK}: {len(y):,} training rows at {len(parts)} sites ({per_site}); "
          f"central fit {central_seconds:.1f} s", flush=True)  # fmt: skip

    runs = {}
    for name, secure in (("fedavg", False), ("fedavg+secagg", True)):
        t = time.perf_counter()
        run = federated.train(lake, TASK, rounds=args.rounds, secure=secure, bootstrap=100)
        seconds = time.perf_counter() - t
        p = run.model.params
        runs[name] = {
            "seconds": round(seconds, 1),
            "train_seconds": run.model.metrics["train_seconds"]["value"],
            "seconds_per_round": round(run.model.metrics["train_seconds"]["value"] / args.rounds, 2),
            "bytes_per_round": p["bytes_per_round"],
            "site_rows": p["site_rows"],
            "vs_central_fit": round(run.model.metrics["train_seconds"]["value"] / central_seconds, 1),
            "model": run.model.label,
        }
        r = runs[name]
        print(f"{name:<14} {r['train_seconds']:.0f} s in Flower ({r['seconds_per_round']:.1f} s/round, "
              f"{r['vs_central_fit']:.0f}x the central fit), {p['bytes_per_round']:,} B/round; "
              f"{seconds:.0f} s with extraction and evaluation", flush=True)  # fmt: skip
    result = {
        "task": TASK,
        "patients": args.patients,
        "as_of": [d.isoformat() for d in AS_OF],
        "states": states,
        "rows_per_site": {s: sum(v.values()) for s, v in prepared["sites"].items()},
        "unsited_rows": prepared["unsited"],
        "rounds": args.rounds,
        "setup_seconds": {k: round(v, 1) for k, v in setup.items()},
        "extract_seconds": round(extract_seconds, 1),
        "central_fit_seconds": round(central_seconds, 2),
        "federated": runs,
        "accuracy": "not measured: generated patients are copies of the sample patients (bench/federated.py "
        "measures it on Diabetes 130-US's real stays)",
        "machine": machine(spark),
    }
    path = save_result(args.out, "federated-states", result)
    print(f"-> {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
