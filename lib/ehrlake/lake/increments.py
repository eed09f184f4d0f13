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

import uuid

from pyspark.sql import Column, DataFrame, Observation
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, MapType, StructType

from ehrlake.lake import WriteMode

STATUSES = ("inserted", "updated", "deleted")
# what a job did to a derived table, as its report says it (a merge says its counts: :func:`describe`)
REBUILT, UNCHANGED, INCREMENTAL = "rebuilt", "unchanged", "incremental"
# Above this share of the patients to recompute, a job rebuilds instead. A bound, not a measurement:
# a 1% incremental clean cost 0.95x a rebuild at 10k patients and 0.25x at 100k (bench/engines.py).
REBUILD_SHARE = 0.2


def continues(mark, sources: dict[str, int], fingerprint: str) -> bool:
    """Whether a run reading ``sources`` (table -> version) can bring up to date what ``mark``
    (the job's last watermark of a table, or None) recorded: there is one, with the same
    fingerprint and source tables, and no source's version went back (recreated since)."""
    return (
        mark is not None
        and mark.fingerprint == fingerprint
        and set(mark.sources) == set(sources)
        and all(mark.sources[t] <= v for t, v in sources.items())
    )


def changed_patients(
    lake, mark, sources: dict[str, int], fingerprint: str, unkeyed_rebuilds: bool = False
) -> DataFrame | None:
    """Distinct ``patient_key`` of the rows of ``sources`` (table -> version this run reads) in
    data files changed since ``mark`` (the job's last watermark of the table, or None); None when
    the table must be rebuilt instead: the mark does not :func:`continue <continues>`, a source
    has no ``patient_key``, or a log no longer holds the range; with ``unkeyed_rebuilds``, also
    when a changed row has no patient (a derived table that keeps such rows cannot replace them
    by patient)."""
    if not continues(mark, sources, fingerprint):
        return None
    parts = []
    for table, version in sources.items():
        if "patient_key" not in lake.schema(table).fieldNames():
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
    if unkeyed_rebuilds and not union.where(F.col("patient_key").isNull()).isEmpty():
        return None
    return union.where(F.col("patient_key").isNotNull()).distinct()


def too_many(
    lake, patients: DataFrame, population: str, share: float = REBUILD_SHARE, rows: int | None = None
) -> bool:
    """Whether ``patients`` (a persisted frame of ``patient_key``) are more than ``share`` of the
    rows of ``population`` (a table of one row per patient; none yet counts as one): rebuild then.
    ``rows``: the population's, when the caller knows them (from its watermark's counts)."""
    total = rows if rows is not None else lake.row_count(population) if lake.exists(population) else 0
    return patients.count() > share * max(1, total)


