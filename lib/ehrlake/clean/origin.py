"""``silver.patient_origin``: the patients that are generated copies, and the sample patient each
copies (``bronze.generated_patients``, written by ingest from ``ehrlake synth``'s lineage).

Generated patients give volume, not new evidence: the models' patient split
(:func:`ehrlake.models.train.split`) reads this table to keep each copy on its template's side and
to evaluate on real patients only. A lake without generated patients has no such table.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.ingest.generated import TABLE as SOURCE
from ehrlake.lake import WriteMode

TABLE = "silver.patient_origin"
NAME = TABLE.split(".", 1)[1]


def refresh(lake, run_id: str) -> int | None:
    """Rewrite the table from bronze (one row per generated patient); None without generated ones."""
    if not lake.exists(SOURCE):
        return None
    frame = lake.read(SOURCE).select("patient_key", "template_key", "source_system").persist()
    rows = frame.count()
    commit = {"ehrlakeJob": "clean", "ehrlakeRunId": run_id}
    lake.write(frame, TABLE, mode=WriteMode.OVERWRITE, commit_info=commit)
    frame.unpersist()
    return rows


def with_templates(lake, df: DataFrame) -> DataFrame:
    """``df`` (with ``patient_key``) with ``template_key``: the sample patient a generated patient
    copies, null for a real one (and for every row when the lake holds no generated patients)."""
    if "template_key" in df.columns:
        return df
    if not lake.exists(TABLE):
        return df.withColumn("template_key", F.lit(None).cast("string"))
    templates = lake.read(TABLE).select("patient_key", "template_key")
    return df.join(templates, "patient_key", "left")  # one row per generated patient: may be large
