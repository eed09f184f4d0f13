"""Benchmark: what federated learning costs in accuracy, and what privacy costs on top (issue 24).

On Diabetes 130-US (the shared subset: real stays of 130 US hospitals) split into the sites of
``conf/federated.yaml`` (by admission source: emergency, referral, other), with the patient-grouped
split of central training (20% of patients held out, the same seed), every model below is the same
L1 logistic regression on the same inputs, scored on the same held-out stays of all sites:

- **central**: all sites' training rows pooled in one place, fitted by the same proximal gradient
  descent (:func:`ehrlake.federated.learner.fit`) for as many steps as a federated run takes in
  all (rounds x local steps), the federation's scaling;
- **local only**: each site alone, with its own scaling (mean over the sites, and each);
- **federated**: ``ehrlake federated train`` through Flower's real runtime (a SuperLink and a
  SuperNode per site over 127.0.0.1): FedAvg and FedProx; with patient-level differential privacy
  (DP-SGD at the sites) at epsilon 1, 3 and 8; with site-level privacy at epsilon 8;

each with its held-out AUROC and a bootstrap interval (1,000 resamples of stays for the NumPy
baselines, the product's evaluation for the registered federated models), the rounds until the
test AUROC is within 0.005 of its last value, and the bytes the server received per round.
Aims: federated within 0.01 AUROC of central; patient-level DP at epsilon 8 within 0.03.

``--model ann`` (in the deep-learning runtime) does the same for the tabular ANN: central and
local-only are the same network trained by the same local step (:func:`ehrlake.federated.ann.fit`:
Adam on Poisson samples of the rows) for rounds x local steps on the pooled rows or one site's;
federated FedAvg, FedProx and patient-level DP at epsilon 8 through Flower. The logreg's runs add
FedAvg under secure aggregation (SecAgg+): its bytes and time per round.

    .venv/bin/python bench/federated.py [--lake LAKE] [--out DIR]
    .venv-dl/bin/python bench/federated.py --model ann [--lake LAKE] [--out DIR]

``--lake``: a lake with Diabetes 130-US ingested and its features built (ehrlake ingest --source
csv-extract --extract diabetes130, ehrlake features); without it a scratch lake is built from the
shared extract (or the bundled sample). Results: ``bench/results/federated-<date>.json``
(``federated-ann-<date>.json``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result, secured_lake  # noqa: E402

from ehrlake import features, ingest  # noqa: E402
from ehrlake.federated import learner, sites  # noqa: E402
from ehrlake.federated import train as federated  # noqa: E402
from ehrlake.ingest import SourceKind  # noqa: E402

TASK = "diabetes130_readmission_30d"
SHARED = REPO.parent / "shared" / "data" / "diabetes_130_us"
SEED = 42


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def _with_interval(y: np.ndarray, score: np.ndarray, resamples: int = 1000) -> dict:
    rng = np.random.default_rng(7)
    draws = [_auroc(y[i], score[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(resamples))]
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {"auroc": round(_auroc(y, score), 4), "ci": [round(float(low), 4), round(float(high), 4)]}


def _rows(lake, split: str, site: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    from pyspark.sql import functions as F

    df = lake.read(sites.table(TASK)).where(F.col("split") == split)
    if site:
        df = df.where(F.col("site") == site)
    return sites.arrays(df, sites.inputs(TASK))


def _logreg(parts: list[tuple[np.ndarray, np.ndarray]], scaling: learner.Scaling, conf, test_x: np.ndarray):
    """The held-out log-odds of the logreg fitted on ``parts`` pooled, rounds x local steps."""
    x = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    weights = learner.weights_of(y, scaling.pos_weight)
    steps = conf.rounds * conf.local_steps
    w = learner.fit(np.zeros(x.shape[1] + 1), scaling.apply(x), y, weights, conf.l1, steps)
    return scaling.apply(test_x) @ w[:-1] + w[-1]


def _ann(parts: list[tuple[np.ndarray, np.ndarray]], scaling: learner.Scaling, conf, test_x: np.ndarray):
    """The held-out scores of the ANN trained on ``parts`` pooled by the sites' own local step,
    rounds x local steps of it."""
    from ehrlake.dl import runtime
    from ehrlake.federated import ann

    hyper = runtime.load().ann
    x = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    start = ann.initial_weights(x.shape[1], list(hyper.hidden), hyper.dropout, SEED)
    local = ann.Local(conf.rounds * conf.local_steps, conf.sample_rate, hyper.learning_rate)
    w, _ = ann.fit(start, scaling.apply(x), y, list(hyper.hidden), hyper.dropout, local, [SEED])
    net = ann.network(x.shape[1], list(hyper.hidden), hyper.dropout)
    net.set_weights(w)
    return net.predict(scaling.apply(test_x).astype("float32"), batch_size=4096, verbose=0)[:, 0]


def _federated(lake, label: str, **kw) -> dict:
    started = time.perf_counter()
    run = federated.train(lake, TASK, seed=SEED, **kw)
    p, a = run.model.params, run.model.metrics["auroc"]
    rounds = p["round_auroc"]
    converged = next(i + 1 for i, v in enumerate(rounds) if abs(v - rounds[-1]) <= 0.005)
    out = {
        "auroc": round(a["value"], 4),
        "ci": [round(a["ci_low"], 4), round(a["ci_high"], 4)],
        "round_auroc": [round(v, 4) for v in rounds],
        "rounds_to_converge": converged,
        "bytes_per_round": p["bytes_per_round"],
        "epsilon": p["epsilon"],
        "delta": p["delta"],
        "privacy": p["privacy"],
        "noise_multiplier": p["noise_multiplier"],
        "model": run.model.label,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(f"{label:<28} AUROC {out['auroc']:.3f} ({out['ci'][0]:.3f}-{out['ci'][1]:.3f})  converged by round "
          f"{converged}, {out['bytes_per_round']:,} B/round, {out['seconds']:.0f} s", flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", help="a lake with Diabetes 130-US features (default: a scratch lake)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--model", choices=["logreg", "ann"], default="logreg",
                        help="ann: the tabular ANN, in the deep-learning runtime (.venv-dl)")  # fmt: skip
    args = parser.parse_args()
    fit_and_score = _ann if args.model == "ann" else _logreg

    if args.lake:
        from ehrlake import lake as lakes

        lake = lakes.open(args.lake)
    else:
        from ehrlake import config
        from ehrlake.session import get_spark

        work = Path(tempfile.mkdtemp(prefix="bench-federated-"))
        lake = secured_lake(work / "lake", get_spark(config.load()), work / "secrets")
        source = SHARED if SHARED.exists() else REPO / "data" / "sample" / "diabetes_130_us"
        ingest.run(lake, SourceKind.CSV_EXTRACT, str(source), extract="diabetes130")
        features.run(lake)
    conf = sites.settings()
    site_names = list(conf.of(TASK))
    sites.prepare(lake, TASK, SEED)
    test_x, test_y = _rows(lake, sites.TEST)
    train = {s: _rows(lake, sites.TRAIN, s) for s in site_names}
    print(f"{TASK}: {', '.join(f'{s} {len(v[1]):,}' for s, v in train.items())} training stays; "
          f"{len(test_y):,} held-out stays ({int(test_y.sum()):,} readmitted)", flush=True)  # fmt: skip

    pooled = learner.pool([learner.Moments.of(*train[s]) for s in site_names])
    scaling = learner.Scaling.of(pooled)
    central = _with_interval(test_y, fit_and_score(list(train.values()), scaling, conf, test_x))
    print(
        f"{'central':<28} AUROC {central['auroc']:.3f} ({central['ci'][0]:.3f}-{central['ci'][1]:.3f})",
        flush=True,
    )
    local = {}
    for s in site_names:
        own = learner.Scaling.of(learner.Moments.of(*train[s]))
        local[s] = _with_interval(test_y, fit_and_score([train[s]], own, conf, test_x))
    local_mean = round(float(np.mean([v["auroc"] for v in local.values()])), 4)
    print(
        f"{'local only (mean of sites)':<28} AUROC {local_mean:.3f}  "
        + ", ".join(f"{s} {v['auroc']:.3f}" for s, v in local.items()),
        flush=True,
    )

    model = {"algorithm": args.model}
    runs = {
        "fedavg": _federated(lake, "federated FedAvg", strategy="fedavg", **model),
        "fedprox": _federated(lake, "federated FedProx", strategy="fedprox", **model),
    }
    # the ANN's DP-SGD takes per-row gradients of every layer: one level, the aim's epsilon
    for eps in (8.0, 3.0, 1.0) if args.model == "logreg" else (8.0,):
        runs[f"fedavg+patient-dp-eps{eps:g}"] = _federated(
            lake, f"FedAvg, patient DP eps {eps:g}", epsilon=eps, **model
        )
    if args.model == "logreg":
        runs["fedavg+site-dp-eps8"] = _federated(lake, "FedAvg, site DP eps 8", epsilon=8.0, level="site")
        # SecAgg+: the protocol's cost in bytes and time (the model is the plain run's)
        runs["fedavg+secagg"] = _federated(lake, "FedAvg under SecAgg+", secure=True)

    gap = round(central["auroc"] - runs["fedavg"]["auroc"], 4)
    dp_gap = round(central["auroc"] - runs["fedavg+patient-dp-eps8"]["auroc"], 4)
    result = {
        "task": TASK,
        "model": args.model,
        "sites": {
            s: {"training_stays": len(train[s][1]), "positives": int(train[s][1].sum())} for s in site_names
        },
        "test_stays": len(test_y),
        "settings": {
            k: getattr(conf, k)
            for k in (
                "rounds",
                "local_steps",
                "l1",
                "proximal_mu",
                "delta",
                "sample_rate",
                "patient_clip",
                "private_step",
                "site_clip",
            )
        },  # fmt: skip
        "central": central,
        "local_only": {"mean_auroc": local_mean, "sites": local},
        "federated": runs,
        "aims": {
            "federated_within_0.01_of_central": {"gap": gap, "met": gap <= 0.01},
            "patient_dp_eps8_within_0.03_of_central": {"gap": dp_gap, "met": dp_gap <= 0.03},
        },
        "machine": machine(lake.spark),
    }
    path = save_result(args.out, "federated" if args.model == "logreg" else "federated-ann", result)
    print(
        f"central - FedAvg: {gap:+.3f} AUROC (aim <= 0.01); "
        f"central - patient DP eps 8: {dp_gap:+.3f} (aim <= 0.03)"
    )
    print(f"-> {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
