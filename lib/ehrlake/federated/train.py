"""``ehrlake federated train``: an L1 logistic regression or the tabular ANN trained across sites
with Flower.

1. the task's federated table is written with each row's site and split (:func:`sites.prepare`);
2. each site's client extracts its own training rows as its ``site:<name>`` role (:func:`sites.extract`),
   to a folder only its SuperNode reads;
3. Flower runs: a SuperLink, a SuperNode per site, the ServerApp pooling the sites' moments and
   averaging their fitted weights round by round (FedAvg or FedProx), with clipping and Gaussian
   noise when privacy is asked for (:mod:`runtime`, :mod:`flower_apps`);
4. the final weights become the central logreg pipeline (:mod:`model`), or the central ANN's saved
   Keras network (``--model ann``, in the deep-learning runtime: :mod:`ann`), evaluated on the
   held-out patients of all sites by the same evaluation as central training, and registered as
   ``<task>.logreg-federated`` / ``<task>.ann-federated`` with its strategy, rounds, sites, epsilon
   and delta. The ANN version is scored as the central ANN is (same artifact layout, ``scaling``
   and ``accepts``).

The sites' extracts are deleted when the run ends; only the model and its record remain.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.errors import EhrlakeError
from ehrlake.federated import flower_apps, learner, model, privacy, runtime, sites
from ehrlake.models import evaluate, explain, registry, versions
from ehrlake.models.train import DEFAULT_SEED, score_column

STRATEGIES = ("fedavg", "fedprox")
ALGORITHMS = ("logreg", "ann")
TIMEOUT_S = 1800


@dataclass(frozen=True)
class Run:
    model: registry.ModelVersion
    site_rows: dict[str, int]
    round_auroc: list[float]
    bytes_per_round: int
    unsited: int
    received: list[dict]  # what the server received from the sites: record names, shapes, bytes

    def lines(self) -> list[str]:
        p = self.model.params
        privacy_ = (
            f"{p['privacy']}-level epsilon {p['epsilon']:.2f} at delta {p['delta']:g} "
            f"(noise {p['noise_multiplier']:.2f}, clip {p['clip']:g})"
            if p["noise_multiplier"] else "no differential privacy"
        )  # fmt: skip
        out = [
            f"{self.model.label}: {p['strategy']}, {p['rounds']} rounds over {len(self.site_rows)} sites "
            f"({', '.join(f'{s} {n:,}' for s, n in self.site_rows.items())} training rows); {privacy_}",
            f"  {self.model.headline()}; test AUROC by round: "
            + " ".join(f"{a:.3f}" for a in self.round_auroc),
            f"  each round the server received {self.bytes_per_round:,} bytes of "
            + ("keys, key shares and masked updates (SecAgg+: it learnt only their sum)"
               if p.get("secure_aggregation") else "model updates")
            + ", no rows",
        ]  # fmt: skip
        if self.unsited:
            out.append(
                f"  {self.unsited:,} rows meet no site's condition ({sites.CONF.name}) and were left out"
            )
        return out


def train(
    lake,
    task: str,
    site_names: list[str] | None = None,
    rounds: int | None = None,
    strategy: str = "fedavg",
    epsilon: float | None = None,
    noise: float | None = None,
    level: str = privacy.PATIENT,
    seed: int = DEFAULT_SEED,
    role: str | None = None,
    bootstrap: int = evaluate.BOOTSTRAP,
    algorithm: str = "logreg",
    secure: bool = False,
) -> Run:
    """Train, evaluate and register one federated model of ``task`` (see the module). ``secure``:
    Flower's SecAgg+, so the server learns only the sum of the sites' updates each round."""
    if algorithm not in ALGORITHMS:
        raise EhrlakeError(f"unknown federated model {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    if secure and (epsilon is not None or noise) and level == privacy.SITE:
        raise EhrlakeError(
            "site-level privacy clips each site's update at the server, which secure aggregation hides "
            "from it: use --privacy patient (noise added at the sites) with --secure-aggregation"
        )
    network = None
    if algorithm == "ann":  # before any work: a clear error outside the deep-learning runtime
        from ehrlake.dl import runtime as dl_runtime

        dl_runtime.tensorflow()
        hyper = dl_runtime.load().ann
        network = {"hidden": list(hyper.hidden), "dropout": hyper.dropout,
                   "learning-rate": hyper.learning_rate}  # fmt: skip
    conf = sites.settings()
    declared = conf.of(task)
    site_names = site_names or list(declared)
    unknown = [s for s in site_names if s not in declared]
    if unknown:
        raise EhrlakeError(f"task {task} has no site {', '.join(unknown)} (its sites: {', '.join(declared)})")
    if len(site_names) < 2:
        raise EhrlakeError("a federation needs at least two sites")
    if strategy not in STRATEGIES:
        raise EhrlakeError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if epsilon is not None and noise is not None:
        raise EhrlakeError("give --epsilon or --noise, not both")
    rounds = rounds or conf.rounds
    accounting = (level, rounds, conf.delta, conf.local_steps, conf.sample_rate)
    if epsilon is not None:
        noise = privacy.noise_for(epsilon, *accounting)
    noise = float(noise or 0.0)
    spent = privacy.epsilon(level, noise, *accounting[1:]) if noise else None
    if network and noise and level == privacy.PATIENT:
        network["learning-rate"] = conf.ann_private_learning_rate

    prepared = sites.prepare(lake, task, seed, role_name=role)
    inputs = sites.inputs(task)
    plan = {"inputs": inputs, "rounds": rounds, "strategy": strategy, "l1": conf.l1,
            "local_steps": conf.local_steps, "proximal_mu": conf.proximal_mu, "sites": len(site_names),
            "privacy": level if noise else None, "noise": noise, "site_clip": conf.site_clip,
            "patient_clip": conf.patient_clip, "sample_rate": conf.sample_rate,
            "private_step": conf.private_step, "seed": seed, "model": algorithm,
            "secure_aggregation": secure}  # fmt: skip
    if network:
        plan["network"] = network
    fed = _federate(lake, task, site_names, plan)
    clip = (conf.patient_clip if level == privacy.PATIENT else conf.site_clip) if noise else None

    table = sites.table(task)
    # the held-out stays, read for every round's AUROC, the metrics, the bands and the evaluation
    test = lake.read(table).where(F.col("split") == sites.TEST).persist()
    try:
        model_id = f"{task}.{algorithm}-federated"
        with lake.security.job("federated.train", ["gold"], role) as (_, audit):
            version, artifact, path = versions.new_artifact(lake, model_id)
            held_out = (_ann_held_out if algorithm == "ann" else _logreg_held_out)(
                lake, test, inputs, fed, path, plan
            )
            metrics = evaluate.metrics(held_out.scored, fed.base_rate, bootstrap)
            metrics["train_seconds"] = {"value": round(fed.seconds, 1)}
            train_bytes = [r["bytes"] for r in fed.received if r["stage"] == "train"]
            params = {
                "federated": True,
                "strategy": strategy,
                "rounds": rounds,
                "sites": site_names,
                "site_rows": fed.site_rows,
                "privacy": level if noise else None,  # the unit epsilon protects: a patient's row, or a site
                "noise_multiplier": noise,
                "clip": clip,
                "sample_rate": conf.sample_rate if noise and level == privacy.PATIENT else None,
                "epsilon": spent,
                "delta": conf.delta if noise else None,
                "local_steps": conf.local_steps,
                "proximal_mu": conf.proximal_mu if strategy == "fedprox" else None,
                "secure_aggregation": secure,  # SecAgg+: the server saw only the sum of the updates
                "imputation": "federation's mean",
                "round_auroc": held_out.round_auroc,
                "round_train_loss": fed.round_loss,  # the sites' mean training objective after each round
                "bytes_per_round": sum(train_bytes) // max(rounds, 1),
                "seed": seed,
                "test_percent": sites.TEST_PERCENT,
                "test_patients": "generated copies only" if prepared["generated_only"] else "real",
                "threshold": fed.base_rate,
                "accepts": fed.accepts,
                "trained_by": role or lake.security.default_role,
                **held_out.params,
            }
            mv = registry.ModelVersion(
                model_id=model_id,
                version=version,
                task=task,
                algorithm=algorithm,
                params=params,
                features=inputs,
                training_data={**prepared["training_data"], table: lake.version(table)},
                metrics=metrics,
                bands=evaluate.risk_bands(held_out.scored),
                artifact=artifact,
                created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
                status=registry.CANDIDATE,
            )
            mv = versions.register(lake, audit, mv, held_out.scored, held_out.importance)
        return Run(mv, fed.site_rows, held_out.round_auroc, params["bytes_per_round"], prepared["unsited"],
                   fed.received)  # fmt: skip
    finally:
        test.unpersist()


@dataclass(frozen=True)
class _HeldOut:
    """A federated model saved and scored on the held-out stays: what registration needs of it."""

    scored: DataFrame  # the test rows with ``score``
    round_auroc: list[float]
    params: dict  # the model kind's own parameters
    importance: dict | None


def _logreg_held_out(lake, test: DataFrame, inputs, fed: _Outcome, path: str, plan: dict) -> _HeldOut:
    """The weights as central training's logreg pipeline, saved at ``path``; every round's AUROC
    from its log-odds (no model written for them)."""
    scaling = fed.scaling
    auroc = BinaryClassificationEvaluator(rawPredictionCol="_z", labelCol="label", metricName="areaUnderROC")
    round_auroc = [float(auroc.evaluate(test.withColumn("_z", model.log_odds(inputs, scaling, w[0]))))
                   for w in fed.by_round]  # fmt: skip
    fitted = model.pipeline(lake.spark, inputs, scaling, fed.final[0])
    fitted.write().save(path)
    scored = fitted.transform(test).withColumn("score", score_column(scaling.pos_weight))
    params = {"l1": plan["l1"], "pos_weight": scaling.pos_weight}
    return _HeldOut(scored, round_auroc, params, explain.importance("logreg", fitted, inputs))


def _ann_held_out(lake, test: DataFrame, inputs, fed: _Outcome, path: str, plan: dict) -> _HeldOut:
    """The weights in central training's ANN, saved as its Keras file at ``path`` (and each
    round's under ``rounds/``), scored on the executors as the central ANN's test rows are."""
    from ehrlake.dl import nets, predict
    from ehrlake.dl.tensors import tensor
    from ehrlake.federated import ann

    network = plan["network"]
    mean_sd = zip(inputs, fed.scaling.mean, fed.scaling.std, strict=True)
    scaling = {c: (float(m), float(s)) for c, m, s in mean_sd}
    keep = tuple(c for c in sites.SUBGROUPS if c in test.columns)
    rows = test.select(F.col("index_id").cast("string").alias("index_id"), "patient_key", "split",
                       F.col("label").cast("int").alias("label"), tensor(scaling).alias("x"),
                       *keep)  # fmt: skip

    def save(weights: list[np.ndarray], folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        plain = ann.network(len(inputs), network["hidden"], network["dropout"])
        nets.save_portable(plain, weights, os.path.join(folder, "model.keras"))

    auroc = BinaryClassificationEvaluator(
        rawPredictionCol="score", labelCol="label", metricName="areaUnderROC"
    )
    round_auroc = []
    for r, weights in enumerate(fed.by_round, start=1):
        folder = os.path.join(path, "rounds", f"r{r}")
        save(weights, folder)
        round_auroc.append(float(auroc.evaluate(predict.tabular_scores(rows, folder, inputs, reasons=0))))
    save(fed.final, path)
    scored = predict.tabular_scores(rows, path, inputs, keep=keep)
    params = {**{k.replace("-", "_"): v for k, v in network.items()}, "scaling": scaling}
    return _HeldOut(scored, round_auroc, params, None)


@dataclass(frozen=True)
class _Outcome:
    """What a federation's run leaves: the pooled scaling, the weights, what the server received."""

    scaling: learner.Scaling
    final: list[np.ndarray]  # the model's arrays (logreg: one vector, coefficients then intercept)
    by_round: list[list[np.ndarray]]
    round_loss: list[float]
    received: list[dict]
    accepts: dict[str, list[float]]
    base_rate: float
    seconds: float
    site_rows: dict[str, int]


