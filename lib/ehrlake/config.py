"""Typed configuration loaded from YAML and validated at start-up.

Precedence: an explicit ``--conf FILE``, else ``$EHRLAKE_CONF``, else ``conf/default.yaml`` in the
current directory, else the built-in defaults below (which mirror ``conf/default.yaml``; a test keeps
them equal). A bad or unknown key stops the job with a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ehrlake.errors import ConfigError

ENGINES = ("auto", "delta-rs", "native")


@dataclass(frozen=True)
class LakeConfig:
    root: str = "./lake"
    engine: str = "auto"

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"lake.engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")


# Spark settings every session gets unless a configuration sets the key itself
BUILT_IN_SPARK_CONF = {
    "spark.sql.session.timeZone": "UTC",
    # without it Parquet timestamps are INT96, which the lake's commits cannot read statistics from
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "2g",
    # FHIR records parse to VARIANT for the views (ehrlake.views); JSON allows a repeated
    # key (the last wins, as in from_json), VARIANT refuses it unless told
    "spark.sql.variant.allowDuplicateKeys": "true",
    # PySpark's DataFrame debugging records the Python call site of every Column and DataFrame call
    # (a stack capture and two JVM calls each, ~70% of the py4j calls that plan a feature build) to
    # show it in a failed query's error; off, a plan is built with a third of the calls
    "spark.python.sql.dataFrameDebugging.enabled": "false",
}


@dataclass(frozen=True)
class SparkConfig:
    """``conf`` is layered over :data:`BUILT_IN_SPARK_CONF`: a site file that sets only the event
    log keeps UTC sessions, microsecond timestamps and the driver memory, and every reader of
    ``conf`` (the session, the JVM's launch arguments) sees the same settings."""

    master: str = "local[*]"
    app_name: str = "ehrlake"
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "conf", {**BUILT_IN_SPARK_CONF, **self.conf})

    def validate(self) -> None:
        for key, value in self.conf.items():
            if not str(key).startswith("spark."):
                raise ConfigError(f"spark.conf key {key!r} must start with 'spark.'")
            if isinstance(value, (dict, list)):
                raise ConfigError(f"spark.conf.{key} must be a scalar, not {type(value).__name__}")


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def source_system_name(name: str | None) -> str:
    """``name`` if it is a safe source-system name (letters, digits, ``_ . -``, at most 64, no
    ``..``): it becomes a partition value, part of keys and of file names, so it is checked once
    here, wherever it comes from (configuration, ``--source-system``, an extract declaration)."""
    if not name or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"source system {name!r} is not a safe name: letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, at most 64, no '..')"
        )
    return name


@dataclass(frozen=True)
class IngestConfig:
    source_system: str = "local"
    lines_per_batch: int = 5000

    def validate(self) -> None:
        source_system_name(self.source_system)
        if self.lines_per_batch < 1:
            raise ConfigError("ingest.lines_per_batch must be a positive integer")


@dataclass(frozen=True)
class SecurityConfig:
    # Both live outside the lake: a copy of the lake directory carries no usable key.
    master_key_file: str = "./secrets/master.key"
    key_store: str = "./secrets/keystore"
    # the private half of the reveal key (security/reveal_key.py): only `ehrlake reveal` reads it, so
    # in production it lives where the key administrator runs reveals, not on the ingest machines
    reveal_key_file: str = "./secrets/reveal.key"
    access_policy: str = "conf/access_policy.yaml"
    role: str = "engineer"  # the role jobs act as unless --role (or $EHRLAKE_ROLE) says otherwise
    audit_checkpoint_every: int = 1000
    # signed role grants (security/grants.py): public key and one file per user, enforced once
    # `ehrlake grants init` made the public key ("" = never); the administrator's private key
    grants: str = "./secrets/grants"
    grant_admin_key: str = "./secrets/grant-admin.key"
    reveals_per_hour: int = 20  # per OS user; a bulk reveal beyond it is refused (0: no limit)
    # the smallest person count any published table shows (EDA aggregates, model error cells); smaller
    # counts are hidden with complementary cells (eda/suppression.py). 11: the CMS cell-size rule
    small_cell_k: int = 11

    def validate(self) -> None:
        if not self.master_key_file or not self.key_store:
            raise ConfigError("security.master_key_file and security.key_store must be set")
        if self.audit_checkpoint_every < 1:
            raise ConfigError("security.audit_checkpoint_every must be a positive integer")
        if self.small_cell_k < 2:
            raise ConfigError("security.small_cell_k must be at least 2")
        if self.reveals_per_hour < 0:
            raise ConfigError("security.reveals_per_hour must be 0 (no limit) or a positive integer")


