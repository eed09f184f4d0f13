"""Model evaluation with bootstrap confidence intervals, calibration, subgroup gaps and error cells.

Scale: predictions stay in Spark. Only a *histogram* reaches the driver: per score bin (1/1000 wide)
and label, the row count and the summed squared error, so the driver's memory does not grow with
the number of predictions. Every metric is computed from that histogram (AUROC and AUPRC exact up
to ties inside a bin; threshold metrics at the nearest bin edge; Brier exact). The decision threshold
of accuracy, precision, recall and F1 is the model's training base rate (positives / rows): with
calibrated scores it flags patients at above-average risk, where 0.5 would flag almost nobody at a
10% prevalence. Resampling rows
with replacement is, for these metrics, the same as drawing the histogram's cells from a
multinomial with the observed proportions, so the bootstrap runs on the histogram too.

Rows of one patient are not independent (a patient's stays share the patient): where a patient has
more than one row, :func:`metrics` resamples patients instead, by the Poisson bootstrap (each
patient weighted by a Poisson(1) draw per replicate, from a hash of its key: deterministic, and
computed in Spark, so only one histogram per replicate reaches the driver).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.config import SecurityConfig

BINS = 1000
THRESHOLD = 0.5  # default decision threshold; a trained model uses its training base rate
FINDING_THRESHOLD = 0.5  # an image model's finding; also the threshold MedMNIST reports accuracy at
BOOTSTRAP = 1000
CLUSTER = "patient_key"  # the unit :func:`metrics` resamples where it has more than one row
# P(X <= k) for X ~ Poisson(1), k = 0..9: a uniform draw above j of them is a weight of j (at most 10)
POISSON_1_CDF = tuple(sum(math.exp(-1) / math.factorial(i) for i in range(k + 1)) for k in range(10))
METRICS = ("auroc", "auprc", "accuracy", "precision", "recall", "f1", "brier")
SUBGROUPS = ("sex", "age_band", "state", "race")
MIN_SUBGROUP = 30  # fewer rows (or no positive / negative) in a subgroup: metrics not reported


def risk_bands(scored: DataFrame) -> dict[str, float]:
    """Cut points of the risk bands from held-out scores: the top 10% ``high``, the next 20%
    ``medium`` (empty where there are no scores)."""
    q = scored.approxQuantile("score", [0.7, 0.9], 0.001)
    return {"medium": q[0], "high": q[1]} if len(q) == 2 else {}


# the bands from the highest down; a score at or above a band's cut point is in it, else ``low``
BANDS_DOWN = ("high", "medium")


def risk_band(score: Column, cuts: dict) -> Column:
    """``high`` / ``medium`` / ``low`` by :func:`risk_bands`' cut points (null without them)."""
    if not cuts:
        return F.lit(None).cast("string")
    band = F.lit("low")
    for name in reversed(BANDS_DOWN):
        band = F.when(score >= cuts[name], name).otherwise(band)
    return band


def band_of(score: float, cuts: dict) -> str | None:
    """:func:`risk_band` for one score in plain Python: one patient's explanation needs no job."""
    if not cuts:
        return None
    return next((name for name in BANDS_DOWN if score >= cuts[name]), "low")