def _federate(lake, task: str, site_names: list[str], plan: dict) -> _Outcome:
    """Each site's extract as its role, then Flower's run over them, in a folder removed after."""
    inputs = plan["inputs"]
    folder = Path(tempfile.mkdtemp(prefix="ehrlake-federated-"))
    try:
        extracts, site_rows = {}, {}
        for site in site_names:
            extracts[site] = folder / "sites" / f"{site}.npz"
            site_rows[site] = sites.extract(lake, task, site, str(extracts[site]))
        out = folder / "server"
        out.mkdir()
        (out / "plan.json").write_text(json.dumps(plan))
        np.savez(out / "initial.npz", **flower_apps.named(_initial(plan)))
        started = dt.datetime.now(dt.UTC)
        runtime.run(folder, extracts, TIMEOUT_S)
        seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
        s = np.load(out / "scaling.npz")
        history = np.load(out / "rounds.npz")
        return _Outcome(
            scaling=learner.Scaling(s["mean"], s["std"], float(s["pos_weight"])),
            final=flower_apps.weights(np.load(out / "final.npz")),
            by_round=[flower_apps.weights(history, f"r{r}_") for r in range(1, plan["rounds"] + 1)],
            round_loss=[float(v) for v in history["train_loss"]],
            received=[json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()],
            accepts={
                c: [float(lo), float(hi)]
                for c, lo, hi in zip(inputs, s["low"], s["high"], strict=True)
                if not np.isnan(lo)
            },  # fmt: skip
            base_rate=float(s["positives"]) / float(s["rows"]),
            seconds=seconds,
            site_rows=site_rows,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the sites' rows leave with the run


def _initial(plan: dict) -> list[np.ndarray]:
    """Round 0's global model: logreg's zeros, the ANN's seeded initialisation."""
    if plan["model"] == "ann":
        from ehrlake.federated import ann

        net = plan["network"]
        return ann.initial_weights(len(plan["inputs"]), net["hidden"], net["dropout"], plan["seed"])
    return [np.zeros(len(plan["inputs"]) + 1)]
