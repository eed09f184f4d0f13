"""Weekly demand per unit (facility, state, or all), forecast with intervals, backtested against
baselines: ``ehrlake forecast`` -> ``gold.utilisation_forecast`` and ``gold.forecast_backtest``.

A **series** is one unit's demand per week (Monday to Sunday) from ``silver.encounter``: encounters of
the resource's classes started in the week, or bed-days occupied in it (a stay counts each day from
admission to the day before discharge). Weeks without demand are zeros, not gaps. Units with fewer
than ``min_encounters`` in the history are pooled into ``(other)``, so no series is mostly zeros.
Encounters dated after today (MIMIC's shifted years) have no place on a calendar and are left out,
counted in the run's line.

The **forecast** is one gradient-boosted model (XGBoost, Poisson objective) over every unit and
horizon: from what is known at the forecast origin (the week's demand, the three before, the means of
the last 4 and 52 weeks and the target's week a year earlier with and without its neighbours, each
relative to the mean of the last 13 weeks, which is the log offset; the target's week of the year;
the horizon) it predicts demand ``h`` weeks ahead, one model for all horizons (direct, not
recursive). The training rows (units x origins x horizons) are built in Spark with window functions;
a seeded sample of at most ``max_training_rows`` is fitted on the driver and the fitted booster is
applied in the executors, so nothing unbounded reaches the driver.

**Intervals** are split conformal: the model is fitted on targets up to ``calibration_weeks`` before
the origin, its residuals on the calibration weeks (scaled by ``sqrt(forecast + 1)``, as counts
vary with their level) give the quantiles of the central ``interval``.

The **backtest** repeats all of it with the origin ``backtest_weeks`` earlier, then forecasts every
held-out week from every held-out origin (rolling origin, each forecast from data known at its
origin) and compares mean absolute percentage error (weeks with demand), weighted absolute
percentage error and interval coverage against two baselines over the same rows: seasonal naive
(the same week a year earlier) and the mean of the last four weeks.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake import encounters
from ehrlake.errors import EhrlakeError
from ehrlake.lake.modes import WriteMode
from ehrlake.planning.settings import LEVELS, Resource, Settings, load

FORECAST, BACKTEST = "gold.utilisation_forecast", "gold.forecast_backtest"
OTHER = "(other)"
MODEL = "xgboost-poisson"
# known at the origin, each divided by the unit's level (its mean of the last 13 weeks), so one model
# serves units of any size and a level it never saw in training: the level enters as the log offset,
# and a model that learnt nothing forecasts the recent level (a series that trends keeps its level)
SCALED = ["y", "lag1", "lag2", "lag3", "rm4", "rm52", "seasonal", "season3"]
FEATURES = ["h", *[f"{c}_rel" for c in SCALED], "woy_sin", "woy_cos"]
FLOOR = 1 / 52  # a unit's level: at least one a year (a log offset needs it above zero)
BASELINES = {"seasonal_naive": "seasonal", "mean_4_weeks": "rm4"}
PARAMS = {"n_estimators": 150, "max_depth": 3, "learning_rate": 0.05, "subsample": 0.8,
          "min_child_weight": 10, "objective": "count:poisson", "tree_method": "hist", "n_jobs": 2,
          "random_state": 7}  # fmt: skip


def last_complete_week(as_of: dt.date) -> dt.date:
    """The Monday of the last Monday-to-Sunday week that ends on or before ``as_of``."""
    monday = as_of - dt.timedelta(days=as_of.weekday())
    return monday if as_of.weekday() == 6 else monday - dt.timedelta(weeks=1)


def data_end(lake, role=None) -> dt.date:
    """The day of the data's end (:func:`ehrlake.encounters.data_end`, the clock the labels and the
    published rates keep, a date-shifted extract's own included): the default forecast origin's
    week is the last complete one before it."""
    found = encounters.data_end(lake, role)
    if found is None:
        raise EhrlakeError("silver.encounter holds no dated encounters: run ehrlake clean first")
    return found.date()


def demand(lake, s: Settings, resource: str, origin: dt.date, role=None) -> tuple[DataFrame, dict]:
    """Weekly demand ``(unit, week, y)`` for every unit and every week of the history up to the
    origin week, zeros filled (persisted: the caller unpersists it), and counts of the encounters
    read and left out. The encounters are read once, into a narrow cached frame."""
    r = s.resource(resource)
    first = origin - dt.timedelta(weeks=s.history_weeks - 1)
    end = origin + dt.timedelta(days=6)
    unit_col = LEVELS[s.level]
    read = (
        lake.read("silver.encounter", role=role)
        .where(F.col("encounter_class").isin(list(r.classes)))
        .select(
            (F.coalesce(F.col(unit_col), F.lit("(unknown)")) if unit_col else F.lit("all")).alias("unit"),
            F.to_date("start_at").alias("day"),
            "end_at",
            "length_of_stay_days",
            F.col("start_at").isNull().alias("undated"),
            (F.col("start_at") > F.current_timestamp()).alias("future"),
        )
        .persist()
    )
    try:
        counts = read.agg(
            F.count("*").alias("read"),
            F.sum(F.col("undated").cast("int")).alias("undated"),
            F.sum(F.col("future").cast("int")).alias("future"),
        ).first()
        series = _weekly(read.where(~F.col("undated") & ~F.col("future")), lake, s, r, first, end).persist()
        series.count()
    finally:
        read.unpersist()
    return series, {k: int(counts[k] or 0) for k in ("read", "undated", "future")}


def _weekly(enc: DataFrame, lake, s: Settings, r: Resource, first: dt.date, end: dt.date) -> DataFrame:
    """The zero-filled weekly series of dated encounters ``enc`` (unit, day, end_at, stay)."""
    if r.measure == "bed_days":
        stay = F.coalesce(
            F.datediff(F.to_date("end_at"), "day"), F.ceil("length_of_stay_days").cast("int"), F.lit(1)
        )
        stay = F.least(F.greatest(stay, F.lit(1)), F.lit(s.max_stay_days))
        days = enc.select("unit", F.explode(F.sequence("day", F.date_add("day", stay - 1))).alias("day"))
    else:
        days = enc.select("unit", "day")
    days = days.where(F.col("day").between(F.lit(first), F.lit(end)))
    weekly = days.groupBy("unit", F.to_date(F.date_trunc("week", "day")).alias("week")).agg(
        F.count("*").cast("double").alias("y")
    )
    # units too small for a series of their own are pooled: a unit's encounters in the history
    size = enc.where(F.col("day").between(F.lit(first), F.lit(end))).groupBy("unit").count()
    pooled = size.select(
        "unit",
        F.when(F.col("count") >= s.min_encounters, F.col("unit")).otherwise(F.lit(OTHER)).alias("series"),
    )
    weekly = (
        weekly.join(pooled, "unit", "left")
        .groupBy(F.coalesce("series", F.lit(OTHER)).alias("unit"), "week")
        .agg(F.sum("y").alias("y"))
    )
    weeks = lake.spark.range(s.history_weeks).select(
        F.date_add(F.lit(first), (F.col("id") * 7).cast("int")).alias("week")
    )
    grid = weekly.select("unit").distinct().crossJoin(weeks)
    return grid.join(weekly, ["unit", "week"], "left").fillna(0.0, ["y"])


def rows(series: DataFrame, horizon: int) -> DataFrame:
    """One row per (unit, origin week, horizon): the features known at the origin, the target ``h``
    weeks ahead (null past the data) and the baselines' forecasts of it."""
    w = Window.partitionBy("unit").orderBy("week")
    last = lambda n: w.rowsBetween(-(n - 1), 0)  # noqa: E731
    base = series.select(
        "unit",
        "week",
        "y",
        F.row_number().over(w).alias("idx"),
        *[F.lag("y", k).over(w).alias(f"lag{k}") for k in (1, 2, 3)],
        *[F.avg("y").over(last(n)).alias(f"rm{n}") for n in (4, 13, 52)],
        *[F.lead("y", h).over(w).alias(f"lead{h}") for h in range(1, horizon + 1)],
        *[F.lag("y", 52 - h).over(w).alias(f"season{h}") for h in range(1, horizon + 1)],
        *[
            (sum(F.lag("y", 52 - h + d).over(w) for d in (-1, 0, 1)) / 3).alias(f"season3_{h}")
            for h in range(1, horizon + 1)
        ],  # the target's week and its two neighbours, a year before
    ).where(F.col("idx") >= 54)  # a year and the weeks around it behind every origin
    each = F.explode(
        F.array(
            *[
                F.struct(
                    F.lit(h).alias("h"),
                    F.col(f"lead{h}").alias("target"),
                    F.col(f"season{h}").alias("seasonal"),
                    F.col(f"season3_{h}").alias("season3"),
                )
                for h in range(1, horizon + 1)
            ]
        )
    ).alias("t")
    out = base.select("*", each).select(
        "unit",
        "week",
        "y",
        "lag1",
        "lag2",
        "lag3",
        "rm4",
        "rm13",
        "rm52",
        "t.h",
        "t.target",
        "t.seasonal",
        "t.season3",
    )
    target_week = F.date_add("week", (F.col("h") * 7).cast("int"))
    angle = F.weekofyear(target_week) * (2 * 3.141592653589793 / 52.18)
    level = F.greatest(F.col("rm13"), F.lit(FLOOR))
    return out.select(
        "*",
        level.alias("level"),
        *[(F.col(c) / level).alias(f"{c}_rel") for c in SCALED],
        target_week.alias("target_week"),
        F.sin(angle).alias("woy_sin"),
        F.cos(angle).alias("woy_cos"),
    )