def replace_patients(
    lake,
    rows: DataFrame,
    table: str,
    keys: list[str],
    patients: DataFrame | None,
    commit_info: dict,
    where: Column | None = None,
    ignore: tuple[str, ...] = (),
    tally: dict[str, Column] | None = None,
) -> dict:
    """Make ``table``'s rows of ``patients`` (a frame of ``patient_key``; None: every row) that
    ``where`` selects equal to ``rows``, in one commit: new rows inserted, rows that differ (in any
    column but ``ignore``) updated, rows no longer derived (a record withdrawn, two merged into one,
    a patient no longer eligible) deleted; equal rows are not rewritten. When only new rows came
    (a new batch of visits, the usual increment) the commit is an append, with no merge join over
    the table. A caller that knows which recomputed patients are new to the table passes only the
    others as ``patients``: none, and the table is not read at all. Returns the counts of each,
    for the job's report; with ``tally`` (name -> a condition over the table's columns, such as
    "flagged"), also ``tallied``: name -> by how many the table's rows where it holds grew (or
    shrank), so that the report need not count them over the whole table."""
    if patients is not None and patients.isEmpty():
        return _append_new(lake, rows, table, commit_info, tally)
    current = lake.read(table)
    if where is not None:
        current = current.where(where)
    if patients is not None:
        current = current.join(F.broadcast(patients), "patient_key", "left_semi")
    compared = [n for n in rows.columns if n not in ignore]
    rows = rows.persist()
    try:
        # everyone recomputed (a nightly full scoring): most likely a re-run that changes nothing,
        # told without the join; recomputed patients (an increment) most likely changed, so no check
        if patients is None and same_rows(rows, current, compared):
            unchanged = dict.fromkeys(STATUSES, 0)
            return unchanged | ({"tallied": dict.fromkeys(tally, 0)} if tally is not None else {})
        current = current.persist()
        held = _held(tally or {})
        r = rows.withColumn(_IN_NEW, F.lit(True)).withColumn(_HELD_NEW, held).alias("r")
        c = current.withColumn(_IN_OLD, F.lit(True)).withColumn(_HELD_OLD, held).alias("c")
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
        found, tallied = dict.fromkeys(STATUSES, 0), dict.fromkeys(tally or {}, 0)
        # per status: rows, and for each tally the rows where it holds after the change less before
        changes = [
            F.sum(
                F.coalesce(F.col(f"{_HELD_NEW}.`{n}`"), F.lit(0))
                - F.coalesce(F.col(f"{_HELD_OLD}.`{n}`"), F.lit(0))
            )
            for n in tallied
        ]
        outcome = r.join(c, on, "full_outer").groupBy(status.alias("s")).agg(F.count("*"), *changes)
        for s, n, *grew in outcome.collect():
            found[s] = n
            tallied = {name: t + (g or 0) for (name, t), g in zip(tallied.items(), grew, strict=True)}
        if found["updated"] or found["deleted"]:
            gone = c.join(r, on, "left_anti").select(*[F.col(f"c.`{k}`") for k in keys])
            differs = "NOT (" + " AND ".join(f"t.`{n}` <=> s.`{n}`" for n in compared) + ")"
            lake.merge(rows, table, keys, update_when=differs, commit_info=commit_info, delete=gone)
        elif found["inserted"]:
            new = r.join(c, on, "left_anti").select(*[F.col(f"r.`{n}`") for n in rows.columns])
            lake.write(new, table, mode=WriteMode.APPEND, commit_info=commit_info)
    finally:
        rows.unpersist()
        current.unpersist()  # a no-op where it was not persisted
    return {s: found[s] for s in STATUSES} | ({"tallied": tallied} if tally is not None else {})


def same_rows(new: DataFrame, old: DataFrame, columns: list[str]) -> bool:
    """Whether ``new`` and ``old`` hold the same rows of ``columns`` (as multisets), told from their
    row counts and sums of two row hashes (96 bits: a chance of about 1e-29 that different rows
    pass) in one query with no join: aggregated where the rows lie, where a full comparison
    shuffles both sides. False also where a column cannot be hashed (a map) or ``old`` lacks one;
    the caller then compares row by row."""
    if not set(columns) <= set(old.columns) or any(_has_map(new.schema[n].dataType) for n in columns):
        return False
    # a null flag beside each value: Spark's hashes skip nulls, so (null, x) and (x, null) would collide
    values = [v for n in columns for v in (F.isnull(F.col(f"`{n}`")), F.col(f"`{n}`"))]
    wide, narrow = F.xxhash64(*values), F.hash(*values).cast("long")
    low32 = F.lit(0xFFFFFFFF)
    # in 32-bit halves, so that the sums of up to 2^31 rows never overflow a long (ANSI mode)
    sums = [
        F.count("*"),
        F.sum(wide.bitwiseAND(low32)),
        F.sum(F.shiftrightunsigned(wide, 32)),
        F.sum(narrow.bitwiseAND(low32)),
    ]
    ours = new.agg(*[s.alias(f"n{i}") for i, s in enumerate(sums)])
    theirs = old.agg(*[s.alias(f"o{i}") for i, s in enumerate(sums)])
    both = ours.crossJoin(theirs).first()
    half = len(sums)
    return all(both[i] == both[half + i] for i in range(half))


