"""A tabular task's rows as the fixed-length float32 vectors the ANN reads (``gold.tensors_<task>``).

Training writes them (split by patient like the Spark ML models, standardised with the training
split's mean and sd); scoring standardises new rows with the same numbers through :func:`tensor`.
"""

from __future__ import annotations

import numpy as np
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake import features as feats
from ehrlake.lake import WriteMode
from ehrlake.models import scope
from ehrlake.models.train import split


def table(task_name: str) -> str:
    return f"gold.tensors_{task_name}"


def tensor(scaling: dict[str, tuple[float, float]]) -> F.Column:
    """The standardised inputs as little-endian float32 bytes (missing = the training mean = 0)."""
    z = F.array(
        *[
            F.coalesce((F.col(c).cast("double") - F.lit(m)) / F.lit(s), F.lit(0.0)).cast("float")
            for c, (m, s) in scaling.items()
        ]
    )
    to_bytes = F.udf(lambda v: np.asarray(v, "<f4").tobytes(), T.BinaryType(), useArrow=False)
    return to_bytes(z)


def packed_sequence(length: int):
    """A column function (token_ids, ages) -> float32 bytes of shape (2, ``length``): the last
    ``length`` tokens and their ages, padded with 0 at the end (an empty sequence: all padding);
    the sequence models' ``x``. A plain UDF: the DL runtime's PyArrow is too old for Spark's Arrow
    UDFs."""

    def pack(ids, ages):
        x = np.zeros((2, length), "<f4")
        ids, ages = list(ids or [])[-length:], list(ages or [])[-length:]
        x[0, : len(ids)], x[1, : len(ages)] = ids, [a if a is not None else 0 for a in ages]
        return x.tobytes()

    return F.udf(pack, T.BinaryType(), useArrow=False)


def with_split(train_df, test_df):
    """The rows of :func:`ehrlake.models.train.split` in one frame with ``split``: ``test``, ``val``
    (cross-validation fold 0 of the rest) or ``train``; every deep model's tensors use it."""
    val_or_train = F.when(F.col("cv_fold") == 0, "val").otherwise("train")
    return train_df.withColumn("split", val_or_train).unionByName(
        test_df.withColumn("split", F.lit("test")), allowMissingColumns=True
    )


def build(lake, task_name: str, seed: int, versions: dict) -> tuple[list[str], dict, dict]:
    """The task's labelled rows as standardised float32 vectors in ``gold.tensors_<task>``: split by
    patient (``test`` as the Spark ML models, ``val`` = CV fold 0 of the rest), missing values set to
    the training mean (0 after standardising). Returns the inputs, their training mean/sd and their
    training ranges (what the model accepts at scoring: :mod:`ehrlake.models.scope`)."""
    t = feats.task(task_name)
    wanted = feats.model_inputs(t)
    df = feats.training_frame(lake, t, versions)
    train_df, test_df = split(df, seed)
    stats = train_df.agg(
        *[F.avg(F.col(c).cast("double")).alias(f"m_{c}") for c in wanted],
        *[F.stddev(F.col(c).cast("double")).alias(f"s_{c}") for c in wanted],
    ).first()
    inputs = [c for c in wanted if stats[f"m_{c}"] is not None]
    scaling = {c: (float(stats[f"m_{c}"]), float(stats[f"s_{c}"] or 0.0) or 1.0) for c in inputs}
    rows = with_split(train_df, test_df)
    out = rows.select(
        "index_id",
        "patient_key",
        "split",
        F.col("label").cast("int").alias("label"),
        tensor(scaling).alias("x"),
    ).repartition(8, "index_id")
    lake.write(
        out,
        table(task_name),
        mode=WriteMode.OVERWRITE,
        commit_info={"ehrlakeJob": "train", "task": task_name},
    )
    return inputs, scaling, scope.ranges(train_df, inputs)
