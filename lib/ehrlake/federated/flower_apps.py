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
import zlib
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx

from ehrlake.federated import learner


def _secure_when_asked(msg: Message, context: Context, call_next):
    """Flower's SecAgg+ client mod for the messages of a secure run; other messages pass as they are
    (the mod itself expects its protocol's records in every training message)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


server = ServerApp()
client = ClientApp(mods=[_secure_when_asked])

QUERY = "query"
WAIT_FOR_SITES_S = 120
# SecAgg+: a site's private key is shared with every other site and this share of them rebuilds it
# (a site that drops out is unmasked with the others' shares); updates are clipped to +-SECURE_RANGE
# before they are quantised (weights of both models here are well inside it)
SECURE_THRESHOLD = 0.6
SECURE_RANGE = 8.0


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
    config, start, legacy = _instructions(msg)
    scaling = learner.Scaling(np.array(config["mean"]), np.array(config["std"]), float(config["pos-weight"]))
    # the site's own noise and sampling: seeded by the run, the round and the site's name (a node's
    # id is new every run), so a private run is repeatable
    site = zlib.crc32(str(context.node_config["site"]).encode())
    seed = [int(config["seed"]), int(config["server-round"]), site]
    weights, train_loss = _local_fit(config, start, scaling.apply(x), y, scaling, seed)
    # with site-level privacy every site counts the same (its noise is calibrated to an unweighted mean)
    weight = 1 if config["privacy"] == "site" else len(y)
    if legacy:
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat

        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), weight, {"train-loss": train_loss})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
    metrics = MetricRecord({"num-examples": weight, "train-loss": train_loss})
    return Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics}), reply_to=msg)


def _instructions(msg: Message) -> tuple[ConfigRecord, list[np.ndarray], bool]:
    """A training message's config and global weights, and whether it came in the legacy FitIns
    form (a secure run's: Flower's SecAgg+ workflow)."""
    if "fitins.config" not in msg.content.config_records:
        return msg.content["config"], msg.content["arrays"].to_numpy_ndarrays(), False
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    # read as records: the legacy converter refuses the config's lists (the scaling)
    arrays = msg.content.array_records["fitins.parameters"]
    start = parameters_to_ndarrays(compat.arrayrecord_to_parameters(arrays, keep_input=True))
    return msg.content.config_records["fitins.config"], start, True


def _local_fit(config, start, z, y, scaling, seed) -> tuple[list[np.ndarray], float]:
    """The plan's model fitted on the site's standardised rows from the global weights: its new
    weights and its training loss."""
    private = config["privacy"] == "patient"  # DP-SGD on the site's rows, its noise drawn afresh each round
    mu = float(config.get("proximal-mu", 0.0))
    if config["model"] == "ann":  # TensorFlow: this SuperNode runs in the deep-learning runtime
        from ehrlake.federated import ann

        clip = float(config["dp-clip"]) if private else None
        local = ann.Local(int(config["local-steps"]), float(config["dp-rate"]),
                          float(config["learning-rate"]), mu, clip, float(config["dp-noise"]))  # fmt: skip
        hidden = [int(h) for h in config["hidden"]]
        return ann.fit(start, z, y, hidden, float(config["dropout"]), local, seed)
    sample_weight = learner.weights_of(y, scaling.pos_weight)
    l1, steps = float(config["l1"]), int(config["local-steps"])
    if private:
        w = learner.fit_private(start[0], z, y, sample_weight, l1, steps, float(config["dp-rate"]),
                                float(config["dp-clip"]), float(config["dp-noise"]), float(config["dp-step"]),
                                np.random.default_rng(seed), mu)  # fmt: skip
    else:
        w = learner.fit(start[0], z, y, sample_weight, l1, steps, mu)
    return [w], learner.loss(w, z, y, sample_weight, l1)


# ---- the server -------------------------------------------------------------------------------


class _RecordingGrid(Grid):
    """The ServerApp's grid, appending to ``received.jsonl`` what every reply brought the server:
    record names, array shapes, bytes (arrays and byte strings). Every strategy and workflow talks
    to the sites through it, so nothing reaches the server unrecorded."""

    def __init__(self, grid: Grid, folder: Path):
        self._grid = grid
        self.path = folder / "received.jsonl"
        self.round = 0  # the last round a message named (secure aggregation's key stages name none)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self._grid.get_node_ids()

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        for m in messages[:1]:
            for record in m.content.config_records.values():
                self.round = int(record.get("server-round", self.round))
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        stage = messages[0].metadata.message_type if messages else ""
        with self.path.open("a") as f:
            for reply in replies:
                f.write(json.dumps({"stage": stage, "round": self.round, **_what(reply)}) + "\n")
        return replies


def _what(reply: Message) -> dict:
    if reply.has_error():
        return {"error": str(reply.error)}
    content = reply.content
    records = content.array_records.items()
    arrays = {name: [list(a.shape) for a in r.to_numpy_ndarrays()] for name, r in records}
    size = sum(a.nbytes for _, r in records for a in r.to_numpy_ndarrays())
    for record in content.config_records.values():  # secure aggregation's keys, shares, masked vectors
        for v in record.values():
            for b in v if isinstance(v, list) else [v]:
                size += len(b) if isinstance(b, bytes) else 0
    return {"node": reply.metadata.src_node_id, "arrays": arrays, "bytes": size,
            "configs": sorted(content.config_records),
            "metrics": {n: list(r.keys()) for n, r in content.metric_records.items()}}  # fmt: skip


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
    grid = _RecordingGrid(grid, folder)
    nodes = _wait_for_sites(grid, plan["sites"])
    ask = RecordDict({"config": ConfigRecord({"ask": "moments"})})
    asked = [Message(ask, dst_node_id=n, message_type=QUERY) for n in nodes]
    replies = list(grid.send_and_receive(asked))
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise RuntimeError(f"{len(failed)} sites could not summarise their rows: {failed[0].error}")
    moments = [learner.Moments.from_arrays(r.content["moments"].to_numpy_ndarrays()) for r in replies]
    pooled = learner.pool(moments)
    scaling = learner.Scaling.of(pooled)
    np.savez(folder / "scaling.npz", mean=scaling.mean, std=scaling.std, pos_weight=scaling.pos_weight,
             low=pooled.low, high=pooled.high, rows=pooled.rows, positives=pooled.positives)  # fmt: skip

    rounds: dict[str, np.ndarray] = {}

    def keep(round_: int, arrays: list[np.ndarray]) -> None:
        if round_ > 0:
            rounds.update(named(arrays, f"r{round_}_"))

    config = {"mean": scaling.mean.tolist(), "std": scaling.std.tolist(), "pos-weight": scaling.pos_weight,
              "l1": plan["l1"], "local-steps": plan["local_steps"], "privacy": plan["privacy"] or "",
              "dp-noise": plan["noise"], "dp-clip": plan["patient_clip"], "dp-rate": plan["sample_rate"],
              "dp-step": plan["private_step"], "seed": plan["seed"], "model": plan["model"],
              **plan.get("network", {})}  # fmt: skip
    initial = weights(np.load(folder / "initial.npz"))
    run_rounds = _secure_rounds if plan.get("secure_aggregation") else _plain_rounds
    final, losses = run_rounds(grid, context, plan, config, initial, keep, max(m.rows for m in moments))
    np.savez(folder / "rounds.npz", train_loss=np.array(losses), **rounds)
    np.savez(folder / "final.npz", **named(final))


def _plain_rounds(grid, context, plan, config, initial, keep, _largest) -> tuple[list, list[float]]:
    """FedAvg / FedProx with Flower's strategies, wrapped in server-side clipping and noise for
    site-level privacy: the server sees every site's update."""
    base = FedProx if plan["strategy"] == "fedprox" else FedAvg
    options = {"proximal_mu": plan["proximal_mu"]} if base is FedProx else {}
    n = plan["sites"]
    strategy = base(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n,
                    **options)  # fmt: skip
    if plan["privacy"] == "site":  # patient-level noise is the sites' own
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, plan["noise"], plan["site_clip"], n)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=plan["rounds"],
        train_config=ConfigRecord(config),
        evaluate_fn=lambda r, arrays: keep(r, arrays.to_numpy_ndarrays()),
    )
    metrics = result.train_metrics_clientapp
    return result.arrays.to_numpy_ndarrays(), [float(metrics[r]["train-loss"]) for r in sorted(metrics)]


