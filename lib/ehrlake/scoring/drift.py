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

The training snapshot's side (its cut points and shares) is a property of the model version, not
of the date scored: it is computed by the version's first full scoring and kept in
``gold.model_drift_reference``, one row per input, so a nightly scoring bins today's population
by the stored cut points instead of re-scoring the whole training snapshot (a third of a
scoring's time on the test lake). Every later date of the version is measured against the same
bins, so their figures compare with each other exactly. Past :data:`REFERENCE_ROWS` training rows
the reference is a reproducible hashed sample of them (:func:`sample`): at 100,000 patients
(629,163 rows) a version's first bins took 28-33 s on all rows and 8-9 s on a 100,000-row
sample, and the sample moved no input's PSI against the whole snapshot by more than 0.00012,
a thousandth of the 0.1 that reads as a moderate shift.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.models.evaluate import hashed_uniform

TABLE = "gold.model_drift"
KEYS = ["task", "as_of", "model_id", "model_version", "input"]
REFERENCE = "gold.model_drift_reference"  # the training snapshot's bins, once per model version
REFERENCE_KEYS = ["model_id", "model_version", "input"]
SCORE = "score"  # the score's own row, beside the inputs'
BINS = 10
FLOOR = 1e-4
REFERENCE_ROWS = 100_000  # the training rows a version's bins are drawn from, at most
SAMPLE_SEED = 20
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
    """The bin of a value: how many cut points it lies above (0..len(cuts)); -1 where missing. One
    CASE over the ascending cut points: a value stops at its first, where a sum of comparisons made
    them all (the snapshot's shares at 100,000 patients: 11 -> 6 s with the keys below)."""
    value = F.col(column).cast("double")
    binned = F.when(value.isNull() | F.isnan(value), F.lit(-1))
    for i, cut in enumerate(sorted(cuts)):
        binned = binned.when(value <= F.lit(cut), F.lit(i))
    return binned.otherwise(F.lit(len(cuts)))


def _shares(df: DataFrame, cuts: dict[str, list[float]]) -> tuple[dict[str, dict[int, float]], int]:
    """Per column, the share of rows in each bin; and the row count. Each row's bins are one array,
    counted by (position, bin): integer keys, not the column's name in every exploded row."""
    names = list(cuts)
    if not names:
        return {}, 0
    cells = F.posexplode(F.array(*[_bin(c, cuts[c]) for c in names])).alias("position", "bin")
    counts = df.select(cells).groupBy("position", "bin").count().collect()  # at most 12 rows a column
    shares: dict[str, dict[int, float]] = {c: {} for c in names}
    for r in counts:
        shares[names[r["position"]]][r["bin"]] = float(r["count"])
    n = int(sum(shares[names[0]].values()))
    return {c: {b: k / n for b, k in s.items()} for c, s in shares.items()} if n else shares, n


def sample(frame: DataFrame, rows: int, keys: list[str], cap: int = REFERENCE_ROWS) -> DataFrame:
    """``frame`` (``rows`` rows) itself up to ``cap`` rows, else a share ``cap / rows`` of it
    drawn by a hash of each row's ``keys``: the same rows on every run, no shuffle, nothing
    counted twice. A reference's shares then err by about sqrt(p(1 - p) / cap): at 100,000
    rows ~0.001 for a decile, at most 0.0016."""
    if rows <= cap:
        return frame
    return frame.where(hashed_uniform(*[F.col(k) for k in keys], seed=SAMPLE_SEED) < F.lit(cap / rows))


def _binned(
    reference: DataFrame, columns: list[str]
) -> tuple[dict[str, list[float]], dict[str, dict[int, float]], int]:
    """(cut points, shares, rows) of ``reference`` per column: read twice (cut points, then
    shares), so its columns are kept for both and the plan under them (the training snapshot's
    join and model transform) runs once."""
    frame = reference.select(*columns).persist()
    try:
        cuts = cut_points(frame, columns)
        return (cuts, *_shares(frame, cuts))
    finally:
        frame.unpersist()


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
    cuts, then, n_then = _binned(reference, columns)
    now, n_now = _shares(current, cuts)
    return {c: psi(then[c], now[c]) for c in columns}, n_then, n_now


def reference(
    lake, mv, columns: list[str], snapshot: Callable[[], DataFrame], commit: dict
) -> tuple[dict[str, list[float]], dict[str, dict[int, float]], int]:
    """(cut points, shares and rows) of the training snapshot per column of ``columns``: read
    from :data:`REFERENCE` where the model version's first full scoring stored them, else
    computed from ``snapshot()`` (the training snapshot scored by the model) and stored."""
    if lake.exists(REFERENCE):
        this = (F.col("model_id") == mv.model_id) & (F.col("model_version") == mv.version)
        kept = {r.input: r for r in lake.read(REFERENCE).where(this).collect()}  # one row per input
        if kept and set(columns) <= set(kept):
            cuts = {c: list(kept[c].cuts) for c in columns}
            shares = {c: dict(zip(kept[c].bins, kept[c].shares, strict=True)) for c in columns}
            return cuts, shares, int(kept[columns[0]].rows)
    cuts, shares, n = _binned(snapshot(), columns)
    computed_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    rows = [
        (mv.model_id, mv.version, c, cuts[c], sorted(shares[c]), [shares[c][b] for b in sorted(shares[c])], n,
         computed_at)
        for c in columns
    ]  # fmt: skip
    schema = (
        "model_id string, model_version int, input string, cuts array<double>, bins array<int>, "
        "shares array<double>, rows long, computed_at timestamp"
    )
    lake.merge_rows(rows, schema, REFERENCE, REFERENCE_KEYS, commit_info=commit)
    return cuts, shares, n


def record(
    lake,
    task: str,
    as_of: dt.date,
    mv,
    snapshot: Callable[[], DataFrame],
    current: DataFrame,
    commit: dict,
):
    """Compare ``current`` (the scored population: the model's inputs and ``score``) with the
    model's training snapshot (``snapshot()``, scored by the same model; called only where
    :func:`reference` has not kept its bins yet) and merge the figures into :data:`TABLE`; returns
    the inputs above :data:`SHIFTED`, the score first. The inputs compared: the model's features
    that ``current`` holds (the snapshot, scored by the same model, holds them all)."""
    columns = [SCORE, *[c for c in mv.features if c in current.columns]]
    cuts, then, n_then = reference(lake, mv, columns, snapshot, commit)
    now, n_now = _shares(current, cuts)
    figures = {c: psi(then[c], now[c]) for c in columns}
    computed_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    rows = [
        (task, as_of, mv.model_id, mv.version, c, round(v, 6), status(v), n_then, n_now, computed_at)
        for c, v in figures.items()
    ]
    schema = (
        "task string, as_of date, model_id string, model_version int, input string, psi double, "
        "status string, reference_rows long, scored_rows long, computed_at timestamp"
    )
    lake.merge_rows(rows, schema, TABLE, KEYS, commit_info=commit)
    return [c for c in columns if figures[c] > SHIFTED]