def _has_map(kind) -> bool:
    """Whether a Spark type is or holds a map (which Spark's hash functions refuse)."""
    if isinstance(kind, MapType):
        return True
    if isinstance(kind, ArrayType):
        return _has_map(kind.elementType)
    if isinstance(kind, StructType):
        return any(_has_map(f.dataType) for f in kind.fields)
    return False


def _append_new(
    lake, rows: DataFrame, table: str, commit_info: dict, tally: dict[str, Column] | None
) -> dict:
    """Every row of patients new to ``table``: appended with no comparison (the usual increment)."""
    rows = rows.persist()
    try:
        inserted, held = counted(rows, tally or {})
        if inserted:
            lake.write(rows, table, mode=WriteMode.APPEND, commit_info=commit_info)
    finally:
        rows.unpersist()
    found = {"inserted": inserted, "updated": 0, "deleted": 0}
    return found | ({"tallied": held} if tally is not None else {})


def counted(frame: DataFrame, tally: dict[str, Column]) -> tuple[int, dict[str, int]]:
    """(rows of ``frame``, and for each of ``tally`` the rows where it holds), in one pass."""
    return _as_counts(frame.agg(*_counts(tally)).first(), tally)


def _counts(tally: dict[str, Column]) -> list[Column]:
    """The rows, then for each of ``tally`` (in its order) the rows where it holds."""
    return [
        F.count("*").alias("rows"),
        *[F.sum(_int(c)).alias(f"tally{i}") for i, c in enumerate(tally.values())],
    ]


def _as_counts(values, tally: dict[str, Column]) -> tuple[int, dict[str, int]]:
    """The values of :func:`_counts`, in its order, as (rows, tally name -> rows)."""
    rows, *held = values
    return int(rows), {n: int(h or 0) for n, h in zip(tally, held, strict=True)}


def observed(frame: DataFrame, tally: dict[str, Column]) -> tuple[DataFrame, Observation]:
    """``frame`` counting, as the write that runs it passes its rows, what :func:`counted` counts
    (Spark's observed metrics): a rebuilt table's counts with no second read of it, which on the
    native engine also reconstructs the new version's state (bench/engines.py). Observe the frame
    as written: a step above it that samples its input (a range partitioning) would count twice."""
    observation = Observation(f"ehrlake-tally-{uuid.uuid4().hex}")
    return frame.observe(observation, *_counts(tally)), observation


def observed_counts(observation: Observation, tally: dict[str, Column]) -> tuple[int, dict[str, int]] | None:
    """What :func:`observed` counted, once the observed frame's first action finished; None when
    none did (nothing ran it as one query), for the caller to count the table instead. Never
    waits: the Python API's ``get`` blocks until an action finishes."""
    jvm_observation = observation._jo  # no public way to ask without blocking
    if jvm_observation is None or not jvm_observation.future().isCompleted():
        return None
    return _as_counts(observation.get.values(), tally)


def _int(condition: Column) -> Column:
    """1 where ``condition`` holds, else 0 (null counts as not holding)."""
    return F.coalesce(condition, F.lit(False)).cast("int")


def _held(tally: dict[str, Column]) -> Column:
    """A struct of 1/0, one field per tally: which of them hold on a row."""
    return F.struct(*[_int(c).alias(n) for n, c in tally.items()]) if tally else F.lit(None)


def describe(found: dict[str, int]) -> str:
    """``merged +inserted ~updated -deleted``, as the job reports say it."""
    return f"merged +{found['inserted']:,} ~{found['updated']:,} -{found['deleted']:,}"


_IN_NEW, _IN_OLD = "_ehrlake_in_new", "_ehrlake_in_old"
_HELD_NEW, _HELD_OLD = "_ehrlake_tally_new", "_ehrlake_tally_old"

__all__ = [
    "REBUILT",
    "UNCHANGED",
    "INCREMENTAL",
    "REBUILD_SHARE",
    "continues",
    "changed_patients",
    "too_many",
    "replace_patients",
    "counted",
    "observed",
    "observed_counts",
    "describe",
]