def fit(training: DataFrame, max_rows: int):
    """An XGBoost Poisson model fitted on (a seeded sample of at most ``max_rows`` of) ``training``."""
    import numpy as np
    import xgboost as xgb

    n = training.count()
    if n < 50:
        raise EhrlakeError(f"{n} training rows: the history is too short for a forecast model")
    sample = training if n <= max_rows else training.sample(fraction=max_rows / n * 1.05, seed=7)
    pdf = sample.select(*FEATURES, "level", "target").limit(max_rows).toPandas()  # at most max_rows
    model = xgb.XGBRegressor(**PARAMS)
    offset = np.log(pdf["level"].astype("float64"))
    model.fit(pdf[FEATURES].astype("float64"), pdf["target"].astype("float64"), base_margin=offset)
    return model


def predict(df: DataFrame, model) -> DataFrame:
    """``df`` with ``forecast``: the booster applied in the executors, batch by batch."""
    raw = bytes(model.get_booster().save_raw("json"))
    keep = df.columns
    schema = T.StructType([*df.schema.fields, T.StructField("forecast", T.DoubleType())])

    def batches(frames):
        import numpy as np
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(bytearray(raw))
        for pdf in frames:
            matrix = xgb.DMatrix(pdf[FEATURES].astype("float64"), base_margin=np.log(pdf["level"]))
            yield pdf.assign(forecast=booster.predict(matrix).astype("float64"))

    return df.select(*keep).mapInPandas(batches, schema)


