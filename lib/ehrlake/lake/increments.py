"""Incremental upkeep of patient-keyed tables, shared by the jobs that offer ``--incremental``.

A derived table whose rows of a patient depend only on that patient's source rows (silver from
bronze, risk scores from silver) can be brought up to date by recomputing the patients whose
source rows changed and replacing their rows. Two steps, both here:

- :func:`changed_patients`: which patients, from the Delta log since the versions the job's last
  run read (its watermark, :mod:`ehrlake.lake.watermarks`); ``None`` whenever that cannot be
  told (first run, changed configuration, a source recreated or its log gone), and the job rebuilds;
- :func:`replace_patients`: their freshly computed rows brought into the table in one commit.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.lake import WriteMode

STATUSES = ("inserted", "updated", "deleted")


def changed_patients(lake, mark, sources: dict[str, int], fingerprint: str) -> DataFrame | None:
    """Distinct ``patient_key`` of the rows of ``sources`` (table -> version this run reads) in
    data files changed since ``mark`` (the job's last watermark of the table, or None); None when
    the table must be rebuilt instead: no mark, another fingerprint or source set, a source whose
    version went back (recreated) or without ``patient_key``, or a log no longer holding the range."""
    if mark is None or mark.fingerprint != fingerprint or set(mark.sources) != set(sources):
        return None
    parts = []
    for table, version in sources.items():
        if mark.sources[table] > version or "patient_key" not in lake.schema(table).fieldNames():
            return None
        if mark.sources[table] == version:
            continue
        rows = lake.changed_rows(table, mark.sources[table], ["patient_key"], until=version)
        if rows is None:
            return None
        parts.append(rows)
    union = lake.spark.createDataFrame([], "patient_key string")
    for part in parts:
        union = union.unionByName(part)
    return union.where(F.col("patient_key").isNotNull()).distinct()


def replace_patients(
    lake,
    rows: DataFrame,
    table: str,
    keys: list[str],
    patients: DataFrame | None,
    commit_info: dict,
    where: Column | None = None,
    ignore: tuple[str, ...] = (),
    held: DataFrame | None = None,
) -> dict[str, int]:
    """Make ``table``'s rows of ``patients`` (a frame of ``patient_key``; None: every row) that
    ``where`` selects equal to ``rows``, in one commit: new rows inserted, rows that differ (in any
    column but ``ignore``) updated, rows no longer derived (a record withdrawn, two merged into one,
    a patient no longer eligible) deleted; equal rows are not rewritten. When only new rows came
    (a new batch of visits, the usual increment) the commit is an append, with no merge join over
    the table. ``held``: those of ``patients`` the table may hold rows of, where the caller knows
    (the others are new to it), so only their rows are looked up; none, and the table is not read.
    Returns the counts of each, for the job's report."""
    current = lake.read(table)
    if where is not None:
        current = current.where(where)
    if held is not None and held.isEmpty():
        current = current.limit(0)  # new patients only: nothing of theirs to compare with
    elif patients is not None:
        current = current.join(F.broadcast(patients if held is None else held), "patient_key", "left_semi")
    rows, current = rows.persist(), current.persist()
    try:
        r = rows.withColumn(_IN_NEW, F.lit(True)).alias("r")
        c = current.withColumn(_IN_OLD, F.lit(True)).alias("c")
        compared = [n for n in rows.columns if n not in ignore]
        same = F.lit(True)
        for name in compared:
            same = same & F.col(f"r.`{name}`").eqNullSafe(F.col(f"c.`{name}`"))
        on = [F.col(f"r.`{k}`").eqNullSafe(F.col(f"c.`{k}`")) for k in keys]
        status = (
            F.when(F.col(_IN_OLD).isNull(), "inserted")
            .when(F.col(_IN_NEW).isNull(), "deleted")
            .when(same, "unchanged")
            .otherwise("updated")
        )
        found = dict.fromkeys(STATUSES, 0)
        found.update({s: n for s, n in r.join(c, on, "full_outer").groupBy(status).count().collect()})
        if found["updated"] or found["deleted"]:
            gone = c.join(r, on, "left_anti").select(*[F.col(f"c.`{k}`") for k in keys])
            differs = "NOT (" + " AND ".join(f"t.`{n}` <=> s.`{n}`" for n in compared) + ")"
            lake.merge(rows, table, keys, update_when=differs, commit_info=commit_info, delete=gone)
        elif found["inserted"]:
            new = r.join(c, on, "left_anti").select(*[F.col(f"r.`{n}`") for n in rows.columns])
            lake.write(new, table, mode=WriteMode.APPEND, commit_info=commit_info)
    finally:
        rows.unpersist()
        current.unpersist()
    return {s: found[s] for s in STATUSES}


def describe(found: dict[str, int]) -> str:
    """``merged +inserted ~updated -deleted``, as the job reports say it."""
    return f"merged +{found['inserted']:,} ~{found['updated']:,} -{found['deleted']:,}"


_IN_NEW, _IN_OLD = "_ehrlake_in_new", "_ehrlake_in_old"

__all__ = ["changed_patients", "replace_patients", "describe"]
