"""Features and labels for the prediction tasks (docs/features.md).

- ``gold.features_patient``: one row per patient x as-of date, point-in-time (``pointintime.py``);
- ``gold.features_encounter``: one row per inpatient stay at discharge, point-in-time;
- ``gold.features_diabetes130``: one row per Diabetes 130-US encounter (``diabetes130.py``);
- ``gold.labels``: one row per task x index with ``label`` (0/1) or the ``excluded`` reason
  (``labels.py``).

Every table is rebuilt whole on each run, so re-running (after a crash or not) gives the same tables.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.errors import EhrlakeError
from ehrlake.features import definitions, diabetes130, labels, pointintime
from ehrlake.features.labels import LABEL_COLUMNS, TASKS, Task, task
from ehrlake.lake import WriteMode

__all__ = ["run", "default_as_of", "TASKS", "Task", "task", "model_inputs", "descriptions", "training_frame"]

DIABETES130_BRONZE = "bronze.diabetes130_encounters"


def default_as_of(end: dt.datetime, years: int = 5) -> list[dt.date]:
    """1 January of the ``years`` latest years whose 12-month follow-up ends inside the data."""
    last = (end - dt.timedelta(days=366)).year
    return [dt.date(y, 1, 1) for y in range(last - years + 1, last + 1)]


def model_inputs(t: Task) -> list[str]:
    """The feature columns a model of task ``t`` uses, in order."""
    if t.level == "diabetes130":
        return list(diabetes130.FEATURES)
    return pointintime.feature_columns(definitions.load(), t.level)


def descriptions(t: Task) -> dict[str, str]:
    if t.level == "diabetes130":
        return dict(diabetes130.DESCRIPTIONS)
    return pointintime.descriptions(definitions.load())


def training_frame(lake, t: Task, versions: dict[str, int] | None = None) -> DataFrame:
    """Labelled, non-excluded rows of task ``t``: features joined to labels, at the given Delta
    versions of the two tables (training pins them; default: the latest)."""
    if not lake.exists(t.feature_table) or not lake.exists("gold.labels"):
        raise EhrlakeError(f"no {t.feature_table} / gold.labels yet: run ehrlake features first")
    versions = versions or {}
    lab = (
        lake.read("gold.labels", version=versions.get("gold.labels"))
        .where((F.col("task") == t.name) & F.col("label").isNotNull())
        .select("patient_key", "index_id", "label")
    )
    return lake.read(t.feature_table, version=versions.get(t.feature_table)).join(
        lab, ["patient_key", "index_id"]
    )


def patient_features(lake, as_of: list[dt.date], defs=None, patients: DataFrame | None = None) -> DataFrame:
    """Point-in-time features of every patient under observation at each date (the eligible
    population of the patient-level tasks; scoring uses the same); only of ``patients`` (a frame
    of ``patient_key``) where given: a patient's features depend on their own rows alone."""
    defs = defs or definitions.load()
    index = labels.patient_index(lake, as_of, defs).where(F.col("_base_excluded").isNull())
    if patients is not None:
        index = index.join(F.broadcast(patients), "patient_key", "left_semi")
    return pointintime.build(lake, index, defs, "patient")


def run(lake, as_of: list[dt.date] | None = None, role: str | None = None) -> dict:
    """Build the feature and label tables from silver (and the Diabetes 130-US bronze table where
    it exists). Returns rows per table and labelled / positive counts per task."""
    defs = definitions.load()
    has_silver = lake.exists("silver.patient") and lake.exists("silver.encounter")
    has_d130 = lake.exists(DIABETES130_BRONZE)
    if not has_silver and not has_d130:
        raise EhrlakeError("no silver tables yet: run ehrlake clean first")
    written: dict[str, DataFrame] = {}
    label_parts: list[DataFrame] = []
    summary: dict = {"as_of": [], "skipped": []}
    end = labels.data_end(lake) if has_silver else None
    if has_silver and end is None:
        undated = "silver.encounter has no dated encounters: cannot place an index date"
        if not has_d130:
            raise EhrlakeError(undated)
        # a hospital whose only source is an undated extract: its own rows still make features
        summary["skipped"].append(f"patient and encounter tasks ({undated})")
        has_silver = False
    if has_silver:
        as_of = sorted(as_of or default_as_of(end))
        summary["as_of"] = [d.isoformat() for d in as_of]
        summary["data_end"] = end.isoformat(sep=" ")
        stays = labels.readmission(lake, end)
        label_parts.append(stays.select(*LABEL_COLUMNS))
        written["gold.features_encounter"] = pointintime.build(
            lake, stays.where(F.col("index_time").isNotNull()), defs, "encounter"
        )
        index = labels.patient_index(lake, as_of, defs)
        for t in TASKS.values():
            if t.level == "patient":
                label_parts.append(labels.patient_labels(lake, index, t, end, defs))
        written["gold.features_patient"] = pointintime.build(
            lake, index.where(F.col("_base_excluded").isNull()), defs, "patient"
        )
    if has_d130:
        rows = diabetes130.build(lake.read(DIABETES130_BRONZE))
        label_parts.append(rows.select(*LABEL_COLUMNS))
        written["gold.features_diabetes130"] = rows.drop("task", "label", "excluded")
    all_labels = label_parts[0]
    for part in label_parts[1:]:
        all_labels = all_labels.unionByName(part)
    written["gold.labels"] = all_labels

    with lake.security.job("features", ["gold"], role) as (_, audit):
        for table, df in written.items():
            lake.write(df, table, mode=WriteMode.OVERWRITE, commit_info={"ehrlakeJob": "features"})
            rows = lake.row_count(table)
            summary[table] = rows
            audit.append((table, f"{rows} rows"))
    counts = (
        lake.read("gold.labels")
        .groupBy("task")
        .agg(
            F.sum(F.col("label").isNotNull().cast("int")).alias("labelled"),
            F.sum(F.coalesce("label", F.lit(0))).alias("positive"),
            F.sum(F.col("excluded").isNotNull().cast("int")).alias("excluded"),
        )
        .collect()  # one row per task
    )
    summary["tasks"] = {
        r.task: {"labelled": int(r.labelled), "positive": int(r.positive), "excluded": int(r.excluded)}
        for r in counts
    }
    return summary
