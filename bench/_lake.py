"""Shared by the benchmarks: a lake with its own throwaway keys, as a job would open it."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

import ehrlake.lake
from ehrlake import config
from ehrlake.config import SecurityConfig
from ehrlake.lake import Lake
from ehrlake.security import init_keys

REPO = Path(__file__).resolve().parents[1]


def secured_lake(root: Path, spark, secrets: Path, engine: str = "auto", policy: Path | None = None) -> Lake:
    """A lake whose keys live in ``secrets`` (created on first use), with the repository's policy
    (or ``policy``) and no role grants of its own, committed by ``engine`` (``lake.engine``)."""
    security = SecurityConfig(
        master_key_file=str(secrets / "master.key"),
        key_store=str(secrets / "keystore"),
        reveal_key_file=str(secrets / "reveal.key"),
        access_policy=str(policy or REPO / "conf" / "access_policy.yaml"),
        grants=str(secrets / "grants"),  # none made: the benchmark's user acts as any role
    )
    init_keys(security)
    return ehrlake.lake.open(
        str(root), spark, config.Config(lake=config.LakeConfig(engine=engine), security=security)
    )


def fhir_arguments(parser) -> None:
    """``--bundles`` (the SMART 625-patient set beside the checkout, else the bundled sample) and
    ``--out`` (where results go): what the FHIR benchmarks share."""
    default = REPO.parent / "shared" / "data" / "synthea_fhir_r4_smart" / "bundles"
    parser.add_argument(
        "--bundles", type=Path, default=default if default.exists() else REPO / "data/sample/fhir_bundles"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")


def machine(spark) -> dict:
    return {"cores": os.cpu_count(), "python": platform.python_version(), "spark": spark.version}


def save_result(out_dir: Path, name: str, result: dict) -> Path:
    """Write ``bench/results/<name>-<date>.json`` (one result per benchmark and day)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