def _scaled_residual() -> F.Column:
    return (F.col("target") - F.col("forecast")) / F.sqrt(F.col("forecast") + 1)


def trained(all_rows: DataFrame, through: dt.date, s: Settings):
    """The model fitted on targets up to ``calibration_weeks`` before ``through``, and the interval's
    scaled-residual quantiles from its forecasts of the calibration weeks (targets up to ``through``)."""
    fit_end = through - dt.timedelta(weeks=s.calibration_weeks)
    known = all_rows.where(F.col("target").isNotNull())
    model = fit(known.where(F.col("target_week") <= F.lit(fit_end)), s.max_training_rows)
    calibration = known.where(
        (F.col("target_week") > F.lit(fit_end))
        & (F.col("target_week") <= F.lit(through))
        & (F.col("week") >= F.lit(fit_end))
    )
    a = (1 - s.interval) / 2
    q = predict(calibration, model).agg(F.percentile_approx(_scaled_residual(), [a, 1 - a], 10000)).first()[0]
    if q is None:
        raise EhrlakeError("no calibration weeks: the history is too short for the interval")
    return model, (float(q[0]), float(q[1]))


def with_interval(df: DataFrame, q: tuple[float, float]) -> DataFrame:
    spread = F.sqrt(F.col("forecast") + 1)
    lower = F.greatest(F.lit(0.0), F.col("forecast") + F.lit(q[0]) * spread)
    return df.withColumn("lower", lower).withColumn("upper", F.col("forecast") + F.lit(q[1]) * spread)


