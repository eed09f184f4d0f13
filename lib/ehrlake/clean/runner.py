"""The clean job: every source's mapping applied, normalised, deduplicated and flagged, each
silver table rewritten as one new Delta version (see :mod:`ehrlake.clean`)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.clean import codes, notes, origin, units
from ehrlake.clean.mappings import Mapping, load_mappings, mapping_files
from ehrlake.clean.model import ENTITIES, Entity
from ehrlake.errors import ConfigError
from ehrlake.lake import WriteMode, increments, locks, watermarks
from ehrlake.lake.increments import INCREMENTAL, REBUILT, UNCHANGED
from ehrlake.security.protection import Sealing
from ehrlake.session import side_by_side
from ehrlake.views import ISSUES


@dataclass
class CleanReport:
    run_id: str
    rows: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)  # entity -> sources that fed it
    how: dict[str, str] = field(default_factory=dict)  # entity -> rebuilt / unchanged / what a merge did
    # entity -> what rows and flagged say, at the table version they were counted at, for the next run
    counts: dict[str, watermarks.Counts] = field(default_factory=dict)

    def format(self) -> str:
        lines = [
            f"clean run {self.run_id}",
            f"{'table':<20} {'rows':>10} {'flagged':>9}  {'how':<32} sources",
        ]
        for name in self.rows:
            lines.append(
                f"silver.{name:<13} {self.rows[name]:>10,} {self.flagged.get(name, 0):>9,}  "
                f"{self.how.get(name, REBUILT):<32} " + ", ".join(self.sources.get(name, []))
            )
        return "\n".join(lines)


JOB = "clean"
BIRTH_DATES = {"bronze.fhir_patient": "birth_date", "bronze.synthea_patients": "birthdate"}
HERE = Path(__file__).parent  # the clean package: its code is part of the fingerprint


def run(
    lake,
    mappings: list[Mapping] | None = None,
    run_id: str | None = None,
    today: dt.date | None = None,
    role: str | None = None,
    cluster: bool = True,
    incremental: bool = False,
    rebuild_share: float = increments.REBUILD_SHARE,
) -> CleanReport:
    """Rebuild every silver table from the bronze tables that exist (see module docstring), as
    ``role`` (it must be allowed to write silver; the tables written are audited). ``cluster``:
    each patient's rows together (:func:`_by_patient`); off only to measure what it buys.

    ``incremental``: recompute only the patients whose bronze rows changed since the versions the
    last run read (``ops.watermarks``), and merge their rows into silver; a table that cannot be
    brought up to date so (first run, changed mapping, a changed table without patients such as
    organizations, more than ``rebuild_share`` of the patients changed) is rebuilt."""
    mappings = mappings if mappings is not None else [m for p in mapping_files() for m in load_mappings(p)]
    run_id = run_id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    if lake.security is None:
        raise ConfigError("clean opens sealed birth dates to compute ages: open the lake with its security")
    with locks.alone(lake.root, JOB), lake.security.job(JOB, ["silver"], role, run_id) as (_, written):
        report = _clean(
            lake, mappings, run_id, today or dt.date.today(), cluster, incremental and rebuild_share
        )
        written += [
            (f"silver.{name}", f"{rows} rows, {report.how[name]}") for name, rows in report.rows.items()
        ]
    return report


@dataclass
class _Plan:
    """What one run does to a group of silver tables that share sources (imaging; the clinical rest)."""

    tables: list[str]  # entity names
    sources: dict[str, int]  # bronze table -> version this run reads
    how: dict[str, str] = field(default_factory=dict)  # entity -> REBUILT / UNCHANGED / INCREMENTAL
    # incremental: the patients to recompute (persisted); those of them silver already holds
    # (persisted), whose older bronze rows a scan must find, and how many; the versions last read
    patients: DataFrame | None = None
    known: DataFrame | None = None
    known_count: int = 0
    since: dict[str, int] = field(default_factory=dict)

    def release(self) -> None:
        for frame in (self.patients, self.known):
            if frame is not None:
                frame.unpersist()


def _clean(lake, mappings, run_id: str, today: dt.date, cluster: bool, incremental: float) -> CleanReport:
    """``incremental``: the share of patients changed above which to rebuild; 0: always rebuild."""
    read_at = _source_versions(lake, mappings)  # every read below is of these versions
    produced = [n for n in ENTITIES if any(m.entity == n and m.table in read_at for m in mappings)]
    fp = watermarks.fingerprint(sorted(mappings, key=repr), watermarks.code(HERE))
    marks = watermarks.read(lake, JOB) if incremental else {}
    plans = [
        _plan(
            lake,
            mappings,
            [n for n in produced if (n == "imaging") == imaging],
            _sources(mappings, read_at, imaging),
            fp,
            marks,
            incremental,
        )
        for imaging in (True, False)
    ]
    try:
        report = _build(lake, mappings, read_at, plans, marks, run_id, today, cluster)
        copies = origin.refresh(lake, run_id, JOB, marks.get(origin.TABLE), fp)
        if copies is not None:
            report.how[origin.NAME], report.rows[origin.NAME], _ = copies
            report.sources[origin.NAME] = [origin.SOURCE]
        for name, (rows, sources, how) in (notes.refresh(lake, run_id, incremental, JOB) or {}).items():
            report.rows[name], report.sources[name], report.how[name] = rows, sources, how
        watermarks.record(
            lake,
            [
                watermarks.Watermark(
                    JOB,
                    ENTITIES[name].table,
                    plan.sources,
                    fp,
                    run_id,
                    report.counts[name],
                )
                for plan in plans
                for name in plan.tables
            ]
            + ([copies[2]] if copies is not None else []),
            {"ehrlakeJob": JOB, "ehrlakeRunId": run_id},
        )
        return report
    finally:
        for plan in plans:
            plan.release()


def _plan(lake, mappings, tables: list[str], sources: dict[str, int], fp: str, marks, incremental) -> _Plan:
    """Rebuild, leave or merge each table: from its watermark (``marks``, empty for a rebuild) and
    what changed in bronze since."""
    plan = _Plan(tables, sources)
    if not tables:
        return plan
    behind = []
    for name in tables:
        mark = marks.get(ENTITIES[name].table)
        if not increments.continues(mark, sources, fp) or not lake.exists(ENTITIES[name].table):
            plan.how = dict.fromkeys(tables, REBUILT)
            return plan
        plan.how[name] = UNCHANGED
        if mark.sources != sources:
            plan.how[name] = INCREMENTAL
            behind.append(mark.sources)
    if not behind:
        return plan
    changed = _changed_patients(lake, mappings, behind, sources)
    if changed is None or "patient" not in tables:
        plan.how = dict.fromkeys(tables, REBUILT)
        return plan
    plan.patients = changed[0].persist()
    population = ENTITIES["patient"].table
    counted = _carried(lake, population, marks.get(population), None, {})  # the last run's, if still so
    if increments.too_many(lake, plan.patients, population, incremental, counted and counted.rows):
        plan.how = dict.fromkeys(tables, REBUILT)
        return plan
    if not changed[1] and "organization" in tables:
        plan.how["organization"] = UNCHANGED
    plan.since = {t: min(mark[t] for mark in behind) for t in sources}
    # a snapshot: the plan must say what silver held *before* this run writes it. ``known`` read at
    # the latest version counted the patients the run had just appended as known once its cache was
    # rebuilt, and the event tables that followed took no rows of the batch's new patients
    # (bench/engines.py at 10,000 patients lost them all).
    # Each table's keys are semi-joined to the changed patients (persisted and counted, so Spark
    # broadcasts them when few), and only the matches are made distinct: a distinct over every key
    # of silver first cost more as the lake grew.
    # Every row of an event table is of a patient silver.patient holds, or flagged unknown_patient:
    # a table whose last counts hold no such row (and that no one wrote since) need not be read.
    held = [
        lake.snapshot(ENTITIES[n].table).select("patient_key").join(plan.patients, "patient_key", "left_semi")
        for n in tables
        if n == "patient" or n != "organization" and not _all_known(lake, marks.get(ENTITIES[n].table))
    ]
    known = held[0]
    for frame in held[1:]:
        known = known.unionByName(frame)
    plan.known = known.distinct().persist()
    plan.known_count = plan.known.count()
    return plan


def _all_known(lake, mark) -> bool:
    """Whether every row of ``mark``'s table is of a patient silver.patient holds: the last run
    counted none flagged unknown_patient, and the table is still at the version it counted."""
    counts = mark.counts if mark is not None else None
    return (
        counts is not None and counts.tallies.get(UNKNOWN) == 0 and lake.version(mark.table) == counts.version
    )


def _bronze(lake, table: str, read_at: _Pinned, plan: _Plan | None) -> DataFrame:
    """A bronze table at its version in ``read_at``; with an incremental ``plan``, only its rows of
    the plan's patients. A patient silver does not hold yet has every row that counts in the files
    added since the last clean (an older row of theirs was filtered out by its mapping, or they
    would be in silver), so only those files are read for them; the table is scanned (a semi-join)
    only when patients silver knows changed, for their older rows."""
    full = read_at.frame(lake, table)
    if plan is None:
        return full
    if "patient_key" not in full.columns:
        return full  # a joined dictionary: a change in it rebuilds (_changed_patients)
    added = lake.changed_rows(table, plan.since[table], until=read_at[table], added_only=True)
    if added is None:
        return full.join(F.broadcast(plan.patients), "patient_key", "left_semi")
    fresh = plan.patients.join(plan.known, "patient_key", "left_anti")
    rows = added.join(F.broadcast(fresh), "patient_key", "left_semi")
    rows = rows.unionByName(full.limit(0), allowMissingColumns=True).select(*full.columns)
    if plan.known_count:
        rows = rows.unionByName(full.join(F.broadcast(plan.known), "patient_key", "left_semi"))
    return rows


def _changed_patients(lake, mappings, behind: list[dict[str, int]], now: dict[str, int]):
    """(distinct ``patient_key`` of the bronze rows changed since each of the ``behind`` marks, and
    of patients with encounters at a changed organization; whether organizations changed), or
    None when a changed table is neither (a lab dictionary, a code table) or its log is gone."""
    organizations = {m.table: m for m in mappings if m.entity == "organization"}
    parts, orgs = [], []
    for mark in {json.dumps(m, sort_keys=True): m for m in behind}.values():
        for table, version in now.items():
            if mark[table] == version:
                continue
            columns = lake.schema(table).fieldNames()
            wanted = ["patient_key"] if "patient_key" in columns else columns
            if "patient_key" not in columns and table not in organizations:
                return None
            rows = lake.changed_rows(table, mark[table], wanted, until=version)
            if rows is None:
                return None
            if "patient_key" in columns:
                parts.append(rows)
            else:
                mapped = _mapped(lake, organizations[table], ENTITIES["organization"], now, rows)
                orgs.append(mapped.select("source_system", "organization_id"))
    if orgs and lake.exists(ENTITIES["encounter"].table):  # an organization's state is its encounters'
        moved = orgs[0]
        for org in orgs[1:]:
            moved = moved.unionByName(org)
        # encounters silver holds; a new one's patient is among the changed already
        at = ["source_system", "organization_id"]
        visits = lake.snapshot(ENTITIES["encounter"].table).select("patient_key", *at)  # as in _plan
        parts.append(visits.join(moved, at, "left_semi").select("patient_key"))
    union = parts[0] if parts else lake.spark.createDataFrame([], "patient_key string")
    for p in parts[1:]:
        union = union.unionByName(p)
    return union.where(F.col("patient_key").isNotNull()).distinct(), bool(orgs)


def _read_tables(mappings: list[Mapping]) -> set[str]:
    """The bronze tables these mappings read: each one's own and the ones it joins."""
    return {t for m in mappings for t in (m.table, *[j.table for j in m.joins])}


