"""Benchmark: the weekly demand forecast against its baselines on held-out weeks (docs/planning.md).

The SMART set (625 Synthea patients as FHIR bundles, beside the checkout; else the bundled sample)
is ingested and cleaned into a throwaway lake, or ``--lake`` names one already built. For each
(resource, level) pair the forecast is backtested exactly as ``ehrlake forecast`` does it: fitted
``backtest_weeks`` (26) before the origin, then every held-out week forecast from every held-out
origin (1 to 8 weeks ahead). Reported per pair: mean absolute percentage error (weeks with demand),
weighted absolute percentage error, the 80% interval's coverage, and the change against the
seasonal-naive baseline (the aim: MAPE at least 10% lower) and the mean of the last four weeks.
Generated patients are never used: they are copies of the sample's, and their weeks would repeat
the sample's.

Results: ``bench/results/forecast-<date>.json``.

    .venv/bin/python bench/forecast.py [--lake DIR] [--as-of 2018-12-31]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import fhir_arguments, machine, save_result, secured_lake  # noqa: E402

from ehrlake import clean, config, ingest  # noqa: E402
from ehrlake.planning import forecast, settings  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402

PAIRS = [("visits", "facility"), ("visits", "all"), ("acute", "facility"), ("acute", "all"),
         ("admissions", "all"), ("bed_days", "all")]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fhir_arguments(parser)
    parser.add_argument("--lake", type=Path, help="an existing lake (opened with conf/default.yaml's keys)")
    parser.add_argument("--as-of", type=dt.date.fromisoformat, default=dt.date(2018, 12, 31),
                        help="forecast origin (the SMART set has full years up to 2018)")  # fmt: skip
    args = parser.parse_args()
    spark = get_spark(config.Config())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.lake:
            cfg = config.load(None).with_lake_root(str(args.lake))
            import ehrlake.lake

            lake = ehrlake.lake.open(config=cfg)
            source = str(args.lake)
        else:
            lake = secured_lake(work / "lake", spark, work / "secrets")
            start = time.perf_counter()
            ingest.run(lake, ingest.SourceKind.FHIR_BUNDLES, str(args.bundles))
            clean.run(lake)
            print(f"built the lake from {args.bundles} in {time.perf_counter() - start:.0f} s", flush=True)
            source = str(args.bundles)
        base = settings.load()
        results = []
        for resource, level in PAIRS:
            s = dataclasses.replace(base, level=level)
            start = time.perf_counter()
            got = forecast.run(lake, resource, args.as_of, s=s)
            seconds = time.perf_counter() - start
            o = got["overall"]
            m, sn, mean4 = o[forecast.MODEL], o["seasonal_naive"], o["mean_4_weeks"]
            per_h = {
                r.horizon: {"model_mape": r.mape}
                for r in lake.read(forecast.BACKTEST)
                .where(f"resource = '{resource}' AND method = '{forecast.MODEL}' AND horizon > 0")
                .collect()  # one row per horizon
            }
            row = {
                "resource": resource, "level": level, "units": got["units"], "origin": str(got["origin"]),
                "held_out_rows": m["rows"], "held_out_demand": m["demand"],
                "mean_weekly_demand_per_unit": m["demand"] / max(m["rows"], 1),
                "model": {k: m[k] for k in ("mape", "wape", "coverage")},
                "seasonal_naive": {k: sn[k] for k in ("mape", "wape")},
                "mean_4_weeks": {k: mean4[k] for k in ("mape", "wape")},
                "mape_vs_seasonal_naive": m["mape"] / sn["mape"] - 1 if sn["mape"] else None,
                "mape_vs_mean_4_weeks": m["mape"] / mean4["mape"] - 1 if mean4["mape"] else None,
                "by_horizon": per_h, "seconds": round(seconds, 1),
            }  # fmt: skip
            results.append(row)
            print(forecast.line(got), f"[{seconds:.0f} s]", flush=True)
        result = {
            "benchmark": "forecast",
            "data": source,
            "as_of": str(args.as_of),
            "settings": {k: getattr(base, k) for k in ("history_weeks", "horizon_weeks", "backtest_weeks",
                                                        "calibration_weeks", "interval", "min_encounters")},
            "aim": "model MAPE at least 10% below seasonal naive",
            "results": results,
            "machine": machine(spark),
        }  # fmt: skip
        print(f"saved {save_result(args.out, 'forecast', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
