#!/usr/bin/env bash
# Population risk scoring as the schedule runs it: one spark-submit per task, as of a date, acting as
# the scheduler role (reads silver/gold, writes gold only). Both schedules call this script, and
# tests/test_scoring.py runs it, so what is tested is what runs. --incremental: a date scored before
# (a re-run, a fixed monthly date) re-scores only the patients whose silver rows changed since.
#
#   score.sh [AS_OF]        AS_OF: YYYY-MM-DD (default: today, UTC)
#
# Environment: EHRLAKE_HOME (checkout or unpacked release; default: this script's repository),
# EHRLAKE_LAKE (lake root; default $EHRLAKE_HOME/lake), EHRLAKE_SCORE_TASKS (space-separated tasks,
# default mortality_12m), SPARK_SUBMIT (default spark-submit on PATH), SPARK_SUBMIT_ARGS (e.g.
# "--master spark://host:7077 --py-files dist/ehrlake-0.1.0-py3-none-any.whl"), EHRLAKE_CONF and
# EHRLAKE_MASTER_KEY as for every job (docs/operations.md).
set -euo pipefail
home="${EHRLAKE_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
as_of="${1:-$(date -u +%Y-%m-%d)}"
submit="${SPARK_SUBMIT:-spark-submit}"
for task in ${EHRLAKE_SCORE_TASKS:-mortality_12m}; do
  # shellcheck disable=SC2086  # SPARK_SUBMIT_ARGS is a list of arguments on purpose
  "$submit" ${SPARK_SUBMIT_ARGS:-} "$home/jobs/score.py" \
    --task "$task" --as-of "$as_of" --role scheduler --incremental --lake "${EHRLAKE_LAKE:-$home/lake}"
done