class _Pinned(dict):
    """Bronze table -> the version this run reads, and one frame per table at that version for
    the whole run. Each read at a version makes Delta build a snapshot of its own (a log replay,
    then a file listing for every scan of it); one frame reused keeps one snapshot, whose file
    list Delta keeps."""

    def __init__(self, versions: dict[str, int]):
        super().__init__(versions)
        self._frames: dict[str, DataFrame] = {}

    def only(self, tables: set[str]) -> _Pinned:
        """The versions of ``tables``, sharing this run's frames."""
        part = _Pinned({t: v for t, v in self.items() if t in tables})
        part._frames = self._frames
        return part

    def frame(self, lake, table: str) -> DataFrame:
        if table not in self._frames:
            self._frames[table] = lake.read(table, version=self[table])
        return self._frames[table]


def _source_versions(lake, mappings: list[Mapping]) -> _Pinned:
    tables = _read_tables(mappings) | set(BIRTH_DATES)
    return _Pinned({t: lake.version(t) for t in sorted(tables) if lake.exists(t)})


def _sources(mappings: list[Mapping], read_at: _Pinned, imaging: bool) -> _Pinned:
    """The bronze tables (and versions) one group's tables are built from."""
    tables = _read_tables([m for m in mappings if (m.entity == "imaging") == imaging])
    if not imaging:
        tables |= set(BIRTH_DATES)
    return read_at.only(tables)


