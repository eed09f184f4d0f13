"""Airflow DAG: nightly population risk scoring with spark-submit (the same script cron runs).

Place this file in the DAGs folder; set the Airflow Variables ``ehrlake_home`` and ``ehrlake_lake``.
The run's logical date (``ds``) is the scoring date, so a backfill re-scores past dates, and
re-running a date replaces its scores (gold.risk_scores is merged on patient, task and date).
"""

from __future__ import annotations

import datetime as dt

from airflow import DAG
from airflow.operators.bash import BashOperator

TASKS = ("mortality_12m",)

with DAG(
    dag_id="ehrlake_population_scoring",
    schedule="15 2 * * *",
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
    tags=["ehrlake", "scoring"],
) as dag:
    for task in TASKS:
        BashOperator(
            task_id=f"score_{task}",
            bash_command="{{ var.value.ehrlake_home }}/infra/schedule/score.sh {{ ds }}",
            env={
                "EHRLAKE_HOME": "{{ var.value.ehrlake_home }}",
                "EHRLAKE_LAKE": "{{ var.value.ehrlake_lake }}",
                "EHRLAKE_SCORE_TASKS": task,
            },
            append_env=True,
        )
