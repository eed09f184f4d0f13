"""Resource planning: weekly demand, its forecast against baselines, and the allocation program."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import random

import pytest

from ehrlake.errors import EhrlakeError
from ehrlake.planning import allocate, forecast, settings

ENCOUNTER = (
    "encounter_id string, encounter_class string, start_at timestamp, end_at timestamp, "
    "length_of_stay_days double, organization_id string, state string"
)
MONDAY = dt.datetime(2016, 1, 4)  # a Monday


def small(**changes) -> settings.Settings:
    s = settings.load()
    base = {"history_weeks": 160, "horizon_weeks": 4, "backtest_weeks": 12, "calibration_weeks": 12,
            "min_encounters": 2, "level": "state"}  # fmt: skip
    return dataclasses.replace(s, **{**base, **changes})


def encounters(lake, rows) -> None:
    df = lake.spark.createDataFrame(rows, ENCOUNTER)
    lake.create("silver.encounter", df.schema)
    lake.write(df, "silver.encounter")


def test_weekly_demand_counts_stays_in_each_week_they_occupy_and_pools_small_units(lake):
    w0 = MONDAY + dt.timedelta(weeks=200)
    rows = [
        ("a", "inpatient", w0, w0 + dt.timedelta(days=10), None, "h1", "Bihar"),  # 7 + 3 bed-days
        ("b", "inpatient", w0 + dt.timedelta(days=2), None, 1.5, "h1", "Bihar"),  # no end: 2 days
        ("c", "inpatient", w0, None, None, "h2", "Goa"),  # Goa: one encounter, pooled
        ("d", "ambulatory", w0, None, None, "h1", "Bihar"),  # not an admission
        ("e", "inpatient", None, None, 3.0, "h1", "Bihar"),  # undated
        ("f", "inpatient", dt.datetime(2150, 1, 1), None, None, "h1", "Bihar"),  # future-dated
    ]
    encounters(lake, rows)
    origin = (w0 + dt.timedelta(weeks=1)).date()
    s = small()
    series, counts = forecast.demand(lake, s, "admissions", origin)
    got = {(r.unit, r.week): r.y for r in series.where("y > 0").collect()}
    assert got == {("Bihar", w0.date()): 2.0, (forecast.OTHER, w0.date()): 1.0}
    assert counts == {"read": 5, "undated": 1, "future": 1}
    assert series.count() == 2 * s.history_weeks  # every week of every unit, zeros filled
    beds, _ = forecast.demand(lake, s, "bed_days", origin)
    got = {(r.unit, r.week): r.y for r in beds.where("y > 0").collect()}
    week1 = (w0 + dt.timedelta(weeks=1)).date()
    assert got == {("Bihar", w0.date()): 9.0, ("Bihar", week1): 3.0, (forecast.OTHER, w0.date()): 1.0}
    series.unpersist()  # demand hands back its series cached, the encounters read once
    beds.unpersist()


def test_the_default_origin_keeps_the_labels_clock_a_date_shifted_extracts_own_included(lake):
    """The forecast's data end is the labels' (ehrlake.encounters): the latest start not flagged
    ``future_date``, and in a date-shifted extract alone (every start flagged, as MIMIC-IV's
    2110-2201) the extract's own latest start, not "no dated encounters"."""
    from ehrlake.lake.modes import WriteMode

    schema = "encounter_id string, start_at timestamp, quality_flags array<string>"
    shifted = [
        ("x", dt.datetime(2150, 3, 9), ["future_date"]),
        ("y", dt.datetime(2150, 3, 2), ["future_date"]),
    ]
    df = lake.spark.createDataFrame(
        [("a", MONDAY, []), ("b", MONDAY + dt.timedelta(days=9), None), *shifted], schema
    )
    lake.create("silver.encounter", df.schema)
    lake.write(df, "silver.encounter")
    assert forecast.data_end(lake) == dt.date(2016, 1, 13)
    lake.write(lake.spark.createDataFrame(shifted, schema), "silver.encounter", mode=WriteMode.OVERWRITE)
    assert forecast.data_end(lake) == dt.date(2150, 3, 9)


def test_every_feature_is_known_at_the_origin_and_the_target_is_h_weeks_later(spark):
    weeks = [(MONDAY + dt.timedelta(weeks=i)).date() for i in range(70)]
    series = spark.createDataFrame(
        [("u", w, float(i)) for i, w in enumerate(weeks)], "unit string, week date, y double"
    )
    got = forecast.rows(series, 2).where(f"week = '{weeks[60]}'").orderBy("h").collect()
    assert [r.h for r in got] == [1, 2]
    for r in got:
        assert (r.y, r.lag1, r.lag3) == (60.0, 59.0, 57.0)
        assert r.rm4 == pytest.approx(58.5) and r.rm52 == pytest.approx(34.5)  # weeks 9..60
        assert r.target == 60.0 + r.h and r.seasonal == 60.0 + r.h - 52  # the target week a year before
        assert r.season3 == r.seasonal and r.level == r.rm13 == 54.0 and r.y_rel == pytest.approx(60.0 / 54.0)
        assert r.target_week == weeks[60 + r.h]
    assert (
        forecast.rows(series, 2).agg({"week": "min"}).first()[0] == weeks[53]
    )  # a year (and a week) behind each origin