def _build(lake, mappings, read_at, plans: list[_Plan], marks, run_id, today, cluster) -> CleanReport:
    report = CleanReport(run_id)
    clinical = plans[1]  # imaging has no patients to scope
    scope = clinical.patients if INCREMENTAL in clinical.how.values() else None
    frames: dict[str, DataFrame] = {}
    for name, entity in ENTITIES.items():
        parts = [
            (
                m.source,
                _mapped(
                    lake, m, entity, read_at, rows=_bronze(lake, m.table, read_at, _narrows(clinical, m))
                ),
            )
            for m in mappings
            if m.entity == name and m.table in read_at
        ]
        if not parts:
            continue
        report.sources[name] = list(dict.fromkeys(s for s, _ in parts))
        union = parts[0][1]
        for _, frame in parts[1:]:
            union = union.unionByName(frame)
        if scope is not None and name in clinical.tables and "patient_key" in union.columns:
            union = union.join(scope, "patient_key", "left_semi")
        frames[name] = union
    tables = {}
    if "imaging" in frames:  # images need no patient table: a public image set has no patients
        tables["imaging"] = _dedupe(frames.pop("imaging"), ENTITIES["imaging"])
    held: list[DataFrame] = []
    try:
        if "patient" in frames:
            _clinical(lake, frames, tables, today, read_at, clinical if scope is not None else None, held)
        _write(lake, tables, plans, marks, read_at, run_id, cluster, report)
    finally:
        for frame in held:
            frame.unpersist()
    return report


