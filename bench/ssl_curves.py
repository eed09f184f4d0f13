"""Benchmark: label efficiency of self-supervised pretraining (issue 19; docs/self_supervised.md).

On a built lake (``make demo``'s ``./lake``, or any lake with the task's data and pretrained
encoder), for one task, each model trained on a share of the training labels (the same patients
or images for all at a given seed, nested across shares), for several seeds, all scored on one
fixed test split:

- a patient task (``gold.sequences``, ``gold.labels``, the task's feature table): the sequence
  transformer fine-tuned from ``sequences.encoder``, the same model from random weights, and
  XGBoost on the point-in-time features. The test split is the tabular models' (patient split,
  seed 42) and holds real patients only: generated copies never reach it (``silver.patient_origin``);
- an image task (``silver.imaging``): the CNN fine-tuned from the contrastive trunk
  (``images.encoder``) and the same CNN from random weights, on the data set's own test split.

Each run reports AUROC with its 95% bootstrap interval (patients resampled where they have several
rows, as readmission's stays do); each share the mean over seeds. The lake is
copied to a scratch folder first, so the runs' registrations stay out of its registry (``ehrlake
train --label-fraction F --label-seed S`` records one point in the lake itself). XGBoost here is
single-process on the training rows in pandas: a benchmark for lakes of sample size, not a
production trainer (``ehrlake train`` is). Run in the deep-learning runtime:

    .venv-dl/bin/python bench/ssl_curves.py --lake lake --task readmission_30d \
        [--fractions 0.05,0.25,1] [--seeds 42,43,44] [--epochs 5]
    .venv-dl/bin/python bench/ssl_curves.py --lake lake --task breastmnist_normal --epochs 15

Results: ``bench/results/ssl_curves-<task>-<lake folder>-<date>.json`` and ``.md``. (Not ``bench/ssl.py``: a
script's folder leads ``sys.path``, and that name would shadow the standard library's ``ssl``.)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result  # noqa: E402

import ehrlake.lake  # noqa: E402
from ehrlake import config  # noqa: E402
from ehrlake import features as feats  # noqa: E402
from ehrlake.dl import contrastive, finetune, pretrain, runtime  # noqa: E402
from ehrlake.dl.train import train_image_model  # noqa: E402
from ehrlake.errors import EhrlakeError  # noqa: E402
from ehrlake.features import sequences as seqs  # noqa: E402
from ehrlake.models import evaluate, registry  # noqa: E402
from ehrlake.models.train import DEFAULT_SEED, require_both_classes, split  # noqa: E402
from ehrlake.session import get_spark  # noqa: E402

XGBOOST = {"max_depth": 4, "n_estimators": 200, "learning_rate": 0.05, "subsample": 0.8,
           "colsample_bytree": 0.8, "min_child_weight": 2, "tree_method": "hist"}  # fmt: skip
LEARNERS = ("pretrained", "scratch", "xgboost")
IMAGE_LEARNERS = ("pretrained", "scratch")  # cnn_pretrained, cnn


def xgboost_run(lake, task_name: str, fraction: float, label_seed: int) -> dict:
    """XGBoost on the features of the same kept training patients, scored on the same test rows."""
    import pandas as pd
    import xgboost as xgb
    from pyspark.sql import functions as F

    t = feats.task(task_name)
    inputs = feats.model_inputs(t)
    train_df, test_df = split(feats.training_frame(lake, t), DEFAULT_SEED)
    columns = [F.col(c).cast("double").alias(c) for c in inputs]
    train = finetune.with_labels_kept(train_df, fraction, label_seed).select(*columns, "label").toPandas()
    require_both_classes(task_name, len(train), int(train["label"].sum()))
    test = test_df.select(*columns, "label", evaluate.CLUSTER).toPandas()
    started = time.perf_counter()
    model = xgb.XGBClassifier(**XGBOOST, random_state=label_seed, n_jobs=2)
    model.fit(train[inputs], train["label"])
    scored = pd.DataFrame(
        {
            "score": model.predict_proba(test[inputs])[:, 1],
            "label": test["label"],
            evaluate.CLUSTER: test[evaluate.CLUSTER],
        }
    )
    metrics = evaluate.metrics(lake.spark.createDataFrame(scored))  # patients resampled, as fine-tuning's
    return _row("xgboost", fraction, label_seed, metrics, len(train), time.perf_counter() - started)


def sequence_run(lake, task_name, encoder, fraction, label_seed, epochs) -> dict:
    started = time.perf_counter()
    mv = finetune.train_sequence_model(
        lake, task_name, encoder, fraction, epochs=epochs, workers=1, launcher="local", label_seed=label_seed
    )
    seconds = time.perf_counter() - started
    learner = "pretrained" if encoder else "scratch"
    return _row(learner, fraction, label_seed, mv.metrics, mv.params["train_rows"], seconds)


def image_run(lake, task_name, encoder, fraction, seed, epochs) -> dict:
    started = time.perf_counter()
    mv = train_image_model(
        lake, task_name, epochs=epochs, workers=1, launcher="local", seed=seed, pretrained=encoder,
        label_fraction=fraction,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    learner = "pretrained" if encoder else "scratch"
    return _row(learner, fraction, seed, mv.metrics, mv.params["train_images"], seconds)


def one_run(lake, task_name, learner, encoder, fraction, seed, epochs) -> dict:
    if _is_image(task_name):
        return image_run(
            lake, task_name, encoder if learner == "pretrained" else None, fraction, seed, epochs
        )
    if learner == "xgboost":
        return xgboost_run(lake, task_name, fraction, seed)
    return sequence_run(lake, task_name, encoder if learner == "pretrained" else None, fraction, seed, epochs)


def _row(learner, fraction, seed, metrics, train_rows, seconds) -> dict:
    auroc = metrics.get("auroc", {})
    return {
        "learner": learner,
        "label_fraction": fraction,
        "seed": seed,
        "train_rows": int(train_rows),
        "auroc": auroc.get("value"),
        "ci_low": auroc.get("ci_low"),
        "ci_high": auroc.get("ci_high"),
        "test_rows": auroc.get("n"),
        "test_positives": auroc.get("positives"),
        "seconds": round(seconds, 1),
    }


def _is_image(task_name: str) -> bool:
    return task_name in runtime.load().image_tasks


def summary(runs: list[dict], fractions: list[float], learners) -> list[dict]:
    out = []
    for fraction in fractions:
        row = {"label_fraction": fraction}
        for learner in learners:
            values = [
                r["auroc"]
                for r in runs
                if r["learner"] == learner and r["label_fraction"] == fraction and r["auroc"] is not None
            ]
            row[learner] = round(statistics.mean(values), 3) if values else None
        out.append(row)
    return out


def markdown(result: dict) -> str:
    learners = result["learners"]
    lines = [
        f"# Label efficiency: {result['task']} (bench/ssl_curves.py, {result['date']})",
        "",
        f"Test split: {result['test_rows']} rows, {result['test_positives']} positives (real patients "
        f"or the image set's own test split); {len(result['seeds'])} seed(s); {result['epochs']} "
        f"fine-tuning epochs; pretrained from {result['encoder']}. Mean AUROC:",
        "",
        "| labels kept | " + " | ".join(learners) + " |",
        "|---|" + "---|" * len(learners),
    ]
    for row in result["summary"]:
        cells = ["-" if row[k] is None else f"{row[k]:.3f}" for k in learners]
        lines.append(f"| {row['label_fraction']:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Every run, AUROC [95% bootstrap interval]:", "", "| learner | labels | seed | "
              "train rows | AUROC |", "|---|---|---|---|---|"]  # fmt: skip
    for r in result["runs"]:
        if "skipped" in r:
            lines.append(f"| {r['learner']} | {r['label_fraction']:.0%} | {r['seed']} | | {r['skipped']} |")
            continue
        auroc = "-" if r["auroc"] is None else f"{r['auroc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(
            f"| {r['learner']} | {r['label_fraction']:.0%} | {r['seed']} | {r['train_rows']:,} | {auroc} |"
        )
    return "\n".join(lines) + "\n"


def _encoder(lake, task_name: str, epochs: int) -> registry.ModelVersion:
    """The lake's pretrained encoder if it fits the current vocabulary (an image task: the lake's
    contrastive trunk); else one pretrained now."""
    if _is_image(task_name):
        try:
            return registry.get(lake, contrastive.MODEL_ID)
        except EhrlakeError:
            return contrastive.pretrain_images(lake, epochs=epochs)
    try:
        encoder = registry.get(lake, pretrain.MODEL_ID)
    except EhrlakeError:
        encoder = None
    if encoder is None or encoder.params.get("vocabulary_fingerprint") != seqs.vocabulary_fingerprint(lake):
        encoder = pretrain.pretrain(lake, epochs=epochs)
    return encoder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", type=Path, default=REPO / "lake")
    parser.add_argument("--task", default="readmission_30d")
    parser.add_argument("--fractions", default="0.01,0.05,0.1,0.25,1")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="when the lake has no encoder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = config.load()
    spark = get_spark(cfg)
    with tempfile.TemporaryDirectory(prefix="ehrlake-ssl-") as scratch:
        root = Path(scratch) / "lake"
        shutil.copytree(args.lake, root)
        lake = ehrlake.lake.open(str(root), spark, cfg)
        encoder = _encoder(lake, args.task, args.pretrain_epochs)
        learners = IMAGE_LEARNERS if _is_image(args.task) else LEARNERS
        runs = []
        for seed in seeds:
            for fraction in fractions:
                for learner in learners:
                    try:
                        runs.append(one_run(lake, args.task, learner, encoder, fraction, seed, args.epochs))
                    except EhrlakeError as e:  # e.g. a share of the labels without a positive
                        runs.append({"learner": learner, "label_fraction": fraction, "seed": seed,
                                     "auroc": None, "skipped": str(e)})  # fmt: skip
                    print(f"{learner} {fraction:.0%} seed {seed}: {runs[-1]['auroc']}", flush=True)
    result = {
        "benchmark": "ssl_curves",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(spark),
        "task": args.task,
        "encoder": encoder.label,
        "epochs": args.epochs,
        "learners": list(learners),
        "seeds": seeds,
        "fractions": fractions,
        "test_rows": next((r["test_rows"] for r in runs if "test_rows" in r), None),
        "test_positives": next((r["test_positives"] for r in runs if "test_positives" in r), None),
        "runs": runs,
        "summary": summary(runs, fractions, learners),
    }
    path = save_result(args.out, f"ssl_curves-{args.task}-{args.lake.resolve().name}", result)
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
