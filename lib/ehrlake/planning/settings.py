"""``conf/planning.yaml`` as dataclasses: what a demand series is made of, and what a plan allocates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ehrlake.config import build, read_yaml
from ehrlake.errors import EhrlakeError
from ehrlake.home import CONF

FILE = CONF / "planning.yaml"
LEVELS = {"facility": "organization_id", "state": "state", "all": None}
MEASURES = ("encounters", "bed_days")


@dataclass(frozen=True)
class Resource:
    classes: tuple = ()  # encounter classes that make the demand
    measure: str = "encounters"  # encounters (started in the week) | bed_days (occupied in the week)


@dataclass(frozen=True)
class Plan:
    forecast: str = ""  # the forecast resource it is made of
    per_week: float = 1.0  # the resource needed per unit of the weekly forecast


@dataclass(frozen=True)
class Settings:
    level: str = "state"
    history_weeks: int = 260
    horizon_weeks: int = 8
    backtest_weeks: int = 26
    calibration_weeks: int = 26
    interval: float = 0.8
    min_encounters: int = 52
    max_training_rows: int = 200_000
    max_stay_days: int = 365
    resources: dict[str, Resource] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)

    def resource(self, name: str) -> Resource:
        if name not in self.resources:
            raise EhrlakeError(f"no resource {name!r} in {FILE.name}: {', '.join(self.resources)}")
        return self.resources[name]

    def plan(self, name: str) -> Plan:
        if name not in self.plans:
            raise EhrlakeError(f"no plannable resource {name!r} in {FILE.name}: {', '.join(self.plans)}")
        return self.plans[name]


def load(path: str | Path | None = None) -> Settings:
    path = Path(path or FILE)
    s = build(Settings, read_yaml(path), f"planning settings {path}")
    if s.level not in LEVELS:
        raise EhrlakeError(f"{path}: level must be one of {', '.join(LEVELS)}, not {s.level!r}")
    if not 0 < s.interval < 1 or min(s.horizon_weeks, s.backtest_weeks, s.calibration_weeks) < 1:
        raise EhrlakeError(f"{path}: interval in (0, 1); horizon, backtest and calibration weeks >= 1")
    # a series needs a year for its seasonal lag, then the fit, calibration and backtest weeks
    needed = 52 + s.horizon_weeks + s.calibration_weeks + s.backtest_weeks + 26
    if s.history_weeks < needed:
        raise EhrlakeError(f"{path}: history_weeks must be at least {needed} for these settings")
    for name, r in s.resources.items():
        if r.measure not in MEASURES or not r.classes:
            raise EhrlakeError(f"{path}: resource {name} needs classes and a measure in {MEASURES}")
    for name, p in s.plans.items():
        if p.forecast not in s.resources or p.per_week <= 0:
            raise EhrlakeError(f"{path}: plan {name} must name a resource and a per_week > 0")
    return s
