"""The Flower ServerApp and ClientApp of a federated run (loaded from the app bundle in ``app/``).

The server never reads the lake: it gets the run's plan (``plan.json`` in the run's folder: the
inputs' names, rounds, strategy, privacy), asks every site for the moments of its training rows
(counts, sums, squares, extremes: :class:`~ehrlake.federated.learner.Moments`), pools them into one
scaling, and runs FedAvg or FedProx over the sites' fitted weights from the round-0 model
(``initial.npz``), wrapped in server-side clipping and Gaussian noise when the plan asks for
privacy. The server only averages arrays, so it runs the same for the logreg (one vector) and the
ANN (its layers' arrays). It writes what it received (names, shapes, bytes: ``received.jsonl``),
the global weights after every round (``rounds.npz``) and the final ones (``final.npz``) to the
run's folder, where ``ehrlake federated train`` takes them.

A site's ClientApp reads only the arrays its site extracted (``data`` of its node's config) and
trains the plan's model: the logreg in NumPy (:mod:`learner`), the ANN in TensorFlow (:mod:`ann`,
whose SuperNodes run in the deep-learning runtime).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx

from ehrlake.federated import learner

server = ServerApp()
client = ClientApp()

QUERY = "query"
WAIT_FOR_SITES_S = 120


# ---- the site ---------------------------------------------------------------------------------


def _site_rows(context: Context) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(str(context.node_config["data"]))
    return data["x"], data["y"]


@client.query()
def moments(msg: Message, context: Context) -> Message:
    x, y = _site_rows(context)
    m = learner.Moments.of(x, y)
    return Message(RecordDict({"moments": ArrayRecord(m.arrays())}), reply_to=msg)


@client.train()
def fit(msg: Message, context: Context) -> Message:
    x, y = _site_rows(context)
    config = msg.content["config"]
    scaling = learner.Scaling(np.array(config["mean"]), np.array(config["std"]), float(config["pos-weight"]))
    z = scaling.apply(x)
    start = msg.content["arrays"].to_numpy_ndarrays()
    private = config["privacy"] == "patient"  # DP-SGD on the site's rows, its noise drawn afresh each round
    seed = [int(config["seed"]), int(config["server-round"]), context.node_id % 2**32]
    mu = float(config.get("proximal-mu", 0.0))
    if config["model"] == "ann":  # TensorFlow: this SuperNode runs in the deep-learning runtime
        from ehrlake.federated import ann

        clip = float(config["dp-clip"]) if private else None
        local = ann.Local(int(config["local-steps"]), float(config["dp-rate"]),
                          float(config["learning-rate"]), mu, clip, float(config["dp-noise"]))  # fmt: skip
        hidden = [int(h) for h in config["hidden"]]
        weights, train_loss = ann.fit(start, z, y, hidden, float(config["dropout"]), local, seed)
    else:
        sample_weight = learner.weights_of(y, scaling.pos_weight)
        l1, steps = float(config["l1"]), int(config["local-steps"])
        if private:
            w = learner.fit_private(start[0], z, y, sample_weight, l1, steps, float(config["dp-rate"]),
                                    float(config["dp-clip"]), float(config["dp-noise"]),
                                    float(config["dp-step"]), np.random.default_rng(seed), mu)  # fmt: skip
        else:
            w = learner.fit(start[0], z, y, sample_weight, l1, steps, mu)
        weights, train_loss = [w], learner.loss(w, z, y, sample_weight, l1)
    # with site-level privacy every site counts the same (its noise is calibrated to an unweighted mean)
    weight = 1 if config["privacy"] == "site" else len(y)
    metrics = MetricRecord({"num-examples": weight, "train-loss": train_loss})
    return Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics}), reply_to=msg)


# ---- the server -------------------------------------------------------------------------------


class _Recorder:
    """Appends what the server receives (record names, array shapes, bytes) to ``received.jsonl``."""

    def __init__(self, folder: Path):
        self.path = folder / "received.jsonl"

    def __call__(self, stage: str, round_: int, replies: list[Message]) -> None:
        with self.path.open("a") as f:
            for reply in replies:
                if reply.has_error():
                    f.write(json.dumps({"stage": stage, "round": round_, "error": str(reply.error)}) + "\n")
                    continue
                arrays = {
                    name: [list(a.shape) for a in record.to_numpy_ndarrays()]
                    for name, record in reply.content.array_records.items()
                }
                size = sum(
                    a.nbytes for r in reply.content.array_records.values() for a in r.to_numpy_ndarrays()
                )
                metrics = {
                    k: list(v) for k, v in ((n, r.keys()) for n, r in reply.content.metric_records.items())
                }
                f.write(json.dumps({"stage": stage, "round": round_, "node": reply.metadata.src_node_id,
                                    "arrays": arrays, "metrics": metrics, "bytes": size}) + "\n")  # fmt: skip


def _recording(base: type, recorder: _Recorder):
    class Recorded(base):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            recorder("train", server_round, replies)
            return super().aggregate_train(server_round, replies)

    return Recorded


def _wait_for_sites(grid: Grid, sites: int) -> list[int]:
    deadline = time.monotonic() + WAIT_FOR_SITES_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= sites:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(nodes)} of {sites} sites connected in {WAIT_FOR_SITES_S} s")
        time.sleep(0.5)


@server.main()
def run(grid: Grid, context: Context) -> None:
    folder = Path(str(context.run_config["work"]))
    plan = json.loads((folder / "plan.json").read_text())
    recorder = _Recorder(folder)
    nodes = _wait_for_sites(grid, plan["sites"])
    ask = RecordDict({"config": ConfigRecord({"ask": "moments"})})
    asked = [Message(ask, dst_node_id=n, message_type=QUERY) for n in nodes]
    replies = list(grid.send_and_receive(asked))
    recorder(QUERY, 0, replies)
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(f"{len(failed)} sites could not summarise their rows: {failed[0].error}")
    pooled = learner.pool(
        [learner.Moments.from_arrays(r.content["moments"].to_numpy_ndarrays()) for r in replies]
    )
    scaling = learner.Scaling.of(pooled)
    np.savez(folder / "scaling.npz", mean=scaling.mean, std=scaling.std, pos_weight=scaling.pos_weight,
             low=pooled.low, high=pooled.high, rows=pooled.rows, positives=pooled.positives)  # fmt: skip

    private = plan["privacy"] == "site"  # patient-level noise is the sites' own
    base = FedProx if plan["strategy"] == "fedprox" else FedAvg
    options = {"proximal_mu": plan["proximal_mu"]} if base is FedProx else {}
    n = plan["sites"]
    strategy = _recording(base, recorder)(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                                          min_available_nodes=n, **options)  # fmt: skip
    if private:
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, plan["noise"], plan["site_clip"], n)
    rounds: dict[str, np.ndarray] = {}

    def keep(round_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if round_ > 0:
            rounds.update(named(arrays.to_numpy_ndarrays(), f"r{round_}_"))
        return None

    config = ConfigRecord({"mean": scaling.mean.tolist(), "std": scaling.std.tolist(),
                           "pos-weight": scaling.pos_weight, "l1": plan["l1"],
                           "local-steps": plan["local_steps"], "privacy": plan["privacy"] or "",
                           "dp-noise": plan["noise"], "dp-clip": plan["patient_clip"],
                           "dp-rate": plan["sample_rate"], "dp-step": plan["private_step"],
                           "seed": plan["seed"], "model": plan["model"],
                           **plan.get("network", {})})  # fmt: skip
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(weights(np.load(folder / "initial.npz"))),
        num_rounds=plan["rounds"],
        train_config=config,
        evaluate_fn=keep,
    )
    losses = [
        float(result.train_metrics_clientapp[r]["train-loss"]) for r in sorted(result.train_metrics_clientapp)
    ]
    np.savez(folder / "rounds.npz", train_loss=np.array(losses), **rounds)
    np.savez(folder / "final.npz", **named(result.arrays.to_numpy_ndarrays()))


def named(arrays: list[np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """A model's arrays as ``.npz`` entries ``<prefix>w<i>`` (:func:`weights` reads them back)."""
    return {f"{prefix}w{i}": a for i, a in enumerate(arrays)}


def _order(name: str) -> int:
    return int(name.rsplit("w", 1)[1])


def weights(saved, prefix: str = "") -> list[np.ndarray]:
    """The arrays :func:`_named` saved under ``prefix``, in order."""
    names = [n for n in saved.files if n.startswith(prefix + "w") and n[len(prefix) + 1 :].isdigit()]
    return [saved[n] for n in sorted(names, key=_order)]
