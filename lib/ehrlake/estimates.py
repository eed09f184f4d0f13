"""Record update: an ANN estimates missing and stale lab values, beside the observations, never over them.

The panel is a patient's point-in-time feature row (``gold.features_patient``: the latest value of
each lab of ``conf/features.yaml`` in its window, age, sex, conditions) with each lab's history
(:func:`history`: the measurement before the one the panel holds, and its age). Per lab a
masked-value MLP (scikit-learn's ``MLPRegressor``) learns the lab from the rest of the panel; it is
trained as a denoising model, each training row also seen with a fifth of its other labs hidden, so
it works on the gaps it will meet. Its 80% interval is split-conformal: the 80th percentile of the
absolute error on held-out patients of the training rows, so about 8 in 10 hidden values fall inside.

``ehrlake estimate`` writes ``silver.observation_estimates``: per patient, as-of and missing lab, the
value, unit, interval, model id and version, the Delta versions of its inputs and ``source =
estimated``. ``lake.read("silver.observation", include_estimates=True)`` returns both with a
``provenance`` column. A re-run estimates only the rows whose inputs changed (a hash of the panel):
the estimates of unchanged rows are kept, and an estimate whose row changed, or whose lab has been
measured since, is marked superseded (kept for provenance, never deleted). It reads only the patients
whose feature or observation rows changed since the versions its last run read (``ops.watermarks``,
from the Delta log); a new model, a first run, or a table written by another hand scans them all.

Weights are stored as ``.npz`` arrays (no pickle) and applied in executors by a numpy forward pass,
so estimating a population never brings it to the driver; training reads a bounded sample.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.clean.codes import lookup
from ehrlake.errors import EhrlakeError
from ehrlake.features import definitions, pointintime
from ehrlake.lake import increments, locks, watermarks
from ehrlake.lake.provenance import ESTIMATES as TABLE
from ehrlake.lake.provenance import OBSERVATIONS

FEATURES = "gold.features_patient"
JOB = "estimate"
MODEL_ID = "record_update"
ALGORITHM = "masked-value-mlp"
LEVEL = 0.8  # the stated interval
HIDE = 0.2  # the share of other labs hidden in a denoising copy
MAX_TRAIN_ROWS = 50_000
MIN_ROWS = 30  # a lab observed in fewer training rows gets no model (and no estimates)
CONTEXT = ("age_years", "sex_female")  # with every has_<condition>: what the panel knows besides labs


def context_columns(columns: list[str]) -> list[str]:
    return [*[c for c in CONTEXT if c in columns], *sorted(c for c in columns if c.startswith("has_"))]


# ----------------------------------------------------------------------------------- the model
@dataclass
class LabModel:
    """One lab's MLP as arrays: the weights and biases of each layer (ReLU between, identity out)."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    half_width: float  # the conformal 80% half-width, standardised units
    rows: int
    held_out: dict = field(default_factory=dict)  # rmse, nrmse, coverage on held-out patients

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        return h.ravel()


