"""Running one training function on N worker processes: Horovod on Spark, or TF's
MultiWorkerMirroredStrategy in a Spark barrier stage, or the driver alone.

The function is called as ``fn(worker, payload)`` in every process; :class:`Worker` hides what
differs between launchers (how gradients are averaged, which callbacks keep ranks in step, what
the batch size means), so model code is written once. Each process returns a small dict (never
weights or data: those go to the lake); the launcher returns them in rank order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field

from ehrlake.dl.runtime import LAUNCHERS, has_horovod
from ehrlake.errors import EhrlakeError
from ehrlake.ports import free_port


@dataclass
class Worker:
    rank: int
    size: int
    launcher: str
    strategy: object = field(default=None, repr=False)

    def scope(self):
        """Where the model and optimizer must be built (MWMS mirrors variables created in it)."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def optimizer(self, opt):
        """Horovod averages gradients across ranks in the optimizer; MWMS does it in the strategy."""
        if self.launcher == "horovod":
            import horovod.tensorflow.keras as hvd

            return hvd.DistributedOptimizer(opt)
        return opt

    def callbacks(self) -> list:
        if self.launcher != "horovod":
            return []
        import horovod.tensorflow.keras as hvd

        # the same initial weights everywhere. (Horovod's MetricAverageCallback calls Keras 3's backend
        # and fails under tf-keras; it is not needed: every rank computes the validation metrics that
        # early stopping reads on the whole validation split with the same weights.)
        return [hvd.callbacks.BroadcastGlobalVariablesCallback(0)]

    def batch_norm(self):
        """A batch-normalisation layer factory whose moments (and so moving statistics) are computed
        over all workers' batches; otherwise each rank's running statistics would drift apart."""
        from ehrlake.dl.runtime import keras

        if self.launcher == "horovod":
            from horovod.tensorflow.sync_batch_norm import SyncBatchNormalization

            return lambda **kw: SyncBatchNormalization(fused=False, **kw)
        if self.launcher == "barrier":
            return lambda **kw: keras().layers.BatchNormalization(synchronized=True, **kw)
        return keras().layers.BatchNormalization

    def batch(self, per_worker: int) -> int:
        """The batch size a worker's dataset yields: MWMS splits a global batch between workers."""
        return per_worker * self.size if self.launcher == "barrier" else per_worker


def weights_digest(weights) -> str:
    """A fingerprint of every weight (a model or its ``get_weights()``), bit for bit: ranks in step
    have the same one."""
    h = hashlib.sha256()
    for w in weights.get_weights() if hasattr(weights, "get_weights") else weights:
        h.update(w.tobytes())
    return h.hexdigest()


def run(spark, fn, payload, workers: int = 2, launcher: str = "horovod") -> list[dict]:
    """Run ``fn(worker, payload)`` on ``workers`` processes with ``launcher``; results by rank. Where
    they report a ``digest`` of their weights, every rank's must be the same."""
    if launcher not in LAUNCHERS:
        raise EhrlakeError(f"launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if launcher == "local" or workers == 1 and launcher != "horovod":
        return [fn(Worker(0, 1, "local"), payload)]
    slots = spark.sparkContext.defaultParallelism
    if workers > slots:
        raise EhrlakeError(
            f"{workers} training workers need {workers} task slots at once; this Spark application has "
            f"{slots} (more executors or cores, or fewer workers: runtime.workers)"
        )
    if launcher == "horovod":
        if not has_horovod():
            raise EhrlakeError(
                "the horovod launcher needs the deep-learning runtime (make dl-env; run the job with "
                ".venv-dl/bin/ehrlake), or set runtime.launcher: barrier in conf/deep_learning.yaml"
            )
        import horovod.spark

        results = horovod.spark.run(
            _horovod_main, args=(fn, payload), num_proc=workers, use_gloo=True, verbose=0
        )
    else:
        rdd = spark.sparkContext.parallelize(range(workers), workers)
        results = rdd.barrier().mapPartitions(lambda _: [_barrier_main(fn, payload)]).collect()
    digests = {r["digest"] for r in results if "digest" in r}
    if len(digests) > 1:  # data-parallel training ends with one model, or something went wrong
        raise EhrlakeError(f"the {len(results)} workers ended with different weights: {sorted(digests)}")
    return sorted(results, key=lambda r: r["rank"])


def _horovod_main(fn, payload):
    import horovod.tensorflow.keras as hvd

    hvd.init()
    result = fn(Worker(hvd.rank(), hvd.size(), "horovod"), payload)
    return {**result, "rank": hvd.rank()}


def _barrier_main(fn, payload):
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    port = free_port(host="")  # this worker's gRPC server, on every address its peers may use
    host = socket.gethostbyname(socket.gethostname())
    addresses = ctx.allGather(f"{host}:{port}")
    rank = ctx.partitionId()
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank}}
    )
    from ehrlake.dl.runtime import tensorflow

    tf = tensorflow()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    result = fn(Worker(rank, len(addresses), "barrier", strategy), payload)
    ctx.barrier()
    return {**result, "rank": rank}
