"""Drift: how far a scored population has moved from the one its model was trained on.

Each full scoring run compares, per model input and for the score itself, the population it
scored with the model's training snapshot (the feature and label tables at the Delta versions
the registry pinned when the model was trained: ``ModelVersion.training_data``) by the
population stability index, PSI = sum over bins of (p_now - p_then) * ln(p_now / p_then). The
bins are the training snapshot's deciles (fewer where values repeat: a 0/1 flag has two), with
missing values a bin of their own; a share is floored at 1e-4 so an empty bin counts instead of
dividing by zero. The usual reading: below 0.1 stable, up to 0.25 a moderate shift, above it a
shift the model was not built for (Yurdakul 2018; Siddiqi, *Credit Risk Scorecards*).

Only counts per (input, bin) reach the driver: (inputs + 1) x at most 12 rows a side. Rows go to
``gold.model_drift`` by merge on (task, as_of, model, version, input), so re-scoring a date
replaces its figures.
"""

from __future__ import annotations

import datetime as dt
import math

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

TABLE = "gold.model_drift"
KEYS = ["task", "as_of", "model_id", "model_version", "input"]
SCORE = "score"  # the score's own row, beside the inputs'
BINS = 10
FLOOR = 1e-4
MODERATE, SHIFTED = 0.1, 0.25


def status(psi: float) -> str:
    return "shifted" if psi > SHIFTED else "moderate" if psi > MODERATE else "stable"


def cut_points(reference: DataFrame, columns: list[str], bins: int = BINS) -> dict[str, list[float]]:
    """Per column, the reference's inner quantiles (deduplicated): ``bins`` bins at most."""
    probabilities = [i / bins for i in range(1, bins)]
    found = reference.select(*[F.col(c).cast("double").alias(c) for c in columns]).approxQuantile(
        columns, probabilities, 0.001
    )
    return {c: sorted(set(q)) for c, q in zip(columns, found, strict=True)}


def _bin(column: str, cuts: list[float]) -> Column:
    """The bin of a value: how many cut points it lies above (0..len(cuts)); -1 where missing."""
    value = F.col(column).cast("double")
    above = sum((value > F.lit(c)).cast("int") for c in cuts) if cuts else F.lit(0)
    return F.when(value.isNull() | F.isnan(value), F.lit(-1)).otherwise(above)


def _shares(df: DataFrame, cuts: dict[str, list[float]]) -> tuple[dict[str, dict[int, float]], int]:
    """Per column, the share of rows in each bin; and the row count."""
    cells = F.explode(
        F.array(*[F.struct(F.lit(c).alias("input"), _bin(c, cut).alias("bin")) for c, cut in cuts.items()])
    )
    counts = df.select(cells.alias("cell")).groupBy("cell.input", "cell.bin").count().collect()
    shares: dict[str, dict[int, float]] = {c: {} for c in cuts}
    for r in counts:
        shares[r["input"]][r["bin"]] = float(r["count"])
    n = int(sum(shares[next(iter(cuts))].values())) if cuts else 0
    return {c: {b: k / n for b, k in s.items()} for c, s in shares.items()} if n else shares, n


def psi(then: dict[int, float], now: dict[int, float]) -> float:
    """Population stability index of two bin -> share maps (floored shares)."""
    total = 0.0
    for b in set(then) | set(now):
        p, q = max(then.get(b, 0.0), FLOOR), max(now.get(b, 0.0), FLOOR)
        total += (q - p) * math.log(q / p)
    return total


def compare(
    reference: DataFrame, current: DataFrame, columns: list[str]
) -> tuple[dict[str, float], int, int]:
    """(PSI per column, reference rows, current rows), bins from the reference."""
    cuts = cut_points(reference, columns)
    then, n_then = _shares(reference, cuts)
    now, n_now = _shares(current, cuts)
    return {c: psi(then[c], now[c]) for c in columns}, n_then, n_now


def record(lake, task: str, as_of: dt.date, mv, reference: DataFrame, current: DataFrame, commit: dict):
    """Compare ``current`` (the scored population: the model's inputs and ``score``) with
    ``reference`` (the training snapshot, scored by the same model) and merge the figures into
    :data:`TABLE`; returns the inputs above :data:`SHIFTED`, the score first."""
    columns = [SCORE, *[c for c in mv.features if c in current.columns and c in reference.columns]]
    figures, n_then, n_now = compare(reference, current, columns)
    computed_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    rows = [
        (task, as_of, mv.model_id, mv.version, c, round(v, 6), status(v), n_then, n_now, computed_at)
        for c, v in figures.items()
    ]
    df = lake.spark.createDataFrame(
        rows,
        "task string, as_of date, model_id string, model_version int, input string, psi double, "
        "status string, reference_rows long, scored_rows long, computed_at timestamp",
    )
    lake.create(TABLE, df.schema)
    lake.merge(df, TABLE, KEYS, commit_info=commit)
    return [c for c in columns if figures[c] > SHIFTED]
