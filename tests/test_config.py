"""Configuration: the shipped YAML equals the built-in defaults, and bad keys fail naming the key."""

from __future__ import annotations

import pytest
from conftest import REPO

from ehrlake import config
from ehrlake.errors import ConfigError


def test_default_yaml_mirrors_built_in_defaults():
    assert config.load(REPO / "conf" / "default.yaml") == config.Config()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lake:\n  rooot: x\n", "unknown configuration key config.lake.rooot"),
        ("lake:\n  engine: parquet\n", "lake.engine must be one of auto, delta-rs, native"),
        ("ingest:\n  lines_per_batch: many\n", "config.ingest.lines_per_batch must be int"),
        ("spark:\n  conf:\n    sql.shuffle: 3\n", "must start with 'spark.'"),
        ("lake: [1, 2]\n", "config.lake must be a mapping"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config.load(path)


def test_missing_file_and_lake_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.yaml")
    assert config.Config().with_lake_root("/data/lake").lake.root == "/data/lake"