def seasonal_population(lake, weeks: int = 170) -> dt.date:
    """Two states whose weekly admissions follow the year (winter peaks) and a slow rise, with
    Poisson noise: a signal a forecast can learn and a seasonal-naive baseline reads noisily."""
    rnd = random.Random(11)
    rows, n = [], 0
    for state, level in (("Bihar", 30.0), ("Kerala", 12.0)):
        for i in range(weeks):
            week = MONDAY + dt.timedelta(weeks=i)
            mean = level * (1 + 0.35 * math.cos(2 * math.pi * i / 52.18)) * (1 + 0.002 * i)
            # Poisson draw by counting exponential gaps (no numpy in the data path of a test)
            k, t = 0, rnd.expovariate(1.0)
            while t < mean:
                k, t = k + 1, t + rnd.expovariate(1.0)
            for _ in range(k):
                n += 1
                start = week + dt.timedelta(days=rnd.randrange(7), hours=9)
                rows.append((f"e{n}", "inpatient", start, start + dt.timedelta(days=2), None, None, state))
    encounters(lake, rows)
    return (MONDAY + dt.timedelta(weeks=weeks - 1, days=6)).date()


def test_the_forecast_beats_seasonal_naive_on_held_out_weeks_covers_its_interval_and_reruns_the_same(
    lake, tmp_path
):
    end = seasonal_population(lake)
    s = small()
    got = forecast.run(lake, "admissions", end, s=s)
    assert got["origin"] == end - dt.timedelta(days=6) and got["units"] == 2
    model, naive = got["overall"][forecast.MODEL], got["overall"]["seasonal_naive"]
    assert model["rows"] == naive["rows"] == 2 * sum(12 - h + 1 for h in range(1, 5))  # same held-out rows
    assert model["mape"] < 0.9 * naive["mape"], (model, naive)
    assert 0.6 <= model["coverage"] <= 1.0
    out = lake.read(forecast.FORECAST).orderBy("unit", "horizon").collect()
    assert [(r.unit, r.horizon) for r in out] == [(u, h) for u in ("Bihar", "Kerala") for h in range(1, 5)]
    assert all(r.lower <= r.forecast <= r.upper for r in out)
    assert [r.week_start for r in out[:4]] == [end + dt.timedelta(days=1 + 7 * h) for h in range(4)]
    bihar, kerala = (sum(r.forecast for r in out if r.unit == u) for u in ("Bihar", "Kerala"))
    assert bihar > 1.8 * kerala  # the units keep their own levels
    methods = {(r.method, r.horizon) for r in lake.read(forecast.BACKTEST).collect()}
    assert methods == {(m, h) for m in (forecast.MODEL, *forecast.BASELINES) for h in range(5)}
    forecast.run(lake, "admissions", end, s=s)  # a re-run replaces the resource's rows with the same
    again = lake.read(forecast.FORECAST).orderBy("unit", "horizon").collect()
    assert [(r.forecast, r.lower, r.upper) for r in again] == [(r.forecast, r.lower, r.upper) for r in out]

    # the plan: 12 more admission slots a week for the forecast weeks
    caps = tmp_path / "slots.csv"
    caps.write_text("unit,capacity,max_extra\nBihar,20,8\nKerala,5,\nGoa,0,\n")
    plan = {r["unit"]: r for r in allocate.run(lake, "admission_slots", caps, pool=12, s=s)}
    assert sum(r["allocated"] for r in plan.values()) <= 12 and plan["Bihar"]["allocated"] <= 8
    assert plan["Goa"]["allocated"] == 0 and plan["Goa"]["expected_demand"] == 0.0  # no demand there
    # both states' demand is above their capacity in nearly every scenario: every slot is placed and
    # meets about one admission a week
    assert sum(r["allocated"] for r in plan.values()) == 12
    met = sum(r["expected_unmet_before"] - r["expected_unmet_after"] for r in plan.values())
    assert 11.0 < met <= 12.0
    for r in plan.values():
        assert r["expected_unmet_after"] <= r["expected_unmet_before"]
    stored = {r.unit: r.allocated for r in lake.read(allocate.TABLE).collect()}
    assert stored == {u: r["allocated"] for u, r in plan.items()}
    from ehrlake.eda import report

    section = report.planning_section(lake)
    assert "<img" in section and "MAPE seasonal_naive" in section and "Kerala" in section
    assert "admission_slots" in section  # the plan's table
    caps.write_text("unit,capacity\nBihar,20\n")
    with pytest.raises(EhrlakeError, match="no capacity for 1 unit.*Kerala"):
        allocate.run(lake, "admission_slots", caps, pool=12, s=s)
    with pytest.raises(EhrlakeError, match="may not write|not allowed|refused"):
        allocate.run(lake, "admission_slots", caps, pool=12, role="analyst", s=s)


def test_the_program_places_the_pool_to_minimise_expected_unmet_demand_within_every_limit(tmp_path):
    s9 = allocate.SCENARIOS
    demand = {"a": [[15.0] * s9] * 2, "b": [[12.0] * s9] * 2, "c": [[3.0] * s9] * 2}
    caps = {"a": allocate.Capacity(10, 3), "b": allocate.Capacity(10), "c": allocate.Capacity(5)}
    placed, status = allocate.solve(demand, caps, pool=4)
    assert status == "Optimal" and placed == {"a": 3, "b": 1, "c": 0}  # a's limit, then b; c is met
    placed, _ = allocate.solve(demand, caps, pool=100)
    assert placed == {"a": 3, "b": 2, "c": 0}  # nothing placed where it would meet no demand
    assert allocate.expected_unmet(demand["a"], 13) == 2.0
    spread = allocate.scenarios(10.0, 15.0, 1.2816)
    assert len(spread) == s9 and spread[s9 // 2] == pytest.approx(10.0) and spread == sorted(spread)
    bad = tmp_path / "caps.csv"
    bad.write_text("unit,capacity\na,-1\n")
    with pytest.raises(EhrlakeError, match="line 2"):
        allocate.capacities(bad)
    bad.write_text("name,beds\na,1\n")
    with pytest.raises(EhrlakeError, match="header"):
        allocate.capacities(bad)
