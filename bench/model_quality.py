"""Benchmark: readmission model quality on patients the models never saw, per learner and feature set.

On a lake holding the Diabetes 130-US extract (the shared 30% subset: real stays of diabetic
inpatients of 130 US hospitals and their recorded 30-day readmission), the stays are split by
patient exactly as ``ehrlake train`` splits them (``models.train.split``: 20% of patients held
out). For each learner (XGBoost, L1 logistic regression, random forest; each at the first point
of its ``small`` grid, so no choice is made on these numbers) and each feature set:

- **CV**: patient-grouped ``--folds``-fold cross-validation on the training patients, AUROC per
  fold (mean and range);
- **held out**: fitted on every training patient, AUROC on the held-out ones with a
  patient-level bootstrap interval (``evaluate.metrics``), and the Brier score of the risk the
  product reports (``train.score_column``: the class weighting's odds taken back out).

Two stronger learners are measured beside them (issue 21):

- ``xgboost-es``, tuned XGBoost: learning rate 0.03 and up to 2,000 rounds, stopped when the
  AUROC of a validation fold of the training patients has not risen for 50 rounds; the depth
  (3, 4 or 6) and round count with the best validation AUROC are refitted on every training row.
  Inside CV the validation fold is another fold of the fitting folds, so the held-out fold
  chooses nothing.
- ``stack``: a logistic regression over the log-odds of the other learners' scores, fitted on
  their out-of-fold CV scores (so it learns how far to trust each one on patients it did not
  fit) and applied to their held-out scores. Unweighted, so its output is a calibrated risk. Its
  CV figure is that regression's own 5-fold CV over the out-of-fold scores.

``ann`` is the deep-learning runtime's tabular network (``nets.ann`` at ``conf/deep_learning.yaml``'s
``ann:`` settings), inputs standardised on the fitting rows as ``dl.tensors`` does, early-stopped
on the validation fold's AUROC. It is fitted in this process on the collected rows (the
extract's 24,000 training stays: bounded), not through Petastorm and Horovod as ``ehrlake train
--algorithm ann`` is, so that it runs inside the same folds as the other learners. It needs
TensorFlow (``.venv-dl``), whose PyArrow is too old for ``xgboost.spark``: so it runs first, alone,
keeping its scores under ``--scores``, and the run of the other learners with the same ``--scores``
puts its row in the table and its scores in the stack.

``--task`` names a task of silver's point-in-time features instead (``readmission_30d``,
``mortality_12m``, ...: ``gold.features_*`` joined to ``gold.labels`` as ``ehrlake train`` reads
them), with two feature sets: ``structured`` (what ``conf/features.yaml`` gives without notes) and
``structured+notes`` (the same and ``notes_<group>``: issue 23's note-concept counts). Where the
feature table lacks the note columns, the features are rebuilt in the lake with ``note_features``
on first (said on the output; the other columns do not change). Each learner's held-out AUROC
with notes is compared with its AUROC without them on the same patients, by a paired bootstrap
interval of the difference (``evaluate.paired_difference``).

Results: ``bench/results/model_quality-<lake folder>[-<task>]-<date>.json``.

    .venv/bin/ehrlake ingest --source csv-extract --extract diabetes130 \\
        --input data/sample/diabetes_130_us --lake d130
    .venv-dl/bin/python bench/model_quality.py --lake d130 --algorithms ann --scores /tmp/mq
    .venv/bin/python bench/model_quality.py --lake d130 --scores /tmp/mq
    .venv/bin/ehrlake pipeline conf/pipelines/hiv_readmission.yaml --lake hiv-lake
    .venv/bin/python bench/model_quality.py --lake hiv-lake --task readmission_30d
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from _lake import machine, save_result  # noqa: E402
from pyspark.ml.classification import LogisticRegression  # noqa: E402
from pyspark.ml.evaluation import BinaryClassificationEvaluator  # noqa: E402
from pyspark.ml.feature import VectorAssembler  # noqa: E402
from pyspark.ml.functions import vector_to_array  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

import ehrlake.lake  # noqa: E402
from ehrlake import features as feats  # noqa: E402
from ehrlake.errors import EhrlakeError  # noqa: E402
from ehrlake.features import DIABETES130_BRONZE, definitions, pointintime  # noqa: E402
from ehrlake.features import diabetes130 as d130  # noqa: E402
from ehrlake.models import algorithms, evaluate, target_encoding  # noqa: E402
from ehrlake.models.train import score_column, split, with_weights  # noqa: E402

FEATURE_SETS = {
    "stay": [f for f in d130.FEATURES if f not in d130.HISTORY],
    "stay+history": list(d130.FEATURES),
    "stay+history+codes": list(d130.FEATURES),
}
# the extract's many-valued codes (kept by d130.build), target-encoded inside the folds
ENCODED = {"stay+history+codes": list(d130.CODES)}
D130_TASK = "diabetes130_readmission_30d"
STRUCTURED, WITH_NOTES = "structured", "structured+notes"


TUNED = "xgboost-es"
STACK = "stack"
ANN = "ann"
LEARNERS = (*algorithms.ALGORITHMS, TUNED, ANN)
ES_DEPTHS = (3, 4, 6)
ES_ROUNDS, ES_PATIENCE = 2000, 50


def fit(learner: str, features: list[str], rows, seed: int, validation_fold: int = 0):
    """The learner at the first point of its small grid (``xgboost-es``: tuned on
    ``validation_fold`` of ``rows``), classes weighted as ``train`` weights them."""
    positives, n = rows.agg(F.sum("label"), F.count("*")).first()
    weighted = with_weights(rows, (n - positives) / positives)
    if learner == TUNED:
        return early_stopped(features, weighted, seed, validation_fold)
    if learner == ANN:
        return Ann(features, rows, seed, validation_fold)
    pipe, grid = algorithms.pipeline(learner, features, seed, grid="small")
    return pipe.fit(weighted, params=grid[0])


def early_stopped(features: list[str], rows, seed: int, validation_fold: int):
    """XGBoost whose depth and round count were chosen on one fold of ``rows``, refitted on all."""
    pipe, _ = algorithms.pipeline("xgboost", features, seed, grid="small")
    xgb = pipe.getStages()[-1]
    marked = rows.withColumn("_validation", F.col("cv_fold") == validation_fold)
    tried = []
    for depth in ES_DEPTHS:
        stopped = pipe.fit(
            marked,
            params={xgb.max_depth: depth, xgb.learning_rate: 0.03, xgb.n_estimators: ES_ROUNDS,
                    xgb.early_stopping_rounds: ES_PATIENCE, xgb.eval_metric: "auc",
                    xgb.validationIndicatorCol: "_validation"},
        )  # fmt: skip
        booster = stopped.stages[-1].get_booster()
        tried.append((booster.best_score, depth, booster.best_iteration + 1))
    _, depth, rounds = max(tried)
    model = pipe.fit(rows, params={xgb.max_depth: depth, xgb.learning_rate: 0.03, xgb.n_estimators: rounds})
    model.chosen = {"max_depth": depth, "rounds": rounds}
    return model


class Ann:
    """The DL runtime's tabular network, fitted on the collected ``rows`` (see the module note)."""

    def __init__(self, features: list[str], rows, seed: int, validation_fold: int):
        from ehrlake.dl import nets, runtime

        k = runtime.keras()
        k.utils.set_random_seed(seed)
        h = runtime.load().ann
        frame = rows.select("cv_fold", "label", *features).toPandas()
        values = frame[features].astype("float64")
        self.features, self.mean, self.sd = (
            features,
            values.mean(),
            values.std().replace(0.0, 1.0).fillna(1.0),
        )
        x, y = self._inputs(frame), frame["label"].to_numpy("float32")
        val = (frame["cv_fold"] == validation_fold).to_numpy()
        self.model = nets.ann(len(features), tuple(h.hidden), h.dropout)
        self.model.compile(
            optimizer=k.optimizers.Adam(h.learning_rate),
            loss="binary_crossentropy",
            metrics=[k.metrics.AUC(name="auc")],
        )
        stop = k.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=h.patience, restore_best_weights=True
        )
        history = self.model.fit(
            x[~val], y[~val], batch_size=h.batch_size, epochs=h.epochs, validation_data=(x[val], y[val]),
            callbacks=[stop], verbose=0,
        )  # fmt: skip
        self.chosen = {"epochs": len(history.history["loss"])}

    def _inputs(self, frame):
        z = (frame[self.features].astype("float64") - self.mean) / self.sd
        return z.fillna(0.0).to_numpy("float32")

    def scored(self, rows, learner: str):
        keys = ["patient_key", "index_id", "label", "cv_fold"]
        frame = rows.select(*keys, *self.features).toPandas()
        frame[learner] = self.model.predict(self._inputs(frame), batch_size=4096, verbose=0)[:, 0].astype(
            "float64"
        )
        return rows.sparkSession.createDataFrame(frame[[*keys, learner]])


