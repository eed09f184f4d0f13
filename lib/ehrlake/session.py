"""Building the SparkSession from configuration.

Under ``spark-submit`` the master and resources come from the submit command, so configuration only
fills in what the submitter did not set. Run directly (``ehrlake ...``), the embedded default is
``local[*]``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ehrlake.config import Config
from ehrlake.errors import EnvironmentProblem
from ehrlake.home import HOME

T = TypeVar("T")
R = TypeVar("R")

TABLES_AT_ONCE = 4  # tables a job works on side by side (side_by_side)


def side_by_side(work: Callable[[T], R], tables: Iterable[T], name: str) -> list[R]:
    """``work`` over each table, up to TABLES_AT_ONCE at a time, results in the tables' order.

    A small table's Spark jobs are mostly planning and commits on the driver and a few short tasks,
    which leave the cores idle; another table's jobs fill them. Every table is submitted at once:
    when one fails the others still run to their end, then the error of the first failing table
    (in the tables' order) is raised."""
    with ThreadPoolExecutor(max_workers=TABLES_AT_ONCE, thread_name_prefix=name) as pool:
        return list(pool.map(work, tables))


def require_java() -> None:
    """Fail with one clear sentence when no Java runtime is reachable (Spark needs one)."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.path.exists(os.path.join(java_home, "bin", "java")):
        return
    if shutil.which("java"):
        return
    raise EnvironmentProblem(
        "no Java runtime found: install one (Debian: apt-get install openjdk-17-jre-headless) "
        "or set JAVA_HOME"
    )


def arrow_paths_supported() -> bool:
    """Whether this environment's pyarrow is new enough for PySpark 4.2's Arrow paths (pandas
    UDFs, Arrow ``toPandas``): the main runtime yes, the deep-learning runtime (pyarrow 14) no."""
    import pyarrow

    return int(pyarrow.__version__.split(".")[0]) >= 18


# what the deep-learning runtime (.venv-dl) runs; every other command seals or opens columns with
# Arrow UDFs, which need the main runtime's PyArrow
DEEP_LEARNING_COMMANDS = frozenset(
    {"train", "pretrain", "explain", "evaluate", "score", "score-images", "models", "lake", "federated"}
)


def require_runtime(command: str) -> None:
    """Stop before a JVM starts when ``command`` cannot run in this Python environment."""
    if command not in DEEP_LEARNING_COMMANDS and not arrow_paths_supported():
        raise EnvironmentProblem(wrong_runtime(command))


def wrong_runtime(command: str) -> str:
    import pyarrow

    return (
        f"ehrlake {command} runs in the main runtime: .venv/bin/ehrlake {command} (this is the "
        f"deep-learning runtime, whose PyArrow {pyarrow.__version__} is pinned for Petastorm; Spark's Arrow "
        "paths need 18 or later)"
    )


# Spark writes its whole configuration into event logs, the UI and the history server: key material
# must never be in it. A setting that names the master key is refused; the redaction pattern is
# widened to key-ish names as a second line (Spark's default misses e.g. EHRLAKE_MASTER_KEY).
KEY_SETTING = re.compile(r"(?i)master[._-]?key")
REDACTION = r"(?i)secret|password|token|access[.]?key|master[._-]?key|private[._-]?key"


def refuse_key_material(settings) -> None:
    """Stop when a Spark setting passes the master key (e.g. ``spark.executorEnv.EHRLAKE_MASTER_KEY``)."""
    named = sorted(k for k, _ in settings if KEY_SETTING.search(k) and "secretKeyRef" not in k)
    if named:
        raise EnvironmentProblem(
            f"Spark setting {named[0]} would write the master key into Spark's event log and UI; give "
            "executors the key file (mounted read-only) or a secret reference instead (docs/operations.md)"
        )


# Delta Lake's JARs for the native engine (lake/_native.py), fetched by `make setup`
# (scripts/delta_jars.sh); $EHRLAKE_DELTA_JARS names another folder, or "" for none
DELTA_JARS = HOME / ".jars" / "delta"
DELTA_SETTINGS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
# Delta's session catalog that also resolves `silver.condition` to the lake's table (infra/spark,
# compiled into .jars/delta by `make setup`); the lake's root is this session setting (lake.open)
LAKE_CATALOG = "ehrlake.LakeCatalog"
LAKE_ROOT_SETTING = "spark.ehrlake.lake.root"
POLICY_GUARD = "ehrlake.PolicyGuard"


def delta_jars() -> list[str]:
    """The Delta Lake JARs this process puts on Spark's class path (none: the delta-rs engine)."""
    folder = os.environ.get("EHRLAKE_DELTA_JARS", str(DELTA_JARS))
    return sorted(str(p) for p in Path(folder).glob("*.jar")) if folder else []


def delta_loaded(jvm) -> bool:
    """Whether Delta Lake's classes load in this JVM (through Spark's class loader, which sees
    ``--jars`` and ``--packages``)."""
    return loads(jvm, "io.delta.sql.DeltaSparkSessionExtension")


def delta_settings(jvm) -> dict[str, str]:
    """Delta's extension and catalog; where ehrlake's Spark classes are on the class path too, the
    lake catalog and the access policy's guard (inert until a SQL server arms it: sql/guard.py)."""
    # Delta replays a table's log in 50 partitions by default, tuned for logs of millions of files;
    # the lake's logs are small, and 50 tasks made every native write ~2 s slower on 2 cores
    # (4.6x a 1,000-row overwrite); a cluster with huge tables sets its own
    replay = {"spark.databricks.delta.snapshotPartitions": str(min(8, max(2, os.cpu_count() or 2)))}
    if not loads(jvm, LAKE_CATALOG):
        return {**DELTA_SETTINGS, **replay}
    return {
        "spark.sql.extensions": f"{DELTA_SETTINGS['spark.sql.extensions']},{POLICY_GUARD}",
        "spark.sql.catalog.spark_catalog": LAKE_CATALOG,
        **replay,
    }


def loads(jvm, name: str) -> bool:
    """Whether the class ``name`` loads through Spark's class loader."""
    try:
        jvm.org.apache.spark.util.Utils.classForName(name, True, False)
        return True
    except Exception:  # py4j's error for ClassNotFoundException
        return False


def launch_args(memory: str | None, jars: list[str] | None = None) -> str:
    """``PYSPARK_SUBMIT_ARGS`` for a JVM this process starts: quiet unless the log was asked for
    (``EHRLAKE_SPARK_LOG`` WARN/INFO, which ``ehrlake --verbose`` sets); ``jars`` on its class path."""
    args = ["--driver-memory", memory] if memory else []
    if jars:
        # on the driver's own class path too: threads Spark did not start (the Thrift JDBC server's)
        # load the session catalog and extensions through it
        args += ["--jars", ",".join(jars), "--driver-class-path", os.pathsep.join(jars)]
    if os.environ.get("EHRLAKE_SPARK_LOG", "ERROR").upper() in ("OFF", "FATAL", "ERROR"):
        quiet = HOME / "conf" / "log4j2.properties"
        if quiet.is_file():
            args += ["--driver-java-options", f"-Dlog4j2.configurationFile={quiet.as_uri()}"]
        args += ["--conf", "spark.ui.showConsoleProgress=false"]
    return shlex.join([*args, "pyspark-shell"])


def get_spark(config: Config):
    """Return the active SparkSession or build one from ``config.spark``.

    Settings already present (from ``spark-submit`` or an existing session) win over configuration,
    so the same job runs unchanged on the embedded default and on a cluster.
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    require_java()
    # Executors must run the same Python as the driver (our library is installed there).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # JVM launch options (driver memory, the log configuration, the console progress bar, which the
    # launcher turns on for a shell) are set before the JVM starts, unless spark-submit (which
    # started it already and passes PYSPARK_GATEWAY_PORT) or the caller decided them.
    # Delta's JARs too where `make setup` fetched them, unless the configuration says delta-rs: the
    # native engine (lake.engine: native) commits with them, and `ehrlake sql` reads through them
    jars = delta_jars() if config.lake.engine != "delta-rs" else []
    if "PYSPARK_GATEWAY_PORT" not in os.environ and "PYSPARK_SUBMIT_ARGS" not in os.environ:
        os.environ["PYSPARK_SUBMIT_ARGS"] = launch_args(config.spark.conf.get("spark.driver.memory"), jars)
    # Attach to (or start) the JVM first: only a JVM-backed SparkConf sees what spark-submit set.
    SparkContext._ensure_initialized()
    # Delta's extension and catalog wherever its classes are on the class path: put there above, or
    # by whoever started the JVM (spark-submit --packages, an inherited PYSPARK_SUBMIT_ARGS)
    with_delta = config.lake.engine != "delta-rs" and delta_loaded(SparkContext._jvm)
    submitted = SparkConf()
    builder = SparkSession.builder.appName(config.spark.app_name)
    if not submitted.contains("spark.master"):
        builder = builder.master(config.spark.master)
    conf = dict(config.spark.conf)
    refuse_key_material([*submitted.getAll(), *conf.items()])
    conf.setdefault("spark.redaction.regex", REDACTION)
    if with_delta:
        conf = {**delta_settings(SparkContext._jvm), **conf}
    if not arrow_paths_supported():
        # the deep-learning runtime pins pyarrow 14 for Petastorm (docs/deep_learning.md); Spark's
        # Arrow conversions need >= 18 there, so they are off and Spark uses its row-based paths
        conf["spark.sql.execution.arrow.pyspark.enabled"] = "false"
    for key, value in conf.items():
        if not submitted.contains(key):
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    # the CLI turns it OFF (its errors are one line; --verbose brings the log back)
    spark.sparkContext.setLogLevel(os.environ.get("EHRLAKE_SPARK_LOG", "ERROR"))
    return spark
