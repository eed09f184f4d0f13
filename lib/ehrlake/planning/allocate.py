"""A limited resource allocated across units by a linear program: ``ehrlake plan`` ->
``gold.allocation_plan``.

Each unit has its own capacity (``--capacity FILE``: ``unit,capacity[,max_extra]``) and a pool of
``--pool`` more units of the resource (beds, slots) is to be placed for the forecast weeks. Demand
is uncertain: each (unit, week) of ``gold.utilisation_forecast`` becomes ``SCENARIOS`` equally likely
demands, the quantiles of a normal distribution with the forecast as its mean and the upper end of
the prediction interval setting its spread (demand below zero is zero). The program places whole
units of the resource, ``x_u``, to minimise the expected unmet demand averaged over the weeks
(sample-average approximation of a two-stage problem):

    minimise   1/(S W) * sum_{u,w,s} unmet[u,w,s]  +  tiny * sum_u x_u
    subject to unmet[u,w,s] >= demand[u,w,s] - capacity_u - x_u,  unmet >= 0
               sum_u x_u <= pool,  0 <= x_u <= max_extra_u,  x_u integer

(the tiny cost leaves a unit of the pool unplaced where it would meet no demand). Solved with PuLP's
bundled CBC. A unit of the forecast missing from the file is an error: a planner states every
capacity, zero included.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import EhrlakeError
from ehrlake.lake.modes import WriteMode
from ehrlake.planning import forecast
from ehrlake.planning.settings import Settings, load

TABLE = "gold.allocation_plan"
SCENARIOS = 9
TINY = 1e-6


@dataclass(frozen=True)
class Capacity:
    capacity: float
    max_extra: float | None = None  # None: no limit but the pool


def capacities(path: str | Path) -> dict[str, Capacity]:
    """``unit -> Capacity`` from a CSV with a header ``unit,capacity[,max_extra]``."""
    path = Path(path)
    if not path.is_file():
        raise EhrlakeError(f"capacity file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"unit", "capacity"} <= set(reader.fieldnames or []):
            raise EhrlakeError(f"{path}: the header must name unit and capacity (and max_extra, optional)")
        found = {}
        for n, row in enumerate(reader, start=2):
            try:
                cap = float(row["capacity"])
                extra = float(row["max_extra"]) if (row.get("max_extra") or "").strip() else None
            except ValueError:
                raise EhrlakeError(f"{path} line {n}: capacity and max_extra must be numbers") from None
            if cap < 0 or (extra is not None and extra < 0) or row["unit"] in found:
                raise EhrlakeError(f"{path} line {n}: a negative number or a unit named twice")
            found[row["unit"]] = Capacity(cap, extra)
    return found


def scenarios(mean: float, upper: float, z: float) -> list[float]:
    """``SCENARIOS`` equally likely demands: normal quantiles, mean ``mean``, spread from ``upper``."""
    sd = max(upper - mean, 0.0) / z
    return [max(0.0, mean + sd * NormalDist().inv_cdf((k + 0.5) / SCENARIOS)) for k in range(SCENARIOS)]


def solve(demand: dict[str, list[list[float]]], caps: dict[str, Capacity], pool: int) -> tuple[dict, str]:
    """``unit -> whole units placed`` minimising expected unmet demand; ``demand[u]`` holds each
    week's scenarios. Returns the placement and the solver's status."""
    import pulp

    prob = pulp.LpProblem("allocation", pulp.LpMinimize)
    units = sorted(demand)
    x = {u: pulp.LpVariable(f"x_{i}", lowBound=0, upBound=caps[u].max_extra, cat="Integer")
         for i, u in enumerate(units)}  # fmt: skip
    weight = 1.0 / (SCENARIOS * max(len(next(iter(demand.values()), [])), 1))
    unmet = []
    for i, u in enumerate(units):
        for w, week in enumerate(demand[u]):
            for s, d in enumerate(week):
                if d <= caps[u].capacity:
                    continue  # met by the unit's own capacity whatever is placed there
                v = pulp.LpVariable(f"unmet_{i}_{w}_{s}", lowBound=0)
                prob += v >= d - caps[u].capacity - x[u]
                unmet.append(v)
    prob += weight * pulp.lpSum(unmet) + TINY * pulp.lpSum(x.values())
    prob += pulp.lpSum(x.values()) <= pool
    status = pulp.LpStatus[prob.solve(pulp.PULP_CBC_CMD(msg=False))]
    if status != "Optimal":
        raise EhrlakeError(f"the allocation program is {status.lower()}")
    return {u: int(round(x[u].value() or 0)) for u in units}, status


def expected_unmet(weeks: list[list[float]], capacity: float) -> float:
    """Mean over weeks and scenarios of the demand above ``capacity``."""
    if not weeks:
        return 0.0
    return sum(max(0.0, d - capacity) for week in weeks for d in week) / (len(weeks) * SCENARIOS)


SCHEMA = T.StructType(
    [
        T.StructField("resource", T.StringType(), False),
        T.StructField("unit", T.StringType(), False),
        T.StructField("capacity", T.DoubleType()),
        T.StructField("max_extra", T.DoubleType()),
        T.StructField("allocated", T.IntegerType()),
        T.StructField("expected_demand", T.DoubleType()),  # mean per week over the forecast weeks
        T.StructField("peak_upper", T.DoubleType()),  # the highest week's upper interval end
        T.StructField("expected_unmet_before", T.DoubleType()),  # per week, nothing placed
        T.StructField("expected_unmet_after", T.DoubleType()),  # per week, with the plan
        T.StructField("pool", T.IntegerType()),
        T.StructField("first_week", T.DateType()),
        T.StructField("last_week", T.DateType()),
        T.StructField("forecast_through", T.DateType()),
        T.StructField("run_at", T.TimestampType()),
    ]
)


def run(
    lake, resource: str, capacity_file: str | Path, pool: int, role=None, s: Settings | None = None
) -> list:
    """Allocate ``pool`` units of ``resource`` across the forecast's units, as one audited job;
    returns the plan's rows. Re-running on the same forecast gives the same plan."""
    s = s or load()
    plan = s.plan(resource)
    if pool < 0:
        raise EhrlakeError(f"--pool must be 0 or more, not {pool}")
    caps = capacities(capacity_file)
    with lake.security.job("plan", ["gold"], role) as (role, audit):
        if not lake.exists(forecast.FORECAST):
            raise EhrlakeError(f"no forecast yet: run ehrlake forecast --resource {plan.forecast}")
        found = (
            lake.read(forecast.FORECAST, role=role)
            .where(F.col("resource") == plan.forecast)
            .orderBy("unit", "week_start")
            .collect()  # units x horizon weeks: one row per unit and week
        )
        if not found:
            raise EhrlakeError(
                f"no {plan.forecast} forecast: run ehrlake forecast --resource {plan.forecast}"
            )
        missing = sorted({r.unit for r in found} - set(caps))
        if missing:
            raise EhrlakeError(
                f"{capacity_file} states no capacity for {len(missing)} unit(s) of the forecast: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (a unit with none: 0)"
            )
        z = NormalDist().inv_cdf((1 + found[0].interval) / 2)
        demand: dict[str, list[list[float]]] = {u: [] for u in caps}
        means: dict[str, list[float]] = {u: [] for u in caps}
        peaks: dict[str, float] = dict.fromkeys(caps, 0.0)
        for r in found:
            scale = plan.per_week
            demand[r.unit].append(scenarios(r.forecast * scale, r.upper * scale, z))
            means[r.unit].append(r.forecast * scale)
            peaks[r.unit] = max(peaks[r.unit], r.upper * scale)
        weeks = max(len(v) for v in demand.values())
        for u in demand:  # a unit in the file but not in the forecast has no demand in any week
            demand[u] = demand[u] or [[0.0] * SCENARIOS] * weeks
        placed, _ = solve(demand, caps, pool)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        first, last = min(r.week_start for r in found), max(r.week_start for r in found)
        rows = [
            (resource, u, c.capacity, c.max_extra, placed[u],
             sum(means[u]) / len(means[u]) if means[u] else 0.0, peaks[u],
             expected_unmet(demand[u], c.capacity), expected_unmet(demand[u], c.capacity + placed[u]),
             pool, first, last, found[0].trained_through, now)
            for u, c in sorted(caps.items())
        ]  # fmt: skip
        lake.create(TABLE, SCHEMA, ["resource"], description="a limited resource placed across units")
        lake.write(lake.spark.createDataFrame(rows, SCHEMA), TABLE, mode=WriteMode.OVERWRITE,
                   where={"resource": resource})  # fmt: skip
        before = sum(r[7] for r in rows)
        after = sum(r[8] for r in rows)
        audit.append((TABLE, f"{resource}: {sum(placed.values())} of {pool} placed; expected unmet "
                             f"{before:.1f} -> {after:.1f} per week"))  # fmt: skip
    return [dict(zip(SCHEMA.fieldNames(), r, strict=True)) for r in rows]