def scored(model, rows, learner: str):
    """``rows`` with the learner's score (its weighted probability) under its own name."""
    if isinstance(model, Ann):
        return model.scored(rows, learner)
    return model.transform(rows).select(
        "patient_key", "index_id", "label", "cv_fold", vector_to_array("probability")[1].alias(learner)
    )


def encoded(fitting, evaluated, codes: list[str]):
    """(fitting, evaluated) with ``codes`` target-encoded: the fitting rows out of fold, the
    evaluated ones from every fitting row; as they are without codes."""
    if not codes:
        return fitting, evaluated
    return target_encoding.out_of_fold(fitting, codes).cache(), target_encoding.encode(
        fitting, evaluated, codes
    )


def one(learner: str, features: list[str], train, test, folds: int, seed: int, rate: float, codes=()):
    """(table row, out-of-fold scores of the training rows, held-out scores) of one learner;
    ``codes``: columns target-encoded inside each fit's rows and added to ``features``."""
    auroc = BinaryClassificationEvaluator(rawPredictionCol=learner, labelCol="label")
    features = [*features, *map(target_encoding.name, codes)]
    per_fold, out_of_fold, chosen = [], [], []
    started = time.perf_counter()
    for fold in range(folds):
        fitting, evaluated = encoded(
            train.where(F.col("cv_fold") != fold), train.where(F.col("cv_fold") == fold), list(codes)
        )
        model = fit(learner, features, fitting, seed, validation_fold=(fold + 1) % folds)
        chosen.append(getattr(model, "chosen", None))
        held = scored(model, evaluated, learner).cache()
        per_fold.append(auroc.evaluate(held))
        out_of_fold.append(held)
    fitting, evaluated = encoded(train, test.withColumn("cv_fold", F.lit(-1)), list(codes))
    model = fit(learner, features, fitting, seed)
    pos_weight = 1.0 if learner == ANN else (1 - rate) / rate  # the ANN is fitted unweighted
    held_out = scored(model, evaluated, learner).cache()
    risk = held_out.withColumn("score", score_column(pos_weight, F.col(learner)))
    row = _row(per_fold, evaluate.metrics(risk, rate), started)
    if chosen[0]:
        row["chosen"] = {"cv_folds": chosen, "held_out": model.chosen}
    oof = out_of_fold[0]
    for part in out_of_fold[1:]:
        oof = oof.unionByName(part)
    return row, oof.cache(), held_out