def backtest(all_rows: DataFrame, origin: dt.date, s: Settings) -> list[dict]:
    """Fit as of ``backtest_weeks`` before the origin, forecast every held-out week from every
    held-out origin, and score the model and the baselines on the same rows: overall and per horizon."""
    cut = origin - dt.timedelta(weeks=s.backtest_weeks)
    model, q = trained(all_rows, cut, s)
    held = all_rows.where(
        (F.col("week") >= F.lit(cut)) & (F.col("target_week") <= F.lit(origin)) & F.col("target").isNotNull()
    )
    scored = with_interval(predict(held, model), q)
    methods = {"model": "forecast", **BASELINES}
    aggs = [F.count("*").alias("rows"), F.sum("target").alias("demand")]
    for name, col in methods.items():
        err = F.abs(F.col(col) - F.col("target"))
        aggs += [
            (F.sum(err) / F.sum("target")).alias(f"{name}_wape"),
            F.avg(F.when(F.col("target") > 0, err / F.col("target"))).alias(f"{name}_mape"),
        ]
    covered = F.col("target").between(F.col("lower"), F.col("upper")).cast("double")
    aggs.append(F.avg(covered).alias("coverage"))
    every = scored.groupBy(F.lit(0).alias("h")).agg(*aggs)
    out = []
    for r in every.unionByName(scored.groupBy("h").agg(*aggs)).collect():
        for name in methods:  # at most (horizon + 1) x 3 rows
            out.append({
                "horizon": int(r["h"]), "method": name if name != "model" else MODEL,
                "mape": r[f"{name}_mape"], "wape": r[f"{name}_wape"],
                "coverage": r["coverage"] if name == "model" else None,
                "rows": int(r["rows"]), "demand": float(r["demand"] or 0.0),
            })  # fmt: skip
    return sorted(out, key=lambda d: (d["horizon"], d["method"]))


FORECAST_SCHEMA = T.StructType(
    [
        T.StructField("resource", T.StringType(), False),
        T.StructField("level", T.StringType(), False),
        T.StructField("unit", T.StringType(), False),
        T.StructField("week_start", T.DateType(), False),
        T.StructField("horizon", T.IntegerType(), False),
        T.StructField("forecast", T.DoubleType()),
        T.StructField("lower", T.DoubleType()),
        T.StructField("upper", T.DoubleType()),
        T.StructField("interval", T.DoubleType()),
        T.StructField("seasonal_naive", T.DoubleType()),
        T.StructField("last_4_weeks", T.DoubleType()),
        T.StructField("trained_through", T.DateType()),
        T.StructField("model", T.StringType()),
        T.StructField("run_at", T.TimestampType()),
    ]
)


