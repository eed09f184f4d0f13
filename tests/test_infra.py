"""The cluster and schedule files that cannot run here (no Docker daemon, no Kubernetes, no Airflow)
are at least well-formed and point at files that exist."""

from __future__ import annotations

import ast
import re

import yaml
from conftest import REPO

INFRA = REPO / "infra"


def test_kubernetes_and_compose_files_are_valid_yaml_with_real_job_files():
    docs = [d for f in sorted((INFRA / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = {d["kind"] for d in docs}
    assert {"SparkApplication", "ScheduledSparkApplication", "PersistentVolumeClaim", "Role"} <= kinds
    for d in docs:
        spec = d.get("spec", {})
        app = spec.get("template", spec)
        if "mainApplicationFile" in app:
            job = app["mainApplicationFile"].replace("local:///opt/ehrlake/", "")
            assert (REPO / job).is_file(), job
            assert app["driver"]["serviceAccount"] == "ehrlake-spark"
    compose = yaml.safe_load((INFRA / "docker" / "compose.yaml").read_text())
    assert {"master", "worker", "submit"} <= set(compose["services"])


def test_dockerfile_copies_paths_that_exist():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (.+?) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO / path).exists(), path


def test_airflow_dag_parses_and_runs_the_schedule_script():
    tree = ast.parse((INFRA / "schedule" / "airflow_dag.py").read_text())
    commands = [
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "bash_command"
    ]
    assert commands and all("infra/schedule/score.sh" in c for c in commands)
