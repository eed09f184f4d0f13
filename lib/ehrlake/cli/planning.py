"""``ehrlake forecast`` and ``ehrlake plan``: resource planning from the lake (:mod:`ehrlake.planning`)."""

from __future__ import annotations

import datetime as dt

from ehrlake.cli import common


def register(sub) -> None:
    """Add these commands, each with its arguments and its handler, to the CLI's subparsers."""
    fc = sub.add_parser(
        "forecast",
        help="weekly demand per facility or state, forecast with intervals and backtested",
        description="Forecast each unit's weekly demand (conf/planning.yaml: admissions, acute, visits, "
        "bed_days) for the weeks after the last complete week, with a prediction interval, into "
        "gold.utilisation_forecast; the held-out weeks' errors against a seasonal-naive and a "
        "four-week-mean baseline go to gold.forecast_backtest.",
    )
    fc.add_argument("--resource", default="all", help="a resource of conf/planning.yaml, or all (default)")
    fc.add_argument("--level", choices=["facility", "state", "all"], help="the unit (default: the conf's)")
    fc.add_argument("--as-of", type=dt.date.fromisoformat, help="forecast after the last complete week "
                    "on or before this date (default: the data's last encounter)")  # fmt: skip
    fc.add_argument("--horizon", type=int, help="weeks ahead (default: the conf's)")
    plan = sub.add_parser(
        "plan",
        help="place a limited resource across units by a linear program over the forecast",
        description="Allocate --pool more units of a resource (beds, slots) across the forecast's units "
        "to minimise expected unmet demand over the forecast weeks, each unit's own capacity from "
        "--capacity (CSV: unit,capacity[,max_extra]) -> gold.allocation_plan.",
    )
    plan.add_argument("--resource", required=True, help="a plannable resource of conf/planning.yaml (beds)")
    plan.add_argument("--capacity", required=True, help="CSV with the header unit,capacity[,max_extra]")
    plan.add_argument("--pool", type=int, required=True, help="units of the resource to place")
    for p in (fc, plan):
        common.lake_options(p)
        common.role_option(p)
    fc.set_defaults(handler=cmd_forecast)
    plan.set_defaults(handler=cmd_plan)


def cmd_forecast(args) -> int:
    import dataclasses

    from ehrlake.planning import forecast, settings

    lake, _ = common.open_lake(args)
    s = settings.load()
    changes = {k: v for k, v in (("level", args.level), ("horizon_weeks", args.horizon)) if v}
    s = dataclasses.replace(s, **changes)
    for name in list(s.resources) if args.resource == "all" else [args.resource]:
        print(forecast.line(forecast.run(lake, name, args.as_of, args.role, s)))
    return 0


def cmd_plan(args) -> int:
    from ehrlake.planning import allocate

    lake, _ = common.open_lake(args)
    for text in allocate.lines(allocate.run(lake, args.resource, args.capacity, args.pool, args.role)):
        print(text)
    return 0
