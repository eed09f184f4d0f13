"""Data quality over silver: declarative checks (``checks.py``) into ``gold.dq_results`` and the
readiness scorecard (``readiness.py``) into ``gold.readiness``."""

from __future__ import annotations

import datetime as dt

from pyspark.sql import functions as F

from ehrlake.lake import WriteMode
from ehrlake.quality import checks as checks_module
from ehrlake.quality import readiness


def run(lake, checks=None, run_id: str | None = None, today: dt.date | None = None, role=None) -> dict:
    """Run every check, append the results, rebuild the scorecard; returns a summary."""
    checks = checks if checks is not None else checks_module.load()
    today = today or dt.date.today()
    run_id = run_id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    with lake.security.job("quality", ["gold"], role, run_id) as (_, written):
        results = checks_module.run(lake, checks, run_id, today).cache()
        info = {"ehrlakeJob": "quality", "ehrlakeRunId": run_id}
        # one run's results replace that run's rows only: re-running a run id is idempotent
        if lake.exists(checks_module.RESULTS):
            kept = lake.read(checks_module.RESULTS).where(F.col("run_id") != run_id)
            lake.write(
                kept.unionByName(results), checks_module.RESULTS, mode=WriteMode.OVERWRITE, commit_info=info
            )
        else:
            lake.write(results, checks_module.RESULTS, commit_info=info)
        score = readiness.by_source(lake, results, today).unionByName(readiness.by_region(lake, today))
        lake.write(score, readiness.TABLE, mode=WriteMode.OVERWRITE, commit_info=info)
        totals = results.agg(
            F.count("*").alias("n"), F.sum((~F.col("passed")).cast("int")).alias("failed")
        ).first()
        summary = {
            "run_id": run_id,
            "checks": len(checks),
            "results": int(totals["n"]),
            "failed": int(totals["failed"] or 0),
        }
        written += [(checks_module.RESULTS, f"{summary['results']} results"), (readiness.TABLE, "scorecard")]
        results.unpersist()
    return summary