def stack(scores: dict[str, tuple], folds: int, rate: float, started: float) -> dict:
    """The stack's table row: a logistic regression over the log-odds of each learner's (out-of-fold,
    held-out) scores (see above)."""
    learners = sorted(scores)
    oof, held_out = scores[learners[0]]
    for learner in learners[1:]:
        oof = oof.join(scores[learner][0].select("index_id", learner), "index_id")
        held_out = held_out.join(scores[learner][1].select("index_id", learner), "index_id")
    clipped = lambda c: F.least(F.greatest(F.col(c), F.lit(1e-6)), F.lit(1 - 1e-6))  # noqa: E731
    odds = [F.log(clipped(c) / (1 - clipped(c))).alias(f"_lo_{c}") for c in learners]
    assemble = VectorAssembler(inputCols=[f"_lo_{c}" for c in learners], outputCol="features")
    meta = LogisticRegression(featuresCol="features", labelCol="label", regParam=0.0)
    frame = lambda df: assemble.transform(df.select("patient_key", "label", "cv_fold", *odds))  # noqa: E731
    train, test = frame(oof).cache(), frame(held_out)
    auroc = BinaryClassificationEvaluator(rawPredictionCol="score", labelCol="label")
    to_score = lambda m, df: m.transform(df).withColumn("score", vector_to_array("probability")[1])  # noqa: E731
    per_fold = [
        auroc.evaluate(
            to_score(meta.fit(train.where(F.col("cv_fold") != k)), train.where(F.col("cv_fold") == k))
        )
        for k in range(folds)
    ]
    model = meta.fit(train)
    row = _row(per_fold, evaluate.metrics(to_score(model, test), rate), started)
    row["weights"] = dict(
        zip(learners, [round(w, 3) for w in model.coefficients.toArray().tolist()], strict=True)
    )
    return row