def _narrows(plan: _Plan, mapping: Mapping) -> _Plan | None:
    """``plan`` where it narrows what ``mapping`` reads: an incremental run, one of its tables,
    and a mapping whose ``patient_key`` is its bronze table's own (not one computed or joined)."""
    scoped = INCREMENTAL in plan.how.values() and mapping.entity in plan.tables
    return plan if scoped and mapping.columns.get("patient_key") == "patient_key" else None


def _write(lake, tables, plans, marks, read_at, run_id, cluster, report: CleanReport) -> None:
    how = {name: h for plan in plans for name, h in plan.how.items()}
    clinical = plans[1]  # the one group that merges (imaging has no patients to scope)
    commit = {
        "ehrlakeJob": JOB,
        "ehrlakeRunId": run_id,
        "ehrlakeSources": json.dumps(read_at, sort_keys=True),
    }

    def one(item: tuple[str, DataFrame]) -> tuple[str, watermarks.Counts]:
        """Write one table; (what was done, its counts after it)."""
        name, frame = item
        entity = ENTITIES[name]
        out = frame.select(*[F.col(f.name).cast(f.type).alias(f.name) for f in entity.fields])
        tally = _tallies(out.columns)
        done, found = how[name], None
        if done == INCREMENTAL:  # organizations (no patient_key): the whole small table compared
            # only the recomputed patients silver holds have rows there to compare with
            patients = clinical.known if "patient_key" in out.columns else None
            found = increments.replace_patients(
                lake, out, entity.table, list(entity.keys), patients, commit, tally=tally
            )
            done = increments.describe(found)
        elif done == REBUILT:
            if name == "imaging":
                out = _image_layout(out)
            elif cluster and "patient_key" in out.columns:
                out = _by_patient(out)
            out, observation = increments.observed(out, tally)
            written = lake.write(out, entity.table, mode=WriteMode.OVERWRITE, commit_info=commit)
            seen = increments.observed_counts(observation, tally)
            if seen is not None:  # what the overwrite wrote is the table at its version
                return done, watermarks.Counts(written.version, seen[0], seen[1])
        mark = marks.get(entity.table) if done != REBUILT else None
        counts = _carried(lake, entity.table, mark, found, tally) or _counted(lake, entity.table, tally)
        return done, counts

    # An increment's tables are small: each one's jobs are mostly planning and commits, so they
    # run side by side. A rebuild's each fill the cores (and sort by patient), so one at a time:
    # side by side, a 100,000-patient rebuild took 82.4-82.6 s against 81.5-81.8 s (2026-12-06).
    items = list(tables.items())
    merging = INCREMENTAL in how.values()
    done = side_by_side(one, items, "clean-table") if merging else [one(item) for item in items]
    for (name, _), (what, counts) in zip(items, done, strict=True):
        how[name], report.rows[name], report.flagged[name] = what, counts.rows, counts.tallies.get(FLAGGED, 0)
        report.counts[name] = counts
    report.how = {name: how[name] for name in report.rows}