def lines(plan: list[dict]) -> list[str]:
    """The plan as a few printable lines: the placement per unit and what it changes (a unit with
    no capacity, no placement and no demand even at its upper bound is counted, not listed)."""
    if not plan:
        return []
    p0 = plan[0]
    placed = sum(r["allocated"] for r in plan)
    before = sum(r["expected_unmet_before"] for r in plan)
    after = sum(r["expected_unmet_after"] for r in plan)
    out = [
        f"{p0['resource']}: placed {placed} of a pool of {p0['pool']} over {len(plan)} unit(s) for the weeks "
        f"{p0['first_week']} to {p0['last_week']}; expected unmet demand {before:.2f} -> {after:.2f} per "
        f"week ({(after / before - 1) if before else 0:+.0%}) -> {TABLE}"
    ]
    shown = [r for r in plan if r["allocated"] or r["capacity"] or r["peak_upper"]]  # not the idle ones
    for r in sorted(shown, key=lambda r: (-r["allocated"], -r["expected_demand"], r["unit"]))[:10]:
        out.append(
            f"  {r['unit'][:32]:<32} capacity {r['capacity']:>7.0f}  +{r['allocated']:<5} demand "
            f"{r['expected_demand']:>7.1f} (upper {r['peak_upper']:.1f})  unmet "
            f"{r['expected_unmet_before']:.2f} -> {r['expected_unmet_after']:.2f}"
        )
    return out
