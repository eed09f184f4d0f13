"""Which ingested patients are generated copies, and of which sample patient.

``ehrlake synth`` names every copy's template in ``_lineage/part-*.csv.gz`` (patient, template,
template_source_system; a folder that ingest's file discovery passes by, as Spark does). Ingest
turns each row into pseudonymous keys, the copy's under the batch's source system and the
template's under the one the samples were ingested under, and merges them into
``bronze.generated_patients``. ``ehrlake clean`` carries the table to ``silver.patient_origin``,
which the models' patient split reads so that a copy never lands on the other side of its template
and generated patients are never evaluated on.
"""

from __future__ import annotations

import glob
import os

from pyspark.sql import functions as F

LINEAGE = "_lineage"
TABLE = "bronze.generated_patients"
KEYS = ["patient_key"]


def lineage_files(input_path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(input_path, LINEAGE, "part-*.csv.gz")))


def load(lake, protector, ctx, commit_info: dict) -> int:
    """Merge the lineage under the run's input folder (if any) into :data:`TABLE`; returns its rows.
    Without a protector (an unencrypted benchmark lake) there are no patient keys to link."""
    files = lineage_files(ctx.input_path)
    if not files or protector is None:
        return 0
    rows = lake.spark.read.csv(files, header=True).where("patient IS NOT NULL AND template IS NOT NULL")
    keyed = protector.patient_key(rows, "patient", F.lit(ctx.source_system), "copy_key")
    keyed = protector.patient_key(keyed, "template", F.col("template_source_system"), "template_key")
    frame = keyed.select(
        F.col("copy_key").alias("patient_key"),
        "template_key",
        F.lit(ctx.source_system).alias("source_system"),
        F.col("template_source_system"),
        F.lit(ctx.run_id).alias("ingest_run_id"),
        ctx.now.alias("ingested_at"),
    ).persist()
    count = frame.count()
    lake.create(TABLE, frame.schema)
    lake.merge(frame, TABLE, KEYS, "s.template_key <> t.template_key", commit_info=commit_info)
    frame.unpersist()
    return count