@dataclass(frozen=True)
class Config:
    lake: LakeConfig = field(default_factory=LakeConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def with_lake_root(self, root: str | os.PathLike | None) -> Config:
        """The same configuration with the lake root replaced (the ``--lake`` argument)."""
        if root is None:
            return self
        return dataclasses.replace(self, lake=dataclasses.replace(self.lake, root=str(root)))


def build(cls: type, data: Any, where: str):
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types; every YAML of
    the project that maps onto a dataclass is read through here (``where`` names it in errors).
    A field's type is its default's: a nested dataclass, a mapping, a tuple (from a YAML list; of
    dataclasses where annotated ``tuple[X, ...]``), a mapping (of dataclasses where annotated
    ``dict[str, X]``, of ints where ``dict[str, int]``), a float (an integer is accepted), an int, a
    bool or a str; a field whose default is None, or whose annotation allows None, accepts null
    (or a mapping, where the annotation names a dataclass; or a value of the one scalar type it
    names, ``int | None``). A field read from a key that is not a
    Python name (``from``) says so in its metadata: ``field(default="", metadata={"key": "from"})``;
    one that is never read from a file has ``metadata={"key": None}``."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, not {type(data).__name__}")
    keys = {f: f.metadata.get("key", f.name) for f in dataclasses.fields(cls)}
    known = {key: f for f, key in keys.items() if key is not None}  # key None: never from a file
    hints = typing.get_type_hints(cls)
    defaults = cls()
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown key {where}.{key} (known: {', '.join(known)})")
        name = known[key].name
        kwargs[name] = _value(getattr(defaults, name), value, f"{where}.{key}", hints[name])
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _value(default: Any, value: Any, where: str, hint: Any):
    args = typing.get_args(hint)
    nested = [t for t in args if dataclasses.is_dataclass(t)]
    if value is None and (type(None) in args or default is None):
        return None
    if default is None and nested:
        default = nested[0]()  # an optional section (``to: Reference | None``) given a value
    scalar = [t for t in args if t in (str, int, float, bool)]
    if default is None and len(scalar) == 1:
        default = scalar[0]()  # ``stale_days: int | None = None`` given a value: checked as an int
    if dataclasses.is_dataclass(default):
        return build(type(default), value, where)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, not {type(value).__name__}")
        if nested:  # dict[str, DeclaredTable]
            return {str(k): build(nested[0], v or {}, f"{where}.{k}") for k, v in value.items()}
        if len(args) == 2 and args[1] is Any:  # dict[str, Any]: checked by its user (overrides)
            return {str(k): v for k, v in value.items()}
        if len(args) == 2 and typing.get_origin(args[1]) is tuple:  # dict[str, tuple[str, ...]]
            return {str(k): _value((), v, f"{where}.{k}", args[1]) for k, v in value.items()}
        if len(args) == 2 and args[1] is int:  # dict[str, int]
            return {str(k): _value(0, v, f"{where}.{k}", int) for k, v in value.items()}
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, not {type(value).__name__} ({value!r})")
        if nested:  # tuple[Join, ...]
            return tuple(build(nested[0], item, f"{where}[{i}]") for i, item in enumerate(value))
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    # a bool is an int to Python, never to a configuration (``epochs: true`` is a mistake)
    if default is None or (isinstance(value, type(default)) and not isinstance(value, bool)):
        return value
    if isinstance(default, bool) and isinstance(value, bool):
        return value
    raise ConfigError(f"{where} must be {type(default).__name__}, not {type(value).__name__} ({value!r})")


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file, or one line saying why there is none: every YAML of the
    project is read here (the file missing, not YAML, or not a mapping is a :class:`ConfigError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping, not {type(data).__name__}")
    return data


def load(path: str | os.PathLike | None = None) -> Config:
    """Load and validate configuration (see module docstring for where it is looked for)."""
    if path is None:
        path = os.environ.get("EHRLAKE_CONF")
    if path is None and Path("conf/default.yaml").is_file():
        path = "conf/default.yaml"
    if path is None:
        return Config()
    config = build(Config, read_yaml(path), "config")
    for section in (config.lake, config.spark, config.ingest, config.security):
        section.validate()
    return config
