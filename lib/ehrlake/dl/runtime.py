"""TensorFlow and friends, imported one way everywhere.

Horovod's Keras optimizer wrapper and TF's MultiWorkerMirroredStrategy both fail under Keras 3
(docs/deep_learning.md), so every process of a job selects the legacy ``tf-keras`` before
TensorFlow is first imported (``ehrlake/dl/__init__.py``). Keras 3 still works for single-process
jobs where tf-keras is missing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ehrlake.config import build, read_yaml
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
class NetSettings:
    """How one network trains (``cnn:`` and ``ann:`` of conf/deep_learning.yaml; an image task's
    ``cnn:`` overrides some of them). ``filters``, ``augment``, ``mirror_at_test`` and
    ``bn_momentum`` are the CNN's; ``hidden`` is the ANN's."""

    epochs: int = 30
    batch_size: int = 32  # per worker
    learning_rate: float = 0.001
    dropout: float = 0.2
    schedule: str = "cosine"  # or "constant"
    early_stopping: bool = True
    patience: int = 12
    filters: tuple = (32, 64, 128)
    augment: bool = True
    mirror_at_test: bool = False  # score an image as the mean of it and its mirror (CNN)
    bn_momentum: float = 0.9
    hidden: tuple = (64, 32)
    validation: str | None = "val"  # split scored every epoch; None: no validation
    test: str = "test"  # split the model is evaluated on

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ConfigError("epochs, batch_size and patience must be positive")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")


@dataclass(frozen=True)
class ImageTask:
    source_system: str = ""
    description: str = ""
    positive: str = ""
    # DICOM modalities the task's images are (US, CR...): a model of the task refuses images whose
    # recorded modality is another (a CT slice for an ultrasound model); none recorded: accepted
    modalities: tuple[str, ...] = ()
    cnn: dict[str, Any] = field(default_factory=dict)  # overrides of the cnn settings (Config.cnn_for)

    def validate(self) -> None:
        if not self.source_system:
            raise ConfigError("an image task needs its source_system")


@dataclass(frozen=True)
class RuntimeSettings:
    backend: str = "auto"  # petastorm | arrow | auto
    launcher: str = "horovod"
    workers: int = 2
    images_per_file: int = 256

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"runtime.launcher {self.launcher!r} must be one of {', '.join(LAUNCHERS)}")
        if self.backend not in ("petastorm", "arrow", "auto"):
            raise ConfigError(f"runtime.backend {self.backend!r} must be petastorm, arrow or auto")
        if self.workers < 1 or self.images_per_file < 1:
            raise ConfigError("runtime.workers and runtime.images_per_file must be positive")


@dataclass(frozen=True)
class EncoderSettings:
    """The sequence encoder and its masked-code pretraining (``encoder:``; dl/pretrain.py)."""

    length: int = 128  # the most recent tokens of a record the encoder reads
    dim: int = 64
    layers: int = 2
    heads: int = 4
    epochs: int = 20
    batch_size: int = 32  # per worker
    learning_rate: float = 0.001
    mask_rate: float = 0.15

    def validate(self) -> None:
        if min(self.length, self.dim, self.layers, self.heads, self.epochs, self.batch_size) < 1:
            raise ConfigError("encoder: length, dim, layers, heads, epochs and batch_size must be positive")
        if self.dim % self.heads:
            raise ConfigError(f"encoder.dim {self.dim} must be a multiple of encoder.heads {self.heads}")
        if not 0 < self.mask_rate < 1:
            raise ConfigError(f"encoder.mask_rate must be in (0, 1), not {self.mask_rate}")


@dataclass(frozen=True)
class ContrastiveSettings:
    """Contrastive pretraining of the CNN trunk on every image (``contrastive:``; dl/contrastive.py)."""

    epochs: int = 20
    batch_size: int = 64  # per worker: each image's negatives are the other views of its batch
    learning_rate: float = 0.001
    temperature: float = 0.5
    projection: int = 64

    def validate(self) -> None:
        if min(self.epochs, self.batch_size, self.projection) < 1 or self.batch_size < 2:
            raise ConfigError("contrastive: epochs, projection >= 1 and batch_size >= 2")
        if not self.temperature > 0:
            raise ConfigError("contrastive.temperature must be positive")


@dataclass(frozen=True)
class ExplainSettings:
    """How a sequence model's decision is explained (``explain:``; dl/decision.py)."""

    steps: int = 32  # integrated gradients' midpoint steps
    events: int = 5  # events shown that raised the risk, and that lowered it
    neighbours: int = 50  # most similar training patients the outcome rate is taken over
    min_similarity: float = 0.9  # cosine similarity of patient embeddings a neighbour needs

    def validate(self) -> None:
        if min(self.steps, self.events, self.neighbours) < 1 or not -1 <= self.min_similarity <= 1:
            raise ConfigError("explain: steps, events, neighbours >= 1 and min_similarity in [-1, 1]")


@dataclass(frozen=True)
class Config:
    """conf/deep_learning.yaml, typed and validated (unknown keys and wrong types stop the job)."""

    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    image_tasks: dict[str, ImageTask] = field(default_factory=dict)
    cnn: NetSettings = field(default_factory=NetSettings)
    ann: NetSettings = field(default_factory=NetSettings)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    explain: ExplainSettings = field(default_factory=ExplainSettings)
    contrastive: ContrastiveSettings = field(default_factory=ContrastiveSettings)

    @property
    def backend(self) -> str:
        return self.runtime.backend

    @property
    def launcher(self) -> str:
        return self.runtime.launcher

    @property
    def workers(self) -> int:
        return self.runtime.workers

    @property
    def images_per_file(self) -> int:
        return self.runtime.images_per_file

    def cnn_for(self, task: str) -> NetSettings:
        """The CNN settings of an image task: the defaults with the task's overrides."""
        overrides = self.image_tasks[task].cnn
        return build(NetSettings, {**dataclasses.asdict(self.cnn), **overrides}, f"image_tasks.{task}.cnn")


def load(path: str | Path | None = None) -> Config:
    path = Path(path) if path else CONF / "deep_learning.yaml"
    try:
        config = build(Config, read_yaml(path), "deep_learning")
        for name in config.image_tasks:
            config.cnn_for(name)  # a task's overrides are checked now, not when it trains
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config
