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
from ehrlake.lake import WriteMode, increments, watermarks
from ehrlake.lake.increments import REBUILT, UNCHANGED
from ehrlake.lake.watermarks import Watermark

TABLE = "silver.patient_origin"
NAME = TABLE.split(".", 1)[1]
COLUMNS = ("patient_key", "template_key", "source_system")


def refresh(lake, run_id: str, job: str, mark: Watermark | None, fingerprint: str):
    """Bring the table up to date with bronze (one row per generated patient): (what was done,
    rows, the mark for ``job``'s next run), or None without generated patients. When the table is
    as ``mark`` (the last run's) left it and bronze only gained rows since, as each ingest of a
    new batch does, the new rows are appended; otherwise (a rebuild: no mark) it is rewritten."""
    if not lake.exists(SOURCE):
        return None
    sources = {SOURCE: lake.version(SOURCE)}
    commit = {"ehrlakeJob": job, "ehrlakeRunId": run_id}
    gained = _gained(lake, mark, sources, fingerprint)
    frame = gained if gained is not None else lake.read(SOURCE, version=sources[SOURCE])
    frame = frame.select(*COLUMNS).persist()
    try:
        rows = frame.count()
        if gained is None:
            lake.write(frame, TABLE, mode=WriteMode.OVERWRITE, commit_info=commit)
        elif rows:
            lake.write(frame, TABLE, mode=WriteMode.APPEND, commit_info=commit)
    finally:
        frame.unpersist()
    found = {"inserted": rows, "updated": 0, "deleted": 0}
    how = REBUILT if gained is None else increments.describe(found) if rows else UNCHANGED
    counts = watermarks.Counts(lake.version(TABLE), lake.row_count(TABLE))
    return how, counts.rows, watermarks.Watermark(job, TABLE, sources, fingerprint, run_id, counts)


def _gained(lake, mark: Watermark | None, sources: dict[str, int], fingerprint: str) -> DataFrame | None:
    """The rows bronze gained since ``mark``, when the table is as it left it and bronze lost or
    changed none of its rows since; else None (rewrite)."""
    if not increments.continues(mark, sources, fingerprint) or mark.counts is None:
        return None
    if not lake.exists(TABLE) or lake.version(TABLE) != mark.counts.version:
        return None  # another writer since (a patient forgotten)
    return lake.changed_rows(SOURCE, mark.sources[SOURCE], until=sources[SOURCE], appends_only=True)


def with_templates(lake, df: DataFrame) -> DataFrame:
    """``df`` (with ``patient_key``) with ``template_key``: the sample patient a generated patient
    copies, null for a real one (and for every row when the lake holds no generated patients)."""
    if "template_key" in df.columns:
        return df
    if not lake.exists(TABLE):
        return df.withColumn("template_key", F.lit(None).cast("string"))
    templates = lake.read(TABLE).select("patient_key", "template_key")
    return df.join(templates, "patient_key", "left")  # one row per generated patient: may be large
