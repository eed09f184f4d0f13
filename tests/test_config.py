"""Configuration: the shipped YAML equals the built-in defaults, and bad keys fail naming the key;
the session's helper for working on tables side by side."""

from __future__ import annotations

import pytest
from conftest import REPO

from ehrlake import config, session
from ehrlake.errors import ConfigError


def test_default_yaml_mirrors_built_in_defaults():
    assert config.load(REPO / "conf" / "default.yaml") == config.Config()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lake:\n  rooot: x\n", "unknown key config.lake.rooot"),
        ("lake:\n  engine: parquet\n", "lake.engine must be one of auto, delta-rs, native"),
        ("ingest:\n  lines_per_batch: many\n", "config.ingest.lines_per_batch must be int"),
        ("ingest:\n  lines_per_batch: true\n", "config.ingest.lines_per_batch must be int, not bool"),
        ("spark:\n  conf:\n    sql.shuffle: 3\n", "must start with 'spark.'"),
        ("lake: [1, 2]\n", "config.lake must be a mapping"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config.load(path)


def test_a_file_that_sets_some_spark_settings_keeps_the_built_in_ones(tmp_path):
    """A site configuration that only turns on the event log still writes microsecond timestamps in
    UTC: without them Parquet timestamps are INT96 and every commit of the lake fails. The JVM's
    launch arguments read the same settings: the built-in driver memory stays unless the file sets it."""
    path = tmp_path / "site.yaml"
    path.write_text(
        "spark:\n  conf:\n    spark.eventLog.enabled: 'true'\n    spark.sql.shuffle.partitions: '64'\n"
    )
    settings = config.load(path).spark.conf
    assert settings["spark.eventLog.enabled"] == "true" and settings["spark.sql.shuffle.partitions"] == "64"
    assert settings["spark.sql.parquet.outputTimestampType"] == "TIMESTAMP_MICROS"
    assert settings["spark.sql.session.timeZone"] == "UTC"
    assert settings["spark.driver.memory"] == "2g"
    path.write_text("spark:\n  conf:\n    spark.driver.memory: 6g\n")
    assert config.load(path).spark.conf["spark.driver.memory"] == "6g"


def test_missing_file_and_lake_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.yaml")
    assert config.Config().with_lake_root("/data/lake").lake.root == "/data/lake"


def test_deep_learning_settings_are_typed_and_every_mistake_named(tmp_path):
    """conf/deep_learning.yaml goes through the same typed builder as the main configuration: CNN
    and ANN settings are dataclasses, a task's overrides are checked when the file is loaded."""
    import re

    from ehrlake.dl import runtime

    cfg = runtime.load()
    assert cfg.cnn.filters == (32, 64, 128) and cfg.ann.hidden == (64, 32) and cfg.workers == 2
    pneumonia = cfg.cnn_for("pneumoniamnist_pneumonia")
    assert (pneumonia.validation, pneumonia.epochs, pneumonia.dropout) == (None, 20, cfg.cnn.dropout)
    for text, says in [
        ("cnn: {epoch: 3}", "unknown key deep_learning.cnn.epoch"),
        ("ann: {dropout: high}", "deep_learning.ann.dropout must be float, not str"),
        ("image_tasks: {x: {source_system: s, cnn: {filterz: [8]}}}", "key image_tasks.x.cnn.filterz"),
        ("runtime: {launcher: mpi}", "runtime.launcher 'mpi' must be one of"),
        ("image_tasks: {x: {description: no source}}", "an image task needs its source_system"),
    ]:
        path = tmp_path / "dl.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(says)):
            runtime.load(path)


def test_an_optional_scalar_is_checked_as_its_type():
    """A field that may be null (``int | None = None``) still refuses a value of another type."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Spec:
        days: int | None = None
        name: str | None = None

    assert config.build(Spec, {"days": 7, "name": None}, "spec") == Spec(7, None)
    for bad, says in (
        ({"days": "abc"}, "spec.days must be int, not str"),
        ({"name": 3}, "spec.name must be str"),
    ):
        with pytest.raises(ConfigError, match=says):
            config.build(Spec, bad, "spec")


def test_tables_side_by_side_keep_their_order_and_raise_the_first_error():
    """Jobs that work on tables side by side (ingest, quality, EDA) zip the results back onto the
    tables: a result out of order would be published under another table's name."""
    import time

    def slow_for_early(n: int) -> int:
        time.sleep(0.05 * (5 - n))  # the first table finishes last
        return n * n

    assert session.side_by_side(slow_for_early, range(6), "t") == [0, 1, 4, 9, 16, 25]

    def fails_on_three(n: int) -> int:
        if n == 3:
            raise ValueError("table 3 is broken")
        return n

    with pytest.raises(ValueError, match="table 3 is broken"):
        session.side_by_side(fails_on_three, range(6), "t")