def _row(per_fold: list[float], held: dict, started: float) -> dict:
    auroc, brier = held["auroc"], held["brier"]
    return {
        "cv_auroc_mean": round(statistics.mean(per_fold), 4),
        "cv_auroc_range": [round(min(per_fold), 4), round(max(per_fold), 4)],
        "test_auroc": round(auroc["value"], 4),
        "test_auroc_ci": [round(auroc["ci_low"], 4), round(auroc["ci_high"], 4)],
        "test_brier": round(brier["value"], 4),
        "test_rows": auroc["n"],
        "test_positives": auroc["positives"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def task_rows(lake, task_name: str, names: list[str]):
    """(labelled rows, feature sets) of a task of silver's point-in-time features; the features
    rebuilt with ``note_features`` on where ``names`` asks for the notes and the table lacks them."""
    t = feats.task(task_name)
    defs = definitions.load()
    sets = {
        STRUCTURED: pointintime.feature_columns(dataclasses.replace(defs, note_features=False), t.level),
        WITH_NOTES: pointintime.feature_columns(dataclasses.replace(defs, note_features=True), t.level),
    }
    have = set(lake.read(t.feature_table).columns) if lake.exists(t.feature_table) else set()
    if WITH_NOTES in names and not set(sets[WITH_NOTES]) <= have:
        if not lake.exists("silver.note_concept"):
            raise EhrlakeError("no silver.note_concept: clean a lake whose export holds notes first")
        print(f"rebuilding the features with note_features on (the lake's {t.feature_table} lacks them)")
        feats.run(lake, defs=dataclasses.replace(defs, note_features=True))
    return feats.training_frame(lake, t), sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lake", required=True, help="a lake with the task's rows (see above)")
    parser.add_argument(
        "--task", default=D130_TASK, help=f"{D130_TASK} (bronze's extract, default) or a silver task"
    )
    parser.add_argument(
        "--algorithms",
        default=",".join(learner for learner in LEARNERS if learner != ANN),
        help=f"of {', '.join(LEARNERS)}; with two or more (here or under --scores), a stack too",
    )
    parser.add_argument(
        "--feature-sets",
        help=f"{D130_TASK}: {', '.join(FEATURE_SETS)}; other tasks: {STRUCTURED}, {WITH_NOTES} "
        "(default: every one)",
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--scores", type=Path, help="keep each learner's scores here, and stack those other runs kept"
    )
    args = parser.parse_args()
    learners = args.algorithms.split(",")
    known_sets = FEATURE_SETS if args.task == D130_TASK else {STRUCTURED: [], WITH_NOTES: []}
    names = args.feature_sets.split(",") if args.feature_sets else list(known_sets)
    unknown = sorted(set(learners) - set(LEARNERS)) + sorted(set(names) - set(known_sets))
    if unknown:
        raise EhrlakeError(f"unknown learner(s) or feature set(s) {unknown}")
    if args.folds < 3 and {TUNED, ANN} & set(learners):
        raise EhrlakeError(f"{TUNED} and {ANN} stop on a fold of the fitting folds: --folds 3 or more")
    lake = ehrlake.lake.open(str(Path(args.lake).resolve()))
    if args.task == D130_TASK:
        if not lake.exists(DIABETES130_BRONZE):
            raise EhrlakeError(f"no {DIABETES130_BRONZE}: ingest --source csv-extract --extract diabetes130")
        rows, sets, codes = d130.build(lake.read(DIABETES130_BRONZE)), FEATURE_SETS, ENCODED
        rows = rows.where(F.col("label").isNotNull())
    else:
        (rows, sets), codes = task_rows(lake, args.task, names), {}
    train, test = split(rows, args.seed, folds=args.folds)
    train, test = train.cache(), test.cache()
    every = sorted({c for name in names for c in sets[name]})
    stats = train.agg(F.sum("label"), F.count("*"), *[F.count(c).alias(c) for c in every]).first()
    positives, n = stats[0], stats[1]
    # as ``ehrlake train``: a feature never observed in training is left out (and said so)
    unseen = [c for c in every if stats[c] == 0]
    if unseen:
        print(f"left out, never observed in training: {', '.join(unseen)}")
    sets = {name: [c for c in sets[name] if c not in unseen] for name in names}
    table, held = {}, {}
    for name in names:
        scores: dict[str, tuple] = {}
        for learner in learners:
            got, oof, held_out = one(
                learner, sets[name], train, test, args.folds, args.seed, positives / n, codes.get(name, ())
            )
            table[f"{learner} / {name}"] = _report(learner, name, got)
            scores[learner] = (oof, held_out)
            if args.scores:
                kept = args.scores / f"seed{args.seed}-folds{args.folds}" / name / learner
                oof.write.mode("overwrite").parquet(str(kept / "oof"))
                held_out.write.mode("overwrite").parquet(str(kept / "held_out"))
                (kept / "row.json").write_text(json.dumps(got))
        if args.scores:  # learners a run in another environment kept (the ANN's, from .venv-dl)
            for kept in sorted(
                (args.scores / f"seed{args.seed}-folds{args.folds}" / name).glob("*/row.json")
            ):
                learner = kept.parent.name
                if learner not in scores:
                    spark = lake.spark
                    scores[learner] = tuple(
                        spark.read.parquet(str(kept.parent / part)) for part in ("oof", "held_out")
                    )
                    table[f"{learner} / {name}"] = _report(learner, name, json.loads(kept.read_text()))
        held[name] = {learner: got[1] for learner, got in scores.items()}
        if len(scores) > 1:
            started = time.perf_counter()
            table[f"{STACK} / {name}"] = _report(
                STACK, name, stack(scores, args.folds, positives / n, started)
            )
    best = max(table, key=lambda k: table[k]["test_auroc"])
    if args.task == D130_TASK:
        aims = {
            "best": best,
            "best_test_auroc_at_least_0_70": table[best]["test_auroc"] >= 0.70,
            "cv_mean_within_0_01_of_test": abs(table[best]["cv_auroc_mean"] - table[best]["test_auroc"])
            <= 0.01,
        }
    else:
        aims = {"best": best, "notes_minus_structured": notes_gain(held)}
    print(f"best: {best}; aims: {aims}")
    suffix = "" if args.task == D130_TASK else f"-{args.task}"
    path = save_result(
        args.out,
        f"model_quality-{Path(args.lake).resolve().name}{suffix}",
        {"benchmark": "model_quality", "lake": str(args.lake), "task": args.task,
         "machine": machine(lake.spark), "train_rows": n, "train_positives": positives,
         "test_rows": test.count(), "folds": args.folds, "seed": args.seed,
         "features": {k: len(v) for k, v in sets.items()}, "left_out_unseen": unseen, "table": table,
         "aims": aims},
    )  # fmt: skip
    print(f"results: {path}")
    return 0


def notes_gain(held: dict[str, dict]) -> dict[str, dict]:
    """Per learner run on both feature sets: held-out AUROC with notes minus without, with a
    paired patient-bootstrap interval (the same patients drawn for both)."""
    if STRUCTURED not in held or WITH_NOTES not in held:
        return {}
    out = {}
    for learner in sorted(set(held[STRUCTURED]) & set(held[WITH_NOTES])):
        base, other = (
            held[name][learner].withColumn("score", F.col(learner)) for name in (STRUCTURED, WITH_NOTES)
        )
        got = evaluate.paired_difference(base, other)
        out[learner] = {k: None if v is None else round(v, 4) for k, v in got.items()}
        print(
            f"{learner:10} AUROC with notes minus without: {got['value']:+.3f} "
            f"({got['ci_low']:+.3f} to {got['ci_high']:+.3f}), above 0 in {got['share_above_0']:.0%} of draws"
        )
    return out


def _report(learner: str, feature_set: str, got: dict) -> dict:
    print(
        f"{learner:10} {feature_set:13} CV AUROC {got['cv_auroc_mean']:.3f} "
        f"({got['cv_auroc_range'][0]:.3f}-{got['cv_auroc_range'][1]:.3f}), held out "
        f"{got['test_auroc']:.3f} ({got['test_auroc_ci'][0]:.3f}-{got['test_auroc_ci'][1]:.3f}), "
        f"Brier {got['test_brier']:.4f}, {got['seconds']:.0f} s",
        flush=True,
    )
    return got


if __name__ == "__main__":
    raise SystemExit(main())