@dataclass
class PanelModel:
    """Every lab's model, the panel's standardisation, and the inputs in order."""

    labs: list[str]
    context: list[str]
    mean: dict[str, float]
    std: dict[str, float]
    models: dict[str, LabModel]

    def design(self, frame: pd.DataFrame, target: str, hide: np.ndarray | None = None) -> np.ndarray:
        """The inputs for ``target``: every other lab standardised (0 where missing) with its missing
        flag, then the context; ``hide`` (rows x other labs, bool) hides observed labs as well."""
        others = [lab for lab in self.labs if lab != target]
        values = np.column_stack(
            [(frame[f"last_{lab}"].to_numpy(float) - self.mean[lab]) / self.std[lab] for lab in others]
        ) if others else np.zeros((len(frame), 0))  # fmt: skip
        missing = np.isnan(values)
        if hide is not None:
            missing = missing | hide
        values = np.where(missing, 0.0, values)
        context = frame[self.context].to_numpy(float) if self.context else np.zeros((len(frame), 0))
        # the patient's own history of the target: its measurement before the one estimated, and how old
        prior = frame.get(f"prior_{target}", pd.Series(np.nan, index=frame.index)).to_numpy(float)
        age = frame.get(f"prior_days_{target}", pd.Series(np.nan, index=frame.index)).to_numpy(float)
        known = ~np.isnan(prior)
        own = np.column_stack([
            np.where(known, (prior - self.mean[target]) / self.std[target], 0.0), (~known).astype(float),
            np.where(known, np.log1p(np.clip(np.nan_to_num(age), 0, None)) / np.log1p(3650.0), 0.0),
        ])  # fmt: skip
        return np.column_stack([values, missing.astype(float), np.nan_to_num(context), own])

    def estimate(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per row and missing lab with a model: value, low and high (in the lab's unit), and the
        gap it fills: ``stale`` where the panel's ``stale_<lab>`` says its value is too old to be
        today's, else ``missing``."""
        out = []
        for lab, model in self.models.items():
            gaps = frame[frame[f"last_{lab}"].isna()]
            if gaps.empty:
                continue
            z = model.predict(self.design(gaps, lab))
            stale = (
                gaps[f"stale_{lab}"].fillna(False) if f"stale_{lab}" in gaps else pd.Series(False, gaps.index)
            )
            scale = self.std[lab]
            value = self.mean[lab] + z * scale
            out.append(
                pd.DataFrame(
                    {
                        "patient_key": gaps["patient_key"].to_numpy(),
                        "as_of": gaps["index_time"].to_numpy(),
                        "input_hash": gaps["input_hash"].to_numpy(),
                        "lab": lab,
                        "value": value,
                        "low": value - model.half_width * scale,
                        "high": value + model.half_width * scale,
                        "gap": np.where(stale.to_numpy(dtype=bool), "stale", "missing"),
                    }
                )
            )
        return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=ESTIMATE_COLUMNS)

    # ------------------------------------------------------------------ storage: arrays, no pickle
    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        arrays = {}
        for lab, m in self.models.items():
            for i, (w, b) in enumerate(zip(m.weights, m.biases, strict=True)):
                arrays[f"{lab}.w{i}"], arrays[f"{lab}.b{i}"] = w, b
        np.savez(os.path.join(path, "weights.npz"), **arrays)
        meta = {
            "labs": self.labs, "context": self.context, "mean": self.mean, "std": self.std,
            "models": {lab: {"layers": len(m.weights), "half_width": m.half_width, "rows": m.rows,
                             "held_out": m.held_out} for lab, m in self.models.items()},
        }  # fmt: skip
        with open(os.path.join(path, "model.json"), "w") as f:
            json.dump(meta, f, indent=1)

    @classmethod
    def load(cls, path: str) -> PanelModel:
        with open(os.path.join(path, "model.json")) as f:
            meta = json.load(f)
        arrays = np.load(os.path.join(path, "weights.npz"), allow_pickle=False)
        models = {
            lab: LabModel(
                [arrays[f"{lab}.w{i}"] for i in range(m["layers"])],
                [arrays[f"{lab}.b{i}"] for i in range(m["layers"])],
                m["half_width"],
                m["rows"],
                m["held_out"],
            )  # fmt: skip
            for lab, m in meta["models"].items()
        }
        return cls(meta["labs"], meta["context"], meta["mean"], meta["std"], models)


ESTIMATE_COLUMNS = ["patient_key", "as_of", "input_hash", "lab", "value", "low", "high", "gap"]


def _held_out(keys: pd.Series, seed: int) -> np.ndarray:
    """A fifth of the patients, by a hash of the key: the conformal calibration set."""
    codes = pd.util.hash_pandas_object(keys.astype(str) + f"#{seed}", index=False).to_numpy()
    return (codes % 5) == 0


def fit(panel: pd.DataFrame, labs: list[str], seed: int = 42, hidden=(32, 16)) -> PanelModel:
    """Fit every lab's masked-value MLP on ``panel`` (``patient_key``, ``last_<lab>``, context)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    context = context_columns(list(panel.columns))
    mean, std = {}, {}
    for lab in labs:
        seen = panel[f"last_{lab}"].dropna().to_numpy(float)
        mean[lab] = float(seen.mean()) if len(seen) else 0.0
        std[lab] = float(seen.std()) if len(seen) > 1 and seen.std() > 0 else 1.0
    model = PanelModel(list(labs), context, mean, std, {})
    rng = np.random.default_rng(seed)
    calibration = _held_out(panel["patient_key"], seed)
    for lab in labs:
        seen = panel[f"last_{lab}"].notna().to_numpy()
        train, calib = panel[seen & ~calibration], panel[seen & calibration]
        if len(train) < MIN_ROWS or len(calib) < 10:
            continue
        y = (train[f"last_{lab}"].to_numpy(float) - mean[lab]) / std[lab]
        others = len(labs) - 1
        hide = rng.random((len(train), others)) < HIDE  # the denoising copy: some other labs hidden
        x = np.vstack([model.design(train, lab), model.design(train, lab, hide)])
        mlp = MLPRegressor(
            hidden_layer_sizes=hidden, alpha=1e-3, learning_rate_init=1e-3, max_iter=400,
            early_stopping=True, validation_fraction=0.15, n_iter_no_change=20, random_state=seed,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:  # still improving at max_iter: recorded below
            warnings.simplefilter("always", ConvergenceWarning)
            mlp.fit(x, np.concatenate([y, y]))
        fitted = LabModel([w.astype(float) for w in mlp.coefs_], [b.astype(float) for b in mlp.intercepts_],
                          0.0, len(train))  # fmt: skip
        truth = (calib[f"last_{lab}"].to_numpy(float) - mean[lab]) / std[lab]
        errors = np.abs(fitted.predict(model.design(calib, lab)) - truth)
        n = len(errors)
        fitted.half_width = float(np.quantile(errors, min(1.0, np.ceil((n + 1) * LEVEL) / n)))
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        fitted.held_out = {"rows": n, "nrmse": float(np.sqrt(np.mean(errors**2))), "converged": converged}
        model.models[lab] = fitted
    if not model.models:
        raise EhrlakeError(f"no lab is measured in {MIN_ROWS} training rows: nothing to learn estimates from")
    return model


# ----------------------------------------------------------------------------------- the job
def _hash(columns: list[str]):
    return F.xxhash64(*[F.coalesce(F.col(c).cast("string"), F.lit("∅")) for c in columns]).alias("input_hash")


def history(lake, anchors: DataFrame, labs: list[str], defs=None) -> DataFrame:
    """Per anchor (``patient_key``, ``index_time``) and lab, ``prior_<lab>`` and ``prior_days_<lab>``:
    the patient's latest measurement that the panel does not hold as current, and its age in days;
    what LOCF would carry forward, an input beside the other labs. Where the latest is recent (within
    the lab's ``stale_days``, else ``windows.labs_stale_days``) the panel holds it and the history is
    the one before; where it is stale (older, still in the lab window) or out of the window, it is
    the latest itself, and ``stale_<lab>`` says the panel's value is stale (:func:`panel` estimates
    it anew)."""
    defs = defs or definitions.load()
    keys = anchors.select("patient_key", "index_time").distinct()
    obs = pointintime.lab_values(lake, {n: defs.labs[n] for n in labs})
    before = keys.join(obs, "patient_key").where(F.col("effective_at") < F.col("index_time"))
    order = Window.partitionBy("patient_key", "index_time", "lab").orderBy(F.desc("effective_at"))
    ranked = before.withColumn("_rank", F.row_number().over(order)).where("_rank <= 2")
    at = lambda rank, c: F.max(F.when(F.col("_rank") == rank, F.col(c)))  # noqa: E731
    per_lab = ranked.groupBy("patient_key", "index_time", "lab").agg(
        at(1, "value_number").alias("v1"), at(1, "effective_at").alias("t1"),
        at(2, "value_number").alias("v2"), at(2, "effective_at").alias("t2"),
    )  # fmt: skip
    age = F.unix_timestamp("index_time") - F.unix_timestamp("t1")  # seconds
    in_window = age <= defs.windows.labs_days * 86400
    current = in_window & (age <= lookup({n: defs.stale_days(n) * 86400 for n in labs}, F.col("lab")))
    when = F.when(current, F.col("t2")).otherwise(F.col("t1"))
    per_lab = per_lab.select(
        "patient_key", "index_time", "lab", F.when(current, F.col("v2")).otherwise(F.col("v1")).alias("v"),
        ((F.unix_timestamp("index_time") - F.unix_timestamp(when)) / 86400.0).alias("d"),
        (in_window & ~current).alias("s"),
    )  # fmt: skip
    wide = (
        per_lab.groupBy("patient_key", "index_time")
        .pivot("lab", labs)
        .agg(F.first("v").alias("v"), F.first("d").alias("d"), F.first("s").alias("s"))
    )
    cols = []
    for lab in labs:
        cols += [
            F.col(f"{lab}_v").alias(f"prior_{lab}"),
            F.col(f"{lab}_d").alias(f"prior_days_{lab}"),
            F.col(f"{lab}_s").alias(f"stale_{lab}"),
        ]
    out = keys.join(wide.select("patient_key", "index_time", *cols), ["patient_key", "index_time"], "left")
    return out.fillna(False, subset=[f"stale_{lab}" for lab in labs])  # no measurement: not stale


def panel(lake, rows: DataFrame, labs: list[str]) -> DataFrame:
    """Feature-like rows (``patient_key``, ``index_time``, ``last_<lab>``, context) as the model's
    panel: with each lab's history and the hash of everything the model reads. A stale value
    (measured, but longer ago than the lab's stale days) is not current: the panel holds
    it as the lab's history and the lab as a gap, so the model learns and estimates today's value
    from it. A lab whose feature takes estimates (``estimated_<lab>``) is read as measured only:
    the model never learns from, or re-estimates because of, its own estimates."""
    for lab in labs:
        if f"estimated_{lab}" in rows.columns:
            measured = F.when(F.col(f"estimated_{lab}") != 1, F.col(f"last_{lab}"))
            rows = rows.withColumn(f"last_{lab}", measured)
    rows = rows.join(history(lake, rows, labs), ["patient_key", "index_time"], "left")
    for lab in labs:
        rows = rows.withColumn(f"last_{lab}", F.when(~F.col(f"stale_{lab}"), F.col(f"last_{lab}")))
    inputs = [
        *[f"last_{lab}" for lab in labs], *context_columns(rows.columns),
        *[f"{p}{lab}" for lab in labs for p in ("prior_", "prior_days_")],
    ]  # fmt: skip
    stale = [f"stale_{lab}" for lab in labs]  # not an input: why a gap is one (estimate's ``gap``)
    return rows.select("patient_key", "index_time", *inputs, _hash(inputs), *stale)


def train(lake, role: str | None = None, seed: int = 42, max_rows: int = MAX_TRAIN_ROWS):
    """Fit the panel model on a bounded sample of feature rows and register it; its ModelVersion."""
    from ehrlake.models import registry, versions

    if not lake.exists(FEATURES):
        raise EhrlakeError(f"no {FEATURES} yet: run ehrlake features first")
    labs = list(definitions.load().labs)
    rows = panel(lake, lake.read(FEATURES), labs)
    total = rows.count()
    sample = rows.sample(fraction=min(1.0, max_rows / max(total, 1)), seed=seed) if total > max_rows else rows
    model = fit(sample.toPandas(), labs, seed)  # at most ~max_rows rows reach the driver
    version, artifact, path = versions.new_artifact(lake, MODEL_ID)
    model.save(path)
    held = {lab: m.held_out for lab, m in model.models.items()}
    mv = registry.ModelVersion(
        model_id=MODEL_ID, version=version, task=MODEL_ID, algorithm=ALGORITHM,
        params={"labs": list(model.models), "hidden": [32, 16], "level": LEVEL, "hide": HIDE, "seed": seed,
                "train_rows": min(total, max_rows)},
        features=[*[f"last_{lab}" for lab in labs], *model.context],
        training_data={FEATURES: lake.version(FEATURES)},
        metrics={"held_out_nrmse": {"value": float(np.mean([h["nrmse"] for h in held.values()])),
                                    "per_lab": held}},
        bands={}, artifact=artifact, created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None),
        status="candidate",
    )  # fmt: skip
    with lake.security.job("estimate", ["gold"], role) as (_, audit):
        registry.register(lake, mv)
        audit.append((registry.TABLE, f"{mv.label}: {mv.headline()}"))
    return mv


SCHEMA = (
    "estimate_id string, patient_key string, code_system string, code string, lab string, display string, "
    "as_of timestamp, value double, unit string, low double, high double, level double, model_id string, "
    "model_version int, input_versions map<string, bigint>, input_hash bigint, source string, "
    "estimated_at timestamp, superseded boolean, superseded_at timestamp, superseded_reason string, "
    "gap string"  # missing: no value in the lab window; stale: one older than the lab's stale days
)


def units(lake, labs: dict) -> dict[str, str | None]:
    """Each lab's silver unit: the declared UCUM unit of its LOINC codes, else the unit its
    observations carry most often (one small aggregate)."""
    from ehrlake.clean.units import MEASURES

    out = {}
    for name, lab in labs.items():
        known = [m.unit for m in MEASURES if set(m.loinc) & set(lab.codes.get("LOINC", ()))]
        out[name] = known[0] if known else None
    unknown = [n for n, u in out.items() if u is None]
    if unknown and lake.exists(OBSERVATIONS):
        name = pointintime.lab_of({n: labs[n] for n in unknown}, F.col("code_system"), F.col("code"))
        counted = (
            lake.read(OBSERVATIONS).where(F.col("unit").isNotNull())
            .select(name.alias("lab"), "unit").where(F.col("lab").isNotNull())
            .groupBy("lab", "unit").count().collect()
        )  # fmt: skip  # at most labs x units rows
        for r in sorted(counted, key=lambda r: -r["count"]):
            out[r["lab"]] = out[r["lab"]] or r["unit"]
    return out


def latest_model(lake, retrain: bool = False, role: str | None = None):
    """The latest registered panel model (trained first when there is none, or when asked)."""
    from ehrlake.models import registry

    if not retrain and lake.exists(registry.TABLE):
        known = [m for m in registry.versions(lake, MODEL_ID) if m.model_id == MODEL_ID]
        if known:
            return known[-1]
    return train(lake, role)


def run(lake, role: str | None = None, retrain: bool = False) -> dict:
    """Estimate the missing labs of the feature rows whose inputs changed since the last run (all
    of them the first time, or under a new model); supersede the estimates those rows had. Returns
    counts: rows re-estimated, estimates written, kept, superseded (by reason), and the patients
    read (None: all of them)."""
    with locks.alone(lake.root, JOB):
        return _run(lake, role, retrain)


def _scope(lake, sources: dict[str, int], fp: str) -> DataFrame | None:
    """The patients whose panel rows may have changed since the last run, or None: all. A row
    reads its patient's feature row and observations, and the model (in ``fp``); an estimate table
    written since by another hand (emptied, restored) is not what the mark describes. Not cached:
    it reads the patient keys of the changed data files only, pinned to ``sources``."""
    mark = watermarks.read(lake, JOB).get(TABLE)
    if mark is None or mark.sources.get(TABLE) != lake.version(TABLE):
        return None
    behind = replace(mark, sources={t: v for t, v in mark.sources.items() if t != TABLE})
    return increments.changed_patients(lake, behind, sources, fp)


def _run(lake, role: str | None, retrain: bool) -> dict:
    mv = latest_model(lake, retrain, role)
    model = PanelModel.load(mv.artifact_path(lake))
    defs = definitions.load()
    labs = {n: defs.labs[n] for n in model.labs}
    unit = units(lake, labs)
    lake.create(TABLE, lake.spark.createDataFrame([], SCHEMA).schema, description=__doc__.splitlines()[0])
    sources = {t: lake.version(t) for t in (FEATURES, OBSERVATIONS) if lake.exists(t)}  # what this run reads
    if FEATURES not in sources:
        raise EhrlakeError(f"no {FEATURES} yet: run ehrlake features first")
    fp = watermarks.fingerprint(mv.label, labs, defs.windows, watermarks.code(Path(__file__)))
    scope = _scope(lake, sources, fp)
    features = lake.read(FEATURES, version=sources[FEATURES])
    existing = lake.snapshot(TABLE)  # the merge below writes it
    active = existing.where(~F.col("superseded"))
    if scope is not None:
        features = features.join(scope, "patient_key", "left_semi")
        active = active.join(scope, "patient_key", "left_semi")
    rows = panel(lake, features, model.labs)
    current = active.where(F.col("model_version") == mv.version)
    done = current.select("patient_key", F.col("as_of").alias("index_time"), "input_hash").distinct()
    estimable = F.lit(False)
    for lab in model.models:
        estimable = estimable | F.col(f"last_{lab}").isNull()
    todo = rows.where(estimable).join(done, ["patient_key", "index_time", "input_hash"], "left_anti")

    def apply(batches):
        for frame in batches:
            yield model.estimate(frame)

    raw = todo.mapInPandas(
        apply, "patient_key string, as_of timestamp, input_hash bigint, lab string, value double, "
        "low double, high double, gap string",
    )  # fmt: skip
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    code = {n: lab.codes.get("LOINC", [None])[0] for n, lab in labs.items()}
    by = lambda d: lookup(d, F.col("lab"))  # noqa: E731
    fresh = raw.select(
        F.concat_ws("#", "patient_key", F.date_format("as_of", "yyyy-MM-dd'T'HH:mm:ss"), "lab",
                    F.lit(f"v{mv.version}"), F.col("input_hash").cast("string")).alias("estimate_id"),
        "patient_key", F.lit("LOINC").alias("code_system"), by(code).alias("code"), "lab",
        by({n: lab.description for n, lab in labs.items()}).alias("display"), "as_of", "value",
        by({n: u for n, u in unit.items() if u}).alias("unit"), "low", "high", F.lit(LEVEL).alias("level"),
        F.lit(MODEL_ID).alias("model_id"), F.lit(mv.version).alias("model_version"),
        F.create_map(*[F.lit(x) for kv in sources.items() for x in kv]).alias("input_versions"),
        "input_hash", F.lit("estimated").alias("source"), F.lit(now).alias("estimated_at"),
        F.lit(False).alias("superseded"), F.lit(None).cast("timestamp").alias("superseded_at"),
        F.lit(None).cast("string").alias("superseded_reason"), "gap",
    )  # fmt: skip

    # an active estimate whose row is gone or changed, or made by another model, is superseded
    now_rows = rows.select(
        "patient_key", F.col("index_time").alias("as_of"), F.col("input_hash").alias("_hash"),
        F.create_map(*[x for lab in model.labs for x in (F.lit(lab), F.col(f"last_{lab}").isNotNull())])
        .alias("_seen"),
    )  # fmt: skip
    checked = active.join(now_rows, ["patient_key", "as_of"], "left")
    reason = (
        F.when(F.col("_hash").isNull(), "row gone")
        .when(F.coalesce(F.element_at("_seen", F.col("lab")), F.lit(False)), "measured")
        .when(F.col("model_version") != mv.version, "new model")
        .when(F.col("_hash") != F.col("input_hash"), "inputs changed")
    )
    stale = (
        checked.withColumn("superseded_reason", reason)
        .where(F.col("superseded_reason").isNotNull())
        .withColumn("superseded", F.lit(True))
        .withColumn("superseded_at", F.lit(now))
        .select(*existing.columns)
    )
    fresh = fresh.withColumn("_n", F.row_number().over(Window.partitionBy("estimate_id").orderBy("lab")))
    # a table written before ``gap`` existed gains it (its older rows read null)
    changes = stale.unionByName(fresh.where("_n = 1").drop("_n"), allowMissingColumns=True).cache()
    try:
        what = F.coalesce("superseded_reason", F.concat(F.lit("estimated "), "gap")).alias("what")
        counts = {r["what"]: r["n"] for r in changes.groupBy(what).agg(F.count("*").alias("n")).collect()}
        fresh_rows = changes.where(~F.col("superseded")).select("patient_key", "as_of").distinct()
        rows_estimated = fresh_rows.count() if counts else 0
        with lake.security.job("estimate", ["silver"], role) as (_, audit):
            commit = {"ehrlakeJob": JOB}
            if counts:
                lake.merge(changes, TABLE, ["estimate_id"], evolve_schema=True, commit_info=commit)
            audit.append((TABLE, f"{mv.label}: {rows_estimated} rows estimated, {counts}"))
        # after the merge committed: a crash before this line re-reads a little more next time
        mark = {**sources, TABLE: lake.version(TABLE)}
        watermarks.record(lake, [watermarks.Watermark(JOB, TABLE, mark, fp, now.isoformat())], commit)
        read = scope.count() if scope is not None else None
    finally:
        changes.unpersist()
    missing, stale_values = counts.pop("estimated missing", 0), counts.pop("estimated stale", 0)
    return {
        "model": mv.label,
        "rows_estimated": rows_estimated,
        "estimates_written": missing + stale_values,
        "estimates_of_stale_values": stale_values,
        "superseded": counts,
        "active": lake.read(TABLE).where(~F.col("superseded")).count(),
        "patients_read": read,
    }
