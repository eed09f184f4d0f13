"""One SparkSession for the whole test session (local[2]); a fresh lake directory per test."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "data" / "sample"
ALL_ROLES = ("engineer", "analyst", "scheduler", "clinician", "reviewer", "auditor",
             "site:emergency", "site:referral", "site:other")  # fmt: skip
# Spark compiles generated code for every plan; on the suite's tiny tables compiling costs more than
# it saves (two modules: 355 s with it, 281 s without, 2 cores). The suite runs Spark's interpreted
# expressions, in process and in every CLI or spark-submit it starts ($EHRLAKE_CONF below); the demo
# and the benches run generated code, as production does.
# Spark sizes the pages of its sorts and hash aggregations from the heap (16 MB on a 2 GB driver
# with two cores), and every task of every operator takes at least one: the suite's many small
# queries, several at a time (side_by_side), held up to 1.1 GB of pages for rows of kilobytes, and
# a broadcast of a few rows, which is built outside that memory, once failed for want of heap (CI,
# late in tests/test_eda.py). With 1 MB pages, tests/test_scoring.py and test_eda.py peak at
# 1.15 GB instead of 1.82 GB, with no full collection instead of nine.
TEST_SPARK_CONF = {
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.codegen.factoryMode": "NO_CODEGEN",
    "spark.buffer.pageSize": "1m",
}


# the files whose module fixtures build and train on a whole lake, longest first (minutes each in
# CI): started before the many short files, so under `-n 2 --dist loadfile --no-loadscope-reorder`
# the two workers end together instead of one running a long file alone at the end
LONG_FILES = ("test_scoring.py", "test_models.py", "test_features.py", "test_federated.py",
              "test_notes.py", "test_synth.py", "test_clean.py", "test_eda.py")  # fmt: skip
_seconds_per_file: dict[str, float] = {}


def pytest_collection_modifyitems(config, items):
    """The long files first, in :data:`LONG_FILES`' order; the others after them, by how many
    tests they hold (what xdist's own reordering would do), each file's tests in place."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.path.name] = counts.get(item.path.name, 0) + 1

    def rank(item):
        name = item.path.name
        return (LONG_FILES.index(name), 0) if name in LONG_FILES else (len(LONG_FILES), -counts[name])

    items.sort(key=rank)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Seconds per file, the longest ten: what :data:`LONG_FILES` is ordered by."""
    top = sorted(_seconds_per_file.items(), key=lambda kv: -kv[1])[:10]
    if top:
        terminalreporter.write_line(
            "seconds per file: " + ", ".join(f"{Path(f).name} {s:.0f}" for f, s in top)
        )


@pytest.fixture(scope="session", autouse=True)
def security_conf(tmp_path_factory):
    """One master key and key store for the session, outside every lake (as in production), and a
    configuration pointing at them that CLI and spark-submit subprocesses pick up via $EHRLAKE_CONF."""
    from ehrlake.config import SecurityConfig
    from ehrlake.security import init_keys
    from ehrlake.security.grants import Grants, current_user

    secrets = tmp_path_factory.mktemp("secrets")
    keys = SecurityConfig(
        str(secrets / "master.key"), str(secrets / "keystore"), reveal_key_file=str(secrets / "reveal.key")
    )
    init_keys(keys)
    # signed role grants, as a deployment sets them up: the user running the tests holds every role
    grants = Grants(secrets / "grants")
    grants.init(str(secrets / "grant-admin.key"))
    grants.issue(str(secrets / "grant-admin.key"), current_user(), list(ALL_ROLES))
    conf = secrets / "ehrlake-test.yaml"
    conf.write_text(
        "security:\n"
        f"  master_key_file: {secrets / 'master.key'}\n"
        f"  key_store: {secrets / 'keystore'}\n"
        f"  reveal_key_file: {secrets / 'reveal.key'}\n"
        f"  access_policy: {REPO / 'conf' / 'access_policy.yaml'}\n"
        f"  grants: {secrets / 'grants'}\n"
        f"  grant_admin_key: {secrets / 'grant-admin.key'}\n"
        + yaml.safe_dump({"spark": {"conf": TEST_SPARK_CONF}})
    )
    previous = os.environ.get("EHRLAKE_CONF")
    os.environ["EHRLAKE_CONF"] = str(conf)
    yield conf
    if previous is None:
        os.environ.pop("EHRLAKE_CONF", None)
    else:
        os.environ["EHRLAKE_CONF"] = previous


@pytest.fixture(scope="session")
def spark():
    from ehrlake.config import Config, LakeConfig, SparkConfig
    from ehrlake.session import get_spark

    os.environ["PYSPARK_PYTHON"] = sys.executable
    conf = {"spark.sql.shuffle.partitions": "4", **TEST_SPARK_CONF}
    # the native engine's Delta JARs on the class path (where `make setup` fetched them): lakes use
    # delta-rs unless a test asks for native (tests/test_lake.py runs the lake layer on both)
    lake = LakeConfig(engine="native")
    session = get_spark(
        Config(lake=lake, spark=SparkConfig(master="local[2]", app_name="ehrlake-tests", conf=conf))
    )
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def nothing_left_cached():
    """Every test: the library releases the frames it caches, failing or not. One session serves a
    whole notebook or scheduler day; a job that leaves its caches behind fills the driver's heap
    until a broadcast of ten rows fails (as the suite once did, late, in a synth test). Delta's own
    cache of each table's log state is Delta's to manage (bounded, dropped with its snapshot)."""
    from pyspark.sql import SparkSession

    def ours() -> set[int]:
        active = SparkSession.getActiveSession()
        if active is None:
            return set()
        cached = active.sparkContext._jsc.getPersistentRDDs()
        return {k for k, rdd in cached.items() if not (rdd.name() or "").startswith("Delta Table State")}

    before = ours()
    yield
    left = ours() - before
    assert not left, f"{len(left)} cached frame(s) left behind (a persist() without unpersist())"


@pytest.fixture
def lake(spark, tmp_path, security_conf):
    """A lake with the session's keys, the repository's access policy and its own audit log."""
    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    root = str(tmp_path / "lake")
    return Lake(root, spark, security=Security.from_config(config.load(security_conf).security, root))


def shared(*parts: str) -> Path:
    """A path in ../shared/data; tests needing it are skipped where the folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not available")
    return path


def diabetes_extract(folder: Path, rows: int) -> Path:
    """The shipped Diabetes 130-US extract cut to its first ``rows`` encounters, in ``folder``."""
    import gzip
    import shutil

    extract = folder / "diabetes_130_us"
    extract.mkdir()
    shutil.copy(SAMPLE / "diabetes_130_us" / "IDs_mapping.csv", extract)
    with gzip.open(SAMPLE / "diabetes_130_us" / "diabetic_data_dev.csv.gz", "rt") as src:
        lines = [next(src) for _ in range(rows + 1)]
    with gzip.open(extract / "diabetic_data_dev.csv.gz", "wt") as out:
        out.writelines(lines)
    return extract


def opened(lake, table: str):
    """``table`` with its sealed columns opened, for tests that check what was stored round-trips.

    Internal API on purpose: users reveal one patient at a time through ``lake.reveal`` (audited).
    """
    from ehrlake.security.protection import Sealing

    df = lake.read(table)
    sealing = Sealing.of(df.schema)
    return lake.security.protector.revealing().open(df, table, sealing) if sealing else df


@pytest.fixture
def isolated_lake(spark, tmp_path):
    """A lake with its own master key and key store, for tests that rotate or destroy keys."""
    from ehrlake.config import SecurityConfig
    from ehrlake.lake import Lake
    from ehrlake.security import Security, init_keys

    secrets = tmp_path / "own-secrets"
    security = SecurityConfig(
        master_key_file=str(secrets / "master.key"),
        key_store=str(secrets / "keystore"),
        reveal_key_file=str(secrets / "reveal.key"),
        access_policy=str(REPO / "conf" / "access_policy.yaml"),
    )
    init_keys(security)
    root = str(tmp_path / "lake")
    return Lake(root, spark, security=Security.from_config(security, root))


def production(lake, model) -> None:
    """The governed way to production: a reviewer approves ``model``, an engineer promotes it."""
    from ehrlake.models import governance

    governance.decide(lake, model.model_id, model.version, "reviewer", "approved for the tests")
    governance.promote(lake, model.model_id, model.version, role="engineer")
