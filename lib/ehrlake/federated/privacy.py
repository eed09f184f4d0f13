"""Differential privacy of a federated run: the noise it adds and the epsilon that buys.

Two units of privacy, ``--privacy``:

- ``patient`` (the default): each site trains by DP-SGD (:func:`ehrlake.federated.learner.fit_private`):
  every step samples its rows with probability ``sample_rate``, clips each row's gradient to
  ``patient_clip`` and adds Gaussian noise. The epsilon bounds what the released model (and every
  update a site sends) says about any one patient's row; a patient's rows are at one site, so the
  sites compose in parallel and the run's epsilon is one site's: ``rounds x local_steps``
  Poisson-subsampled Gaussian steps.
- ``site``: client-level DP (Flower's ``DifferentialPrivacyServerSideFixedClipping``): the server
  clips each site's update to norm ``clip``, averages and adds noise of deviation
  ``noise x clip / sites``: each round a Gaussian mechanism over whole sites, every site in
  every round (no sampling), composed over ``rounds``. It hides whether a hospital took part at
  all, which with three hospitals costs nearly all the signal (docs/federated.md has the numbers).

The accountant is Google's ``dp-accounting`` (Rényi DP, converted to (epsilon, delta)).
"""

from __future__ import annotations

import logging

import dp_accounting

from ehrlake.errors import EhrlakeError

PATIENT, SITE = "patient", "site"
LEVELS = (PATIENT, SITE)


def _event(level: str, noise: float, rounds: int, local_steps: int, rate: float):
    gaussian = dp_accounting.GaussianDpEvent(noise)
    if level == SITE:
        return dp_accounting.SelfComposedDpEvent(gaussian, rounds)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, gaussian), rounds * local_steps
    )


def epsilon(
    level: str, noise: float, rounds: int, delta: float, local_steps: int = 0, rate: float = 1.0
) -> float:
    """The epsilon at ``delta`` of a run at this ``level`` with noise multiplier ``noise``."""
    if level not in LEVELS:
        raise EhrlakeError(f"unknown privacy level {level!r} (known: {', '.join(LEVELS)})")
    if noise <= 0:
        return float("inf")
    absl = logging.getLogger("absl")  # it warns of orders it leaves out of the bound, at low noise
    before = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(_event(level, noise, rounds, local_steps, rate))
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(before)


def noise_for(
    target: float, level: str, rounds: int, delta: float, local_steps: int = 0, rate: float = 1.0
) -> float:
    """The smallest noise multiplier (to 0.1%) whose run stays within epsilon ``target``."""
    if target <= 0:
        raise EhrlakeError(f"epsilon must be positive, not {target}")

    def spent(noise: float) -> float:
        return epsilon(level, noise, rounds, delta, local_steps, rate)

    low, high = 0.05, 1.0
    while spent(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise EhrlakeError(f"no noise reaches epsilon {target} in {rounds} rounds at delta {delta}")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= target else (mid, high)
    return high
