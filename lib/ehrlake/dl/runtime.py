"""TensorFlow and friends, imported one way everywhere.

Horovod's Keras optimizer wrapper and TF's MultiWorkerMirroredStrategy both fail under Keras 3
(docs/deep_learning.md), so every process of a job selects the legacy ``tf-keras`` before
TensorFlow is first imported (``ehrlake/dl/__init__.py``). Keras 3 still works for single-process
jobs where tf-keras is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from ehrlake.errors import ConfigError, EhrlakeError
from ehrlake.home import CONF

LAUNCHERS = ("horovod", "barrier", "local")


@cache
def tensorflow():
    # TF_USE_LEGACY_KERAS is set by ehrlake/dl/__init__.py, which runs before this module
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise EhrlakeError(
            "TensorFlow is not installed in this environment: build the deep-learning runtime with "
            "`make dl-env` and run the job with .venv-dl/bin/ehrlake (or pip install -e '.[dl]')"
        ) from exc
    return tf


def keras():
    return tensorflow().keras


def has_horovod() -> bool:
    try:
        import horovod.tensorflow.keras  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Config:
    backend: str
    launcher: str
    workers: int
    images_per_file: int
    image_tasks: dict
    cnn: dict
    ann: dict


def load(path: str | Path | None = None) -> Config:
    path = Path(path) if path else CONF / "deep_learning.yaml"
    data = yaml.safe_load(path.read_text())
    rt = data.get("runtime", {})
    launcher = rt.get("launcher", "horovod")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"{path}: runtime.launcher {launcher!r} must be one of {', '.join(LAUNCHERS)}")
    return Config(
        backend=rt.get("backend", "auto"),
        launcher=launcher,
        workers=int(rt.get("workers", 2)),
        images_per_file=int(rt.get("images_per_file", 256)),
        image_tasks=dict(data.get("image_tasks", {})),
        cnn=dict(data.get("cnn", {})),
        ann=dict(data.get("ann", {})),
    )
