"""The federated L1 logistic regression's arithmetic, in NumPy: what a site computes on its own rows.

The model is the central ``logreg`` pipeline's (:mod:`ehrlake.models.algorithms`): inputs imputed,
standardised, then weighted logistic regression with an L1 penalty. Here the imputation value and
the scale are the federation's (the sites' moments pooled by the server: :func:`pool`), the
imputation is the mean (a median cannot be pooled from summaries), and a site fits by proximal
gradient descent (ISTA: a gradient step on the weighted log-loss, then soft-thresholding for the
L1 penalty), starting from the global weights of the round. FedProx adds ``mu/2 |w - w_global|^2``
to each site's objective, which keeps a site with unusual patients near the federation's model.

Weights are one vector: the coefficients, then the intercept (not penalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Moments:
    """A site's (or the federation's) summaries of its training rows, per input: counts, sums and
    sums of squares of the observed values, lowest and highest value; rows and positives."""

    count: np.ndarray
    total: np.ndarray
    squares: np.ndarray
    low: np.ndarray
    high: np.ndarray
    rows: int
    positives: int

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> Moments:
        seen = ~np.isnan(x)
        filled = np.where(seen, x, 0.0)
        with np.errstate(all="ignore"):
            low = np.where(seen.any(0), np.nanmin(np.where(seen, x, np.inf), 0), np.nan)
            high = np.where(seen.any(0), np.nanmax(np.where(seen, x, -np.inf), 0), np.nan)
        return cls(seen.sum(0).astype(float), filled.sum(0), (filled**2).sum(0), low, high,
                   int(len(y)), int(y.sum()))  # fmt: skip

    def arrays(self) -> list[np.ndarray]:
        return [self.count, self.total, self.squares, self.low, self.high,
                np.array([self.rows, self.positives], dtype=float)]  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray]) -> Moments:
        count, total, squares, low, high, sizes = arrays
        return cls(count, total, squares, low, high, int(sizes[0]), int(sizes[1]))


def pool(sites: list[Moments]) -> Moments:
    """The federation's moments from the sites' (exact for counts, sums, extremes)."""
    return Moments(
        sum(m.count for m in sites),
        sum(m.total for m in sites),
        sum(m.squares for m in sites),
        np.fmin.reduce([m.low for m in sites]),
        np.fmax.reduce([m.high for m in sites]),
        sum(m.rows for m in sites),
        sum(m.positives for m in sites),
    )


@dataclass(frozen=True)
class Scaling:
    """Imputation value and scale of each input, and the positives' weight (negatives/positives,
    as central training weighs them)."""

    mean: np.ndarray
    std: np.ndarray
    pos_weight: float

    @classmethod
    def of(cls, m: Moments) -> Scaling:
        n = np.maximum(m.count, 1.0)
        mean = m.total / n
        var = np.maximum(m.squares / n - mean**2, 0.0) * n / np.maximum(n - 1.0, 1.0)
        std = np.sqrt(var)
        std = np.where(std > 0, std, 1.0)  # a constant input: left as is (Spark's scaler does the same)
        positives = max(m.positives, 1)
        return cls(mean, std, (m.rows - m.positives) / positives)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (np.where(np.isnan(x), self.mean, x) - self.mean) / self.std


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def weights_of(y: np.ndarray, pos_weight: float) -> np.ndarray:
    return np.where(y == 1, pos_weight, 1.0)


def loss(w: np.ndarray, z: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, l1: float) -> float:
    """The weighted mean log-loss plus the L1 penalty (Spark ML's objective, for elasticNetParam 1)."""
    p = np.clip(_sigmoid(z @ w[:-1] + w[-1]), 1e-12, 1 - 1e-12)
    ll = -(sample_weight * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / sample_weight.sum()
    return float(ll + l1 * np.abs(w[:-1]).sum())


def _shrink(w: np.ndarray, by: float) -> None:
    """The L1 penalty's proximal step on the coefficients (soft-thresholding; the intercept, last,
    is not penalised), in place."""
    w[:-1] = np.sign(w[:-1]) * np.maximum(np.abs(w[:-1]) - by, 0.0)


def fit(
    w: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    sample_weight: np.ndarray,
    l1: float,
    steps: int,
    proximal_mu: float = 0.0,
) -> np.ndarray:
    """``steps`` proximal gradient steps from ``w`` on standardised inputs ``z``. The step is the
    inverse of the loss's smoothness bound (a quarter of the weighted inputs' largest eigenvalue,
    plus mu), so the objective never rises."""
    start = w.copy()
    sw = sample_weight / sample_weight.sum()
    design = np.hstack([z, np.ones((len(z), 1))])
    gram = (design * sw[:, None]).T @ design
    step = 1.0 / (0.25 * float(np.linalg.eigvalsh(gram)[-1]) + proximal_mu + 1e-12)
    w = w.copy()
    for _ in range(steps):
        p = _sigmoid(design @ w)
        grad = design.T @ (sw * (p - y)) + proximal_mu * (w - start)
        w = w - step * grad
        _shrink(w, step * l1)
    return w


def fit_private(
    w: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    class_weight: np.ndarray,
    l1: float,
    steps: int,
    rate: float,
    clip: float,
    noise: float,
    step: float,
    rng: np.random.Generator,
    proximal_mu: float = 0.0,
) -> np.ndarray:
    """DP-SGD's proximal version (patient-level privacy): each step takes each row with
    probability ``rate`` (Poisson sampling, which the accountant assumes), clips every row's
    gradient to norm ``clip``, adds Gaussian noise of deviation ``noise x clip`` to their sum and
    divides by the expected batch. The step size is fixed, not taken from the rows' spectrum (that
    would be a further release about them)."""
    start = w.copy()
    design = np.hstack([z, np.ones((len(z), 1))])
    expected = rate * len(y)
    w = w.copy()
    for _ in range(steps):
        take = rng.random(len(y)) < rate
        rows = design[take]
        g = (class_weight[take] * (_sigmoid(rows @ w) - y[take]))[:, None] * rows
        norms = np.linalg.norm(g, axis=1)
        g *= np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None]
        grad = (g.sum(0) + rng.normal(0.0, noise * clip, size=w.shape)) / expected + proximal_mu * (w - start)
        w = w - step * grad
        _shrink(w, step * l1)
    return w
