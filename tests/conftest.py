"""One SparkSession for the whole test session (local[2]); a fresh lake directory per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="session")
def spark():
    from ehrlake.config import Config, SparkConfig
    from ehrlake.session import get_spark

    os.environ["PYSPARK_PYTHON"] = sys.executable
    conf = dict(SparkConfig().conf)
    conf["spark.sql.shuffle.partitions"] = "4"
    conf["spark.driver.memory"] = "2g"
    session = get_spark(Config(spark=SparkConfig(master="local[2]", app_name="ehrlake-tests", conf=conf)))
    yield session
    session.stop()


@pytest.fixture
def lake(spark, tmp_path):
    from ehrlake.lake import Lake

    return Lake(str(tmp_path / "lake"), spark)


def shared(*parts: str) -> Path:
    """A path in ../shared/data; tests needing it are skipped where the folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not available")
    return path