def run(lake, resource: str, as_of: dt.date | None = None, role=None, s: Settings | None = None) -> dict:
    """Backtest, then forecast ``resource`` per unit for ``horizon_weeks`` after the last complete
    week on or before ``as_of`` (default: the data's last date), as one audited job. Re-running with
    the same data gives the same tables (the resource's rows are replaced; the fit is seeded)."""
    s = s or load()
    s.resource(resource)
    with lake.security.job("forecast", ["gold"], role) as (role, audit):
        origin = last_complete_week(as_of or data_end(lake, role))
        series, counts = demand(lake, s, resource, origin, role)
        all_rows = rows(series, s.horizon_weeks).persist()
        try:
            units = series.select("unit").distinct().count()
            if not units:
                raise EhrlakeError(f"no {resource} demand in the {s.history_weeks} weeks up to {origin}")
            scores = backtest(all_rows, origin, s)
            model, q = trained(all_rows, origin, s)
            now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            ahead = with_interval(predict(all_rows.where(F.col("week") == F.lit(origin)), model), q)
            out = ahead.select(
                F.lit(resource).alias("resource"), F.lit(s.level).alias("level"), "unit",
                F.col("target_week").alias("week_start"), F.col("h").cast("int").alias("horizon"),
                "forecast", "lower", "upper", F.lit(s.interval).alias("interval"),
                F.col("seasonal").alias("seasonal_naive"), F.col("rm4").alias("last_4_weeks"),
                F.lit(origin).alias("trained_through"), F.lit(MODEL).alias("model"),
                F.lit(now).cast("timestamp").alias("run_at"),
            )  # fmt: skip
            lake.create(FORECAST, FORECAST_SCHEMA, ["resource"], description="weekly demand per unit")
            lake.write(
                out.select(*[F.col(f.name).cast(f.dataType) for f in FORECAST_SCHEMA]),
                FORECAST,
                mode=WriteMode.OVERWRITE,
                where={"resource": resource},
            )
            bt = lake.spark.createDataFrame(
                [{"resource": resource, "level": s.level, "trained_through": origin,
                  "backtest_weeks": s.backtest_weeks, "units": units, "run_at": now, **r} for r in scores],
                BACKTEST_SCHEMA,
            )  # fmt: skip
            lake.create(BACKTEST, BACKTEST_SCHEMA, ["resource"], description="forecast backtests")
            lake.write(bt, BACKTEST, mode=WriteMode.OVERWRITE, where={"resource": resource})
        finally:
            all_rows.unpersist()
            series.unpersist()
        overall = {r["method"]: r for r in scores if r["horizon"] == 0}
        audit.append((FORECAST, f"{resource} by {s.level}: {units} units through {origin}"))
    return {"resource": resource, "level": s.level, "origin": origin, "units": units, "counts": counts,
            "overall": overall, "interval": s.interval, "horizon_weeks": s.horizon_weeks,
            "backtest_weeks": s.backtest_weeks}  # fmt: skip


BACKTEST_SCHEMA = T.StructType(
    [
        T.StructField("resource", T.StringType(), False),
        T.StructField("level", T.StringType(), False),
        T.StructField("trained_through", T.DateType(), False),
        T.StructField("backtest_weeks", T.IntegerType()),
        T.StructField("units", T.IntegerType()),
        T.StructField("horizon", T.IntegerType(), False),  # 0: every horizon together
        T.StructField("method", T.StringType(), False),
        T.StructField("mape", T.DoubleType()),
        T.StructField("wape", T.DoubleType()),
        T.StructField("coverage", T.DoubleType()),
        T.StructField("rows", T.LongType()),
        T.StructField("demand", T.DoubleType()),
        T.StructField("run_at", T.TimestampType()),
    ]
)


def line(got: dict) -> str:
    """The run's one line: the backtest against the baselines, and where the forecast went."""
    o = got["overall"]
    m, sn = o[MODEL], o["seasonal_naive"]

    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    gain = "" if not sn["mape"] or m["mape"] is None else f" ({m['mape'] / sn['mape'] - 1:+.0%})"
    left = got["counts"]
    return (
        f"{got['resource']} by {got['level']}: {got['units']} unit(s), {got['horizon_weeks']} weeks after "
        f"{got['origin']}; backtest over {got['backtest_weeks']} held-out weeks: MAPE {pct(m['mape'])} vs "
        f"seasonal naive {pct(sn['mape'])}{gain}, last 4 weeks {pct(o['mean_4_weeks']['mape'])}; "
        f"WAPE {pct(m['wape'])} vs {pct(sn['wape'])}; {got['interval']:.0%} interval covered "
        f"{pct(m['coverage'])}; left out {left['undated']:,} undated, {left['future']:,} future-dated "
        f"-> {FORECAST}"
    )