def histogram(pred: DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """(by..., bin, label) -> n, sq (sum of squared errors), ssum (sum of scores); bounded size."""
    by = by or []
    b = F.least(F.floor(F.col("score") * BINS), F.lit(BINS - 1)).cast("int")
    return (
        pred.select(*by, b.alias("bin"), F.col("label").cast("int").alias("label"), "score")
        .groupBy(*by, "bin", "label")
        .agg(
            F.count("*").alias("n"),
            F.sum((F.col("score") - F.col("label")) ** 2).alias("sq"),
            F.sum("score").alias("ssum"),
        )
        .toPandas()
    )


def accuracy_threshold(pred: DataFrame, default: float = FINDING_THRESHOLD) -> float:
    """The decision threshold (a score bin's lower edge) with the most correct calls on ``pred``
    (``score``, ``label``: a validation split, so the test split's accuracy is not fitted to its
    own labels); among equals the nearest to ``default``, and ``default`` where ``pred`` lacks a
    class. The driver gets the histogram only."""
    counts, _ = _cells(histogram(pred))
    neg, pos = counts
    if neg.sum() == 0 or pos.sum() == 0:
        return default
    # calling positive from bin c up: true positives pos[c:], true negatives neg[:c]
    correct = np.cumsum(pos[::-1])[::-1] + np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    cuts = np.flatnonzero(correct == correct.max())
    return float(cuts[np.argmin(np.abs(cuts / BINS - default))] / BINS)


def metrics(
    pred: DataFrame, threshold: float = THRESHOLD, bootstrap: int = BOOTSTRAP, seed: int = 7
) -> dict[str, dict]:
    """:func:`summarise` of ``pred`` (``score``, ``label``), resampling patients where a patient
    has several rows (readmission's stays), else rows."""
    return summarise(histogram(pred), bootstrap, seed, threshold, resampling(pred, bootstrap, seed))


def resampling(pred: DataFrame, bootstrap: int = BOOTSTRAP, seed: int = 7) -> np.ndarray | None:
    """:func:`patient_draws` where every row of ``pred`` names its patient and some patient has
    several; None (rows are resampled) where each has one, or where rows name no patient (images
    without one: a null key is no patient, and would make all of them one). One job to tell."""
    if CLUSTER not in pred.columns:
        return None
    rows, keyed, patients = pred.agg(F.count("*"), F.count(CLUSTER), F.countDistinct(CLUSTER)).first()
    return patient_draws(pred, bootstrap, seed) if keyed == rows and patients < rows else None


def hashed_uniform(*keys: Column, seed: int) -> Column:
    """A uniform in [0, 1) from xxhash64 of ``keys`` and ``seed``: seeded, no shuffle, the same
    on every executor and every run, so a draw made with it is reproducible."""
    return F.pmod(F.xxhash64(*keys, F.lit(seed)), F.lit(1 << 31)) / float(1 << 31)


def poisson_weight(*keys: Column, seed: int) -> Column:
    """How many times a bootstrap draws what ``keys`` name: Poisson(1), by the inverse CDF of a
    :func:`hashed_uniform` of the keys and ``seed``."""
    u = hashed_uniform(*keys, seed=seed)
    return sum((u >= c).cast("int") for c in POISSON_1_CDF)


def patient_draws(pred: DataFrame, bootstrap: int = BOOTSTRAP, seed: int = 7) -> np.ndarray:
    """(bootstrap, 2, BINS) counts [negatives, positives] of a Poisson bootstrap over patients
    (every row's ``patient_key`` set: :func:`resampling` decides).

    Each patient's cells are weighted by a Poisson(1) draw per replicate (the inverse CDF of a
    uniform from xxhash64 of key, replicate and seed). Spark does the weighting (patients' cells
    times replicates rows) and sums per replicate; the driver gets at most bootstrap x 2 x BINS."""
    b = F.least(F.floor(F.col("score") * BINS), F.lit(BINS - 1)).cast("int")
    cells = pred.groupBy(
        F.col(CLUSTER).alias("cluster"), b.alias("bin"), F.col("label").cast("int").alias("label")
    ).agg(F.count("*").alias("n"))
    replicates = pred.sparkSession.range(bootstrap).withColumnRenamed("id", "replicate")
    weight = poisson_weight(F.col("cluster"), F.col("replicate"), seed=seed)
    h = (
        cells.crossJoin(F.broadcast(replicates))
        .groupBy("replicate", "bin", "label")
        .agg(F.sum(F.col("n") * weight).alias("n"))
        .where("n > 0")
        .toPandas()
    )
    draws = np.zeros((bootstrap, 2, BINS))
    draws[h["replicate"].to_numpy(), h["label"].to_numpy(), h["bin"].to_numpy()] = h["n"].to_numpy()
    return draws


def paired_difference(
    base: DataFrame, other: DataFrame, metric: str = "auroc", bootstrap: int = BOOTSTRAP, seed: int = 7
) -> dict[str, float | None]:
    """``metric`` of ``other`` minus that of ``base`` (two models' ``score`` and ``label`` on the
    same rows, each with ``patient_key``), with a 95% paired bootstrap interval.

    Paired because :func:`patient_draws` weights a patient by a hash of its key, the replicate and
    the seed: both models' replicate ``r`` draw the same patients the same number of times, so the
    interval is of the difference on one resample, far narrower than two independent intervals
    where the models rank patients alike. Only the histograms reach the driver."""
    point, draws = [], []
    for pred in (base, other):
        counts, mean_sq = _cells(histogram(pred))
        point.append(_metrics(counts[0][None], counts[1][None], mean_sq)[metric][0])
        d = patient_draws(pred, bootstrap, seed)
        draws.append(_metrics(d[:, 0], d[:, 1], mean_sq)[metric])
    diff = draws[1] - draws[0]
    diff = diff[np.isfinite(diff)]
    low, high = np.percentile(diff, [2.5, 97.5]) if len(diff) else (np.nan, np.nan)
    return {
        "value": _num(point[1] - point[0]),
        "ci_low": _num(low),
        "ci_high": _num(high),
        "share_above_0": _num(float((diff > 0).mean())) if len(diff) else None,
    }


def _cells(h: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Counts as a (2, BINS) array [negatives, positives], and mean squared error per cell."""
    counts = np.zeros((2, BINS))
    sq = np.zeros((2, BINS))
    for label in (0, 1):
        part = h[h["label"] == label]
        counts[label, part["bin"].to_numpy()] = part["n"].to_numpy()
        sq[label, part["bin"].to_numpy()] = part["sq"].to_numpy()
    mean_sq = np.divide(sq, counts, out=np.zeros_like(sq), where=counts > 0)
    return counts, mean_sq


def _metrics(
    neg: np.ndarray, pos: np.ndarray, mean_sq: np.ndarray, threshold: float = THRESHOLD
) -> dict[str, np.ndarray]:
    """Metrics for a batch of histograms: ``neg``/``pos`` are (B, BINS) counts."""
    P = pos.sum(axis=1)
    N = neg.sum(axis=1)
    n = P + N
    with np.errstate(divide="ignore", invalid="ignore"):
        pos_d, neg_d = pos[:, ::-1], neg[:, ::-1]  # highest scores first
        above = np.cumsum(pos_d, axis=1) - pos_d  # positives scoring strictly higher
        auroc = (neg_d * (above + 0.5 * pos_d)).sum(axis=1) / (P * N)
        tp_cum = np.cumsum(pos_d, axis=1)
        fp_cum = np.cumsum(neg_d, axis=1)
        precision_at = tp_cum / np.maximum(tp_cum + fp_cum, 1)
        auprc = (pos_d / P[:, None] * precision_at).sum(axis=1)
        cut = int(round(threshold * BINS))
        tp = pos[:, cut:].sum(axis=1)
        fp = neg[:, cut:].sum(axis=1)
        tn = N - fp
        precision = tp / (tp + fp)
        recall = tp / P
        f1 = 2 * precision * recall / (precision + recall)
        brier = ((neg * mean_sq[0]).sum(axis=1) + (pos * mean_sq[1]).sum(axis=1)) / n
    return {
        "auroc": auroc,
        "auprc": auprc,
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "brier": brier,
    }


def summarise(
    h: pd.DataFrame,
    bootstrap: int = BOOTSTRAP,
    seed: int = 7,
    threshold: float = THRESHOLD,
    draws: np.ndarray | None = None,
) -> dict[str, dict]:
    """Point estimate and 95% percentile-bootstrap interval of every metric of one histogram:
    resampled rows, or the given ``draws`` (:func:`patient_draws`). Brier's squared error per cell
    is the observed cell's in every replicate (cells are 1/1000 of the score range wide)."""
    counts, mean_sq = _cells(h)
    n = int(counts.sum())
    P = int(counts[1].sum())
    out: dict[str, dict] = {}
    if n == 0:
        return out
    point = _metrics(counts[0][None], counts[1][None], mean_sq, threshold)
    if draws is None:
        draws = (
            np.random.default_rng(seed)
            .multinomial(n, counts.ravel() / n, size=bootstrap)
            .reshape(bootstrap, 2, BINS)
        )
    boot = _metrics(draws[:, 0], draws[:, 1], mean_sq, threshold)
    for m in METRICS:
        values = boot[m][np.isfinite(boot[m])]
        low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan)
        out[m] = {
            "value": _num(point[m][0]),
            "ci_low": _num(low),
            "ci_high": _num(high),
            "n": n,
            "positives": P,
        }
    return out


def format_value(value: float | None, digits: int = 3) -> str:
    """A metric for people: ``n/a`` where it is not defined (one class only, too few rows)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def calibration(h: pd.DataFrame, bins: int = 10) -> list[dict]:
    """Reliability curve: per tenth of the score range, mean predicted score and observed rate."""
    if h.empty:
        return []
    decile = (h["bin"] * bins // BINS).clip(upper=bins - 1)
    rows = []
    for d, part in h.groupby(decile):
        n = part["n"].sum()
        rows.append(
            {
                "bin": int(d),
                "mean_predicted": float(part["ssum"].sum() / n),
                "observed_rate": float(part.loc[part["label"] == 1, "n"].sum() / n),
                "n": int(n),
            }
        )
    return rows


def subgroup_metrics(pred: DataFrame, bootstrap: int = 200, threshold: float = THRESHOLD) -> list[dict]:
    """Metrics per value of each subgroup column present, with the gap to the overall figure."""
    kinds = [k for k in SUBGROUPS if k in pred.columns]
    if not kinds:
        return []
    stacked = pred.select(
        "score",
        "label",
        F.explode(
            F.array(
                *[F.struct(F.lit(k).alias("kind"), F.col(k).cast("string").alias("value")) for k in kinds]
            )
        ).alias("g"),
    ).select("score", "label", "g.kind", "g.value")
    h = histogram(stacked, ["kind", "value"])
    rows = []
    for (kind, value), part in h.groupby(["kind", "value"]):
        n = int(part["n"].sum())
        positives = int(part.loc[part["label"] == 1, "n"].sum())
        if n < MIN_SUBGROUP or positives == 0 or positives == n:
            rows.append({"kind": kind, "value": value, "n": n, "positives": positives, "metrics": {}})
            continue
        rows.append(
            {
                "kind": kind,
                "value": value,
                "n": n,
                "positives": positives,
                "metrics": summarise(part, bootstrap, threshold=threshold),
            }
        )
    return rows


def error_cells(
    pred: DataFrame, k: int = SecurityConfig.small_cell_k, top: int = 15, threshold: float = THRESHOLD
) -> DataFrame:
    """Where the model is most wrong: age band x sex cells ranked by Brier score (cells under k rows
    are left out, as in the EDA tables), with miss rates at the 0.5 threshold."""
    flagged = F.col("score") >= threshold
    for cell in ("age_band", "sex"):  # image sets have neither: one cell of all rows
        if cell not in pred.columns:
            pred = pred.withColumn(cell, F.lit(None).cast("string"))
    return (
        pred.groupBy("age_band", "sex")
        .agg(
            F.count("*").alias("n"),
            F.sum("label").alias("positives"),
            F.avg("score").alias("mean_score"),
            F.avg("label").alias("observed_rate"),
            F.avg((F.col("score") - F.col("label")) ** 2).alias("brier"),
            F.try_divide(F.sum(((F.col("label") == 1) & ~flagged).cast("int")), F.sum("label")).alias(
                "false_negative_rate"
            ),
            F.try_divide(
                F.sum(((F.col("label") == 0) & flagged).cast("int")), F.sum(1 - F.col("label"))
            ).alias("false_positive_rate"),
        )
        .where(F.col("n") >= k)
        .orderBy(F.desc("brier"), "age_band", "sex")
        .limit(top)
    )