def _secure_rounds(grid, context, plan, config, initial, keep, largest: int) -> tuple[list, list[float]]:
    """FedAvg / FedProx under SecAgg+ (Flower's workflow, the only form it has): each site sends its
    rows-weighted update quantised and masked with pairwise and private masks, so the server learns
    only the sum of the updates. FedProx is its sites' objective; the server averages the same way."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    n = plan["sites"]
    state: dict = {}

    def evaluate(round_: int, arrays: list[np.ndarray], _config):
        keep(round_, arrays)
        state["final"] = arrays
        return None

    def mean_loss(replies: list) -> dict:
        total = sum(k for k, _ in replies)
        return {"train-loss": sum(k * float(m["train-loss"]) for k, m in replies) / total}

    proximal = {"proximal-mu": plan["proximal_mu"]} if plan["strategy"] == "fedprox" else {}
    strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                            min_available_clients=n, initial_parameters=ndarrays_to_parameters(initial),
                            on_fit_config_fn=lambda r: {**config, **proximal, "server-round": r},
                            evaluate_fn=evaluate, fit_metrics_aggregation_fn=mean_loss)  # fmt: skip
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=plan["rounds"]), strategy=strategy)
    secure = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=SECURE_THRESHOLD,
                                max_weight=float(largest), clipping_range=SECURE_RANGE)  # fmt: skip
    DefaultWorkflow(fit_workflow=secure)(grid, legacy)
    losses = [float(v) for _, v in legacy.history.metrics_distributed_fit.get("train-loss", [])]
    if len(losses) != plan["rounds"]:
        raise RuntimeError(f"secure aggregation completed {len(losses)} of {plan['rounds']} rounds")
    return state["final"], losses


def named(arrays: list[np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """A model's arrays as ``.npz`` entries ``<prefix>w<i>`` (:func:`weights` reads them back)."""
    return {f"{prefix}w{i}": a for i, a in enumerate(arrays)}


def _order(name: str) -> int:
    return int(name.rsplit("w", 1)[1])


def weights(saved, prefix: str = "") -> list[np.ndarray]:
    """The arrays :func:`_named` saved under ``prefix``, in order."""
    names = [n for n in saved.files if n.startswith(prefix + "w") and n[len(prefix) + 1 :].isdigit()]
    return [saved[n] for n in sorted(names, key=_order)]