def _tallies(columns: list[str]) -> dict[str, Column]:
    """What is counted in a table besides its rows: the rows with any quality flag (the report's),
    and those of patients silver.patient does not hold (the next incremental plan's)."""
    if "quality_flags" not in columns:
        return {}
    return {
        FLAGGED: F.size("quality_flags") > 0,
        UNKNOWN: F.array_contains("quality_flags", "unknown_patient"),
    }


FLAGGED, UNKNOWN = "flagged", "unknown_patient"


def _carried(
    lake, table: str, mark, found: dict | None, tally: dict[str, Column]
) -> watermarks.Counts | None:
    """The counts ``mark`` recorded, plus what this run's merge ``found`` changed (None: the table
    was left as it was; its ``tallied``: each tally's rows added less those removed), when the
    table's log shows no other writer since: it is at the mark's version, plus the one commit of
    this run's merge if that changed anything. Otherwise None: count it."""
    if mark is None or mark.counts is None or not set(tally) <= set(mark.counts.tallies):
        return None
    changes = found or dict.fromkeys(increments.STATUSES, 0)
    wrote = any(changes[s] for s in increments.STATUSES)
    version = lake.version(table)
    if version != mark.counts.version + wrote:
        return None
    rows = mark.counts.rows + changes["inserted"] - changes["deleted"]
    grew = changes.get("tallied", {})
    return watermarks.Counts(version, rows, {n: mark.counts.tallies[n] + grew.get(n, 0) for n in tally})


def _counted(lake, table: str, tally: dict[str, Column]) -> watermarks.Counts:
    """The table's rows, and those where each ``tally`` holds, counted at its latest version."""
    version = lake.version(table)
    rows, held = increments.counted(lake.read(table, version=version), tally)
    return watermarks.Counts(version, rows, held)


def _by_patient(table: DataFrame) -> DataFrame:
    """Rows range-partitioned and sorted by ``patient_key``, so each file (and each Parquet row group)
    holds a narrow band of patients: a reader after one patient (a clinician's review, a record
    update, SQL ``WHERE patient_key = ...``) skips the other files by their min/max statistics, as
    Z-ordering on one column would, with no second pass over the table (bench/clustering.py)."""
    return table.repartitionByRange("patient_key").sortWithinPartitions("patient_key")


