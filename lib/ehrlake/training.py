"""``ehrlake train``: which trainer a task and its algorithms need, and promotion of the best.

Image tasks (``conf/deep_learning.yaml``) train a CNN; tabular tasks train the requested Spark ML
algorithms (``models.train``) and, with ``ann``, a TensorFlow ANN on the same rows and split
(``dl.train``); with ``sequence`` / ``sequence_scratch``, the sequence transformer on the same
indexes and split, from the pretrained encoder or from random weights (``dl.finetune``). Every
fitted model is registered as a candidate; ``promote`` makes the one with the best held-out AUROC
the task's production model (among those population scoring can run: a sequence model of a
per-stay task cannot be, as population scoring reads patients as of a date). This module sits
above ``models`` and ``dl`` so neither has to know the other's trainers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ehrlake import features as feats
from ehrlake.errors import EhrlakeError
from ehrlake.models import registry
from ehrlake.models.algorithms import SEQUENCE_TRANSFORMER
from ehrlake.models.train import DEFAULT_SEED
from ehrlake.models.train import train as train_spark_ml

# the TensorFlow learners of a tabular task: the ANN on the features; the sequence transformer
# fine-tuned from the pretrained encoder (sequences.encoder) or trained from scratch
DEEP_TABULAR = ("ann", "sequence", "sequence_scratch")


@dataclass(frozen=True)
class DeepLearningOptions:
    """Run options of the TensorFlow trainers (None: the value in ``conf/deep_learning.yaml``)."""

    epochs: int | None = None
    launcher: str | None = None
    backend: str | None = None
    label_fraction: float = 1.0  # sequence and image models: the share of training labels kept
    label_seed: int | None = None  # which patients' labels are kept, and the fit's seed (None: the split's)


@dataclass
class Trained:
    models: list[registry.ModelVersion] = field(default_factory=list)
    promoted: registry.ModelVersion | None = None


def train_task(
    lake,
    task: str,
    algorithms: list[str],
    *,
    grid: str = "small",
    folds: int = 3,
    seed: int = DEFAULT_SEED,
    workers: int = 2,
    role: str | None = None,
    deep: DeepLearningOptions | None = None,
    promote: bool = False,
    with_feedback: bool = False,
    xgboost_driver_rows: int | None = None,
) -> Trained:
    """Train ``task`` with ``algorithms`` (ignored for image tasks: a CNN); see the module docstring."""
    from ehrlake.dl import runtime

    deep = deep or DeepLearningOptions()
    options = {"epochs": deep.epochs, "launcher": deep.launcher, "backend": deep.backend, "seed": seed}
    result = Trained()
    if task in runtime.load().image_tasks:
        from ehrlake.dl.contrastive import MODEL_ID as IMAGE_ENCODER
        from ehrlake.dl.train import train_image_model

        # the image splits are the data set's own: the label seed picks the kept images and seeds the fit
        image = {**options, "label_fraction": deep.label_fraction, "role": role}
        if deep.label_seed is not None:
            image["seed"] = deep.label_seed
        # cnn (the default) from random weights; cnn_pretrained from the contrastive trunk
        if "cnn" in algorithms or "cnn_pretrained" not in algorithms:
            result.models.append(train_image_model(lake, task, **image))
        if "cnn_pretrained" in algorithms:
            trunk = _encoder(lake, IMAGE_ENCODER, "ehrlake pretrain --images", "cnn")
            result.models.append(train_image_model(lake, task, pretrained=trunk, **image))
    else:
        spark_ml = tuple(a for a in algorithms if a not in DEEP_TABULAR)
        if spark_ml:
            result.models += train_spark_ml(
                lake, task, spark_ml, grid=grid, folds=folds, seed=seed, num_workers=workers, role=role,
                with_feedback=with_feedback, xgboost_driver_rows=xgboost_driver_rows,
            )  # fmt: skip
        if "ann" in algorithms:
            from ehrlake.dl.train import train_tabular_ann

            result.models.append(train_tabular_ann(lake, task, role=role, **options))
        for algorithm in ("sequence", "sequence_scratch"):
            if algorithm in algorithms:
                from ehrlake.dl.finetune import train_sequence_model
                from ehrlake.dl.pretrain import MODEL_ID

                encoder = (
                    _encoder(lake, MODEL_ID, "ehrlake pretrain", "sequence_scratch")
                    if algorithm == "sequence"
                    else None
                )
                result.models.append(
                    train_sequence_model(
                        lake,
                        task,
                        encoder,
                        deep.label_fraction,
                        role=role,
                        epochs=deep.epochs,
                        launcher=deep.launcher,
                        seed=seed,
                        label_seed=deep.label_seed,
                    )  # fmt: skip
                )
    # population scoring builds sequences per patient as of a date: not per stay
    per_row = task not in feats.TASKS or feats.task(task).level != "patient"
    scorable = [mv for mv in result.models if not (per_row and mv.algorithm == SEQUENCE_TRANSFORMER)]
    if promote and scorable:  # put forward: a reviewer's approval makes it production (governance)
        best = max(scorable, key=lambda mv: mv.metrics["auroc"]["value"] or 0)
        result.promoted = registry.nominate(lake, best.model_id, best.version)
    return result


def _encoder(lake, model_id: str, command: str, scratch: str) -> registry.ModelVersion:
    try:
        return registry.get(lake, model_id)
    except EhrlakeError:
        raise EhrlakeError(
            f"fine-tuning starts from the pretrained encoder {model_id}, which this lake has not got: "
            f"run {command} first (or train {scratch}, the same model from random weights)"
        ) from None
