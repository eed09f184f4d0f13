"""The model registry: ``gold.model_registry`` (one row per model version) plus artifacts in the lake.

A model id names what is trained (``<task>.<algorithm>``); each training run adds a version. A row
records the parameters, the feature list, the Delta version of every table it was trained from (so
any model traces to the exact data: ``lake.read(table, version=...)``), test metrics with their
confidence intervals, the risk-band thresholds, and where the fitted pipeline is saved
(``<lake>/models/<model_id>/v<version>``, Spark ML format). Status: ``candidate`` when trained,
``nominated`` when a training run put it forward, ``production`` once a reviewer approved it
(:mod:`ehrlake.models.governance`; one per task: the previous one becomes ``retired``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass

from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import EhrlakeError

TABLE = "gold.model_registry"
CANDIDATE, NOMINATED, PRODUCTION, RETIRED = "candidate", "nominated", "production", "retired"
STATUSES = (CANDIDATE, NOMINATED, PRODUCTION, RETIRED)
SCHEMA = T.StructType(
    [
        T.StructField("model_id", T.StringType(), False),
        T.StructField("version", T.IntegerType(), False),
        T.StructField("task", T.StringType(), False),
        T.StructField("algorithm", T.StringType(), False),
        T.StructField("params", T.StringType()),  # JSON
        T.StructField("features", T.ArrayType(T.StringType())),
        T.StructField("training_data", T.StringType()),  # JSON {table: delta version}
        T.StructField("metrics", T.StringType()),  # JSON {metric: {value, ci_low, ci_high, n, positives}}
        T.StructField("bands", T.StringType()),  # JSON {"medium": score, "high": score}
        T.StructField("artifact", T.StringType()),  # relative to the lake root
        T.StructField("created_at", T.TimestampType()),
        T.StructField("status", T.StringType()),
    ]
)


@dataclass(frozen=True)
class ModelVersion:
    model_id: str
    version: int
    task: str
    algorithm: str
    params: dict
    features: list[str]
    training_data: dict
    metrics: dict
    bands: dict
    artifact: str
    created_at: dt.datetime
    status: str

    @classmethod
    def from_row(cls, row) -> ModelVersion:
        d = row.asDict()
        for key in ("params", "training_data", "metrics", "bands"):
            d[key] = json.loads(d[key] or "{}")
        d["features"] = list(d["features"] or [])
        return cls(**d)

    def headline(self) -> str:
        """The metric a listing shows: test AUROC with its interval, or an encoder's masked-code or
        contrastive loss on held-out data."""
        if "auroc" in self.metrics:
            a = self.metrics["auroc"]
            if a.get("value") is None:  # a test split without positives or without negatives
                return f"test AUROC undefined ({a.get('positives', 0)} positives in {a.get('n', 0)} rows)"
            copies = " on generated copies" if self.params.get("test_patients", "real") != "real" else ""
            return f"test AUROC {a['value']:.3f} ({a['ci_low']:.3f}-{a['ci_high']:.3f}){copies}"
        if "held_out_nrmse" in self.metrics:  # the record update's panel model (ehrlake.estimates)
            m = self.metrics["held_out_nrmse"]
            return f"held-out normalised RMSE {m['value']:.2f} over {len(m.get('per_lab', {}))} labs"
        for key, name in (("masked_code_loss", "masked-code loss"), ("contrastive_loss", "contrastive loss")):
            if key in self.metrics:
                m = self.metrics[key]
                return f"{name} {m['value']:.2f} (untrained {m['untrained']:.2f})"
        return "no metrics"

    def artifact_path(self, lake) -> str:
        return os.path.join(lake.root, self.artifact)

    def load(self, lake):
        """The fitted Spark ML pipeline."""
        from pyspark.ml import PipelineModel

        return PipelineModel.load(self.artifact_path(lake))

    @property
    def name(self) -> str:
        """The model's name within its task (``logreg``, ``logreg-federated``, ``cnn_pretrained``):
        what tells apart two models of one algorithm."""
        return self.model_id.removeprefix(f"{self.task}.")

    @property
    def label(self) -> str:
        return f"{self.model_id} v{self.version}"


def _table(lake):
    lake.create(TABLE, SCHEMA, description="model versions: parameters, data versions, metrics, status")
    return lake.read(TABLE)


def next_version(lake, model_id: str) -> int:
    latest = _table(lake).where(F.col("model_id") == model_id).agg(F.max("version")).first()[0]
    return int(latest or 0) + 1


def artifact_dir(model_id: str, version: int) -> str:
    return os.path.join("models", model_id, f"v{version}")


def register(lake, mv: ModelVersion) -> None:
    row = (
        mv.model_id,
        mv.version,
        mv.task,
        mv.algorithm,
        json.dumps(mv.params, sort_keys=True, default=str),
        mv.features,
        json.dumps(mv.training_data, sort_keys=True),
        json.dumps(mv.metrics, sort_keys=True),
        json.dumps(mv.bands, sort_keys=True),
        mv.artifact,
        mv.created_at,
        mv.status,
    )
    _table(lake)
    lake.merge_rows([row], SCHEMA, TABLE, keys=["model_id", "version"], commit_info={"ehrlakeJob": "train"})


def versions(lake, task: str | None = None) -> list[ModelVersion]:
    df = _table(lake)
    if task:
        df = df.where(F.col("task") == task)
    return [ModelVersion.from_row(r) for r in df.orderBy("task", "model_id", "version").collect()]


def get(lake, model_id: str, version: int | None = None) -> ModelVersion:
    """A model version (``version=None``: the latest) of the registry."""
    df = _table(lake).where(F.col("model_id") == model_id)
    if version is not None:
        df = df.where(F.col("version") == version)
    row = df.orderBy(F.desc("version")).first()
    if row is None:
        known = sorted({m.model_id for m in versions(lake)})
        raise EhrlakeError(
            f"no model {model_id}" + (f" v{version}" if version else "") + f" in {TABLE} "
            f"(known: {', '.join(known) or 'none; run ehrlake train first'})"
        )
    return ModelVersion.from_row(row)


def production(lake, task: str) -> ModelVersion:
    rows = [m for m in versions(lake, task) if m.status == "production"]
    if not rows:
        raise EhrlakeError(
            f"no production model for task {task}: a reviewer approves one (ehrlake models approve "
            "--model ID --version N --note '...' --role reviewer), then ehrlake models promote; "
            "ehrlake models list shows candidates"
        )
    return rows[-1]


def set_production(lake, model_id: str, version: int) -> ModelVersion:
    """Make this version the task's production model, the previous one ``retired``. No check:
    :func:`ehrlake.models.governance.promote` is the way in, after an approval."""
    chosen = get(lake, model_id, version)
    _update(lake, chosen, PRODUCTION, {PRODUCTION: RETIRED})
    return get(lake, model_id, version)


def nominate(lake, model_id: str, version: int) -> ModelVersion:
    """Put this version forward for production (a reviewer's approval promotes it); an earlier
    nominee of the task goes back to ``candidate``."""
    chosen = get(lake, model_id, version)
    _update(lake, chosen, NOMINATED, {NOMINATED: CANDIDATE})
    return get(lake, model_id, version)


def _update(lake, chosen: ModelVersion, status: str, others: dict[str, str]) -> None:
    """Give ``chosen`` ``status`` and move the task's other versions by ``others`` (old -> new
    status), in one merge."""
    changed = []
    for m in versions(lake, chosen.task):
        new = (
            status
            if (m.model_id, m.version) == (chosen.model_id, chosen.version)
            else others.get(m.status, m.status)
        )
        if new != m.status:
            changed.append((m.model_id, m.version, new))
    if changed:
        updates = lake.spark.createDataFrame(changed, "model_id string, version int, status string")
        current = _table(lake).drop("status").join(updates, ["model_id", "version"])
        lake.merge(
            current.select(*SCHEMA.fieldNames()),
            TABLE,
            keys=["model_id", "version"],
            commit_info={"ehrlakeJob": f"models.{status}"},
        )