def _image_layout(images: DataFrame) -> DataFrame:
    """Images in files of ``runtime.images_per_file`` rows, range-ordered by source system and split:
    a training selection (one image set, one split) then reads few files, their statistics let the
    others be skipped, and there are enough files to shard between training workers."""
    from ehrlake.dl.runtime import load

    per_file = load().images_per_file
    files = max(1, -(-images.count() // per_file))
    return images.repartitionByRange(files, "source_system", "split", "image_id").sortWithinPartitions(
        "source_system", "split", "image_id"
    )


def _clinical(lake, frames: dict[str, DataFrame], tables, today, read_at, plan: _Plan | None, held) -> None:
    """Patients first (ages need birth dates), then facilities (regions), then every event table.
    With an incremental ``plan``, its few patients are kept in memory for every event table
    (appended to ``held`` for the caller to release) instead of read and decrypted for each."""
    births = _birth_dates(lake, read_at, plan)
    patients = _patients(frames["patient"], births, today)
    if plan is not None:
        patients = patients.persist()
        held.append(patients)
    tables["patient"] = patients
    regions = None
    if "organization" in frames:
        orgs = frames["organization"].withColumn(
            "state", codes.normalise_state(F.col("state"), F.col("country"))
        )
        tables["organization"] = _dedupe(orgs, ENTITIES["organization"])
        regions = tables["organization"].select(
            "source_system", "organization_id", F.col("state").alias("_org_state")
        )
    for name, frame in frames.items():
        if name in tables:
            continue
        tables[name] = _events(frame, ENTITIES[name], patients, births, regions, today)


def _mapped(lake, mapping: Mapping, entity: Entity, read_at: _Pinned, rows=None) -> DataFrame:
    """The bronze table (at the version in ``read_at``; or only ``rows`` of it) through one
    mapping, cast to the silver types; unmapped columns are null."""
    df = read_at.frame(lake, mapping.table) if rows is None else rows
    for join in mapping.joins:
        if not lake.exists(join.table):
            raise ConfigError(
                f"mapping {mapping.source}.{mapping.entity}: joined table {join.table} does not exist"
            )
        other = (
            read_at.frame(lake, join.table)
            .select(*join.using, *join.columns)
            .dropDuplicates(list(join.using))
        )
        df = df.join(other, list(join.using), "left")
    if mapping.lateral:
        df = df.selectExpr("*", mapping.lateral)
    if mapping.where:
        df = df.where(mapping.where)
    columns = []
    for f in entity.mapped:
        expr = mapping.columns.get(f.name)
        if f.name == "source":
            value = F.lit(mapping.source)
        elif expr is None:
            value = F.lit(None)
        else:
            try:
                value = F.expr(expr)
            except Exception as exc:  # a syntax error names the mapping, not a Spark internal
                raise ConfigError(
                    f"mapping {mapping.source}.{mapping.entity}.{f.name}: {expr!r}: {exc}"
                ) from exc
        columns.append(value.cast(f.type).alias(f.name))
    # a bronze row whose source fields could not all be read as FHIR R4 (ingest's conformance_issues)
    issues = F.size(ISSUES) > 0 if ISSUES in df.columns else F.lit(False)
    return df.select(*columns, issues.alias(SOURCE_ISSUES))


def _birth_dates(lake, read_at: _Pinned, plan: _Plan | None) -> DataFrame | None:
    """patient_key -> exact birth date, opened from the sealed bronze column for computing ages
    inside this job only (it is never written to silver); only an incremental ``plan``'s patients
    where given."""
    parts = []
    for table, column in BIRTH_DATES.items():
        if table not in read_at:
            continue
        df = _bronze(lake, table, read_at, plan)
        sealing = Sealing.of(df.schema)
        keys = list(sealing.keys) if sealing else []
        df = df.select(*{*keys, "patient_key", column})
        if sealing and column in sealing.columns:
            df = lake.security.protector.open(df, table, sealing.only([column]))
        parts.append(df.select("patient_key", F.col(column).cast("date").alias("_birth_date")))
    if not parts:
        return None
    union = parts[0]
    for p in parts[1:]:
        union = union.unionByName(p)
    return union.groupBy("patient_key").agg(F.min("_birth_date").alias("_birth_date"))


def _dedupe(df: DataFrame, entity: Entity) -> DataFrame:
    """One row per key, deterministically: the most complete row, ties broken by content."""
    completeness = sum(F.col(c).isNotNull().cast("int") for c in df.columns)
    order = [completeness.desc(), *[F.col(c).asc_nulls_last() for c in df.columns if c not in entity.keys]]
    window = Window.partitionBy(*entity.keys).orderBy(*order)
    return df.withColumn("_rank", F.row_number().over(window)).where("_rank = 1").drop("_rank")


SOURCE_ISSUES = "_source_issues"  # carried from _mapped to the flags, never written


def _flags(*conditions: tuple[str, Column]) -> Column:
    """array of the names whose condition holds (nulls count as not holding)."""
    return F.filter(
        F.array(*[F.when(F.coalesce(cond, F.lit(False)), F.lit(name)) for name, cond in conditions]),
        lambda x: x.isNotNull(),
    )


def _patients(df: DataFrame, births: DataFrame | None, today: dt.date) -> DataFrame:
    df = df.withColumn("gender", codes.normalise_gender(F.col("gender")))
    df = df.withColumn("state", codes.normalise_state(F.col("state"), F.col("country")))
    df = _dedupe(df, ENTITIES["patient"])
    if births is not None:
        df = df.join(births, "patient_key", "left")
    else:
        df = df.withColumn("_birth_date", F.lit(None).cast("date"))
    future = F.lit(today)
    flags = _flags(
        ("future_date", (F.col("death_date") > future) | (F.col("birth_year") > F.year(future))),
        ("after_death", F.col("death_date") < F.col("_birth_date")),
        ("source_nonconformant", F.col(SOURCE_ISSUES)),
    )
    return df.withColumn("quality_flags", flags)


def _events(df, entity: Entity, patients, births, regions, today: dt.date) -> DataFrame:
    """Normalise codes/units, dedupe, derive age and length of stay, flag inconsistencies."""
    if "code_system" in df.columns:
        df = df.withColumn("code_system", codes.normalise_system(F.col("code_system")))
        df = df.withColumn("code", codes.normalise_code(F.col("code_system"), F.col("code")))
    implausible = F.lit(False)
    if entity.name == "observation":
        value, unit, implausible = units.normalise(F.col("code"), F.col("source_value"), F.col("source_unit"))
        df = (
            df.withColumn("value_number", value)
            .withColumn("unit", unit)
            .withColumn("_implausible", implausible)
        )
        implausible = F.col("_implausible")
    if entity.name == "encounter":
        df = df.withColumn("encounter_class", codes.normalise_encounter_class(F.col("encounter_class")))
    df = _dedupe(df, entity)
    people = patients.select(
        "patient_key",
        F.col("_birth_date"),
        F.coalesce("_birth_date", F.make_date("birth_year", F.lit(7), F.lit(1))).alias("_age_from"),
        F.col("death_date").alias("_death_date"),
        F.col("state").alias("_patient_state"),
        F.lit(True).alias("_known"),
    )
    df = df.join(people, "patient_key", "left")
    start = F.col(entity.event_time)
    age_field = next(f.name for f in entity.fields if f.name.startswith("age_at_"))
    df = df.withColumn(age_field, F.floor(F.months_between(start, F.col("_age_from")) / 12).cast("int"))
    end_before_start = F.lit(False)
    if entity.end_time:
        end_before_start = F.col(entity.end_time) < start
    if entity.name == "encounter":
        df = df.withColumn(
            "length_of_stay_days",
            F.coalesce(
                F.col("length_of_stay_days"),
                (F.unix_timestamp(entity.end_time) - F.unix_timestamp(entity.event_time)) / 86400.0,
            ),
        )
        if regions is not None:
            df = df.join(regions, ["source_system", "organization_id"], "left")
        else:
            df = df.withColumn("_org_state", F.lit(None).cast("string"))
        df = df.withColumn("state", F.coalesce("_org_state", "_patient_state"))
    tomorrow = F.date_add(F.lit(today), 1).cast("timestamp")
    flags = _flags(
        ("before_birth", F.to_date(start) < F.col("_birth_date")),
        ("after_death", F.to_date(start) > F.col("_death_date")),
        ("end_before_start", end_before_start),
        ("future_date", start >= tomorrow),
        ("implausible_value", implausible),
        ("unknown_patient", F.col("_known").isNull()),
        ("source_nonconformant", F.col(SOURCE_ISSUES)),
    )
    return df.withColumn("quality_flags", flags)
