"""The clean job: every source's mapping applied, normalised, deduplicated and flagged, each
silver table rewritten as one new Delta version (see :mod:`ehrlake.clean`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.clean import codes, units
from ehrlake.clean.mappings import Mapping, load_mappings, mapping_files
from ehrlake.clean.model import ENTITIES, Entity
from ehrlake.errors import ConfigError
from ehrlake.lake import WriteMode
from ehrlake.security.protection import Sealing
from ehrlake.views import ISSUES


@dataclass
class CleanReport:
    run_id: str
    rows: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)  # entity -> sources that fed it

    def format(self) -> str:
        lines = [f"clean run {self.run_id}", f"{'table':<20} {'rows':>10} {'flagged':>9}  sources"]
        for name in self.rows:
            lines.append(
                f"silver.{name:<13} {self.rows[name]:>10,} {self.flagged.get(name, 0):>9,}  "
                + ", ".join(self.sources.get(name, []))
            )
        return "\n".join(lines)


def run(
    lake,
    mappings: list[Mapping] | None = None,
    run_id: str | None = None,
    today: dt.date | None = None,
    role: str | None = None,
    cluster: bool = True,
) -> CleanReport:
    """Rebuild every silver table from the bronze tables that exist (see module docstring), as
    ``role`` (it must be allowed to write silver; the tables written are audited). ``cluster``:
    each patient's rows together (:func:`_by_patient`); off only to measure what it buys."""
    mappings = mappings if mappings is not None else [m for p in mapping_files() for m in load_mappings(p)]
    run_id = run_id or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    if lake.security is None:
        raise ConfigError("clean opens sealed birth dates to compute ages: open the lake with its security")
    with lake.security.job("clean", ["silver"], role, run_id) as (_, written):
        report = _clean(lake, mappings, run_id, today or dt.date.today(), cluster)
        written += [(f"silver.{name}", f"{rows} rows") for name, rows in report.rows.items()]
    return report


def _clean(lake, mappings: list[Mapping], run_id: str, today: dt.date, cluster: bool) -> CleanReport:
    report = CleanReport(run_id)
    frames: dict[str, DataFrame] = {}
    for name, entity in ENTITIES.items():
        parts = [
            (m.source, _mapped(lake, m, entity))
            for m in mappings
            if m.entity == name and lake.exists(m.table)
        ]
        if not parts:
            continue
        report.sources[name] = list(dict.fromkeys(s for s, _ in parts))
        union = parts[0][1]
        for _, frame in parts[1:]:
            union = union.unionByName(frame)
        frames[name] = union
    tables = {}
    if "imaging" in frames:  # images need no patient table: a public image set has no patients
        tables["imaging"] = _dedupe(frames.pop("imaging"), ENTITIES["imaging"])
    if "patient" in frames:
        _clinical(lake, frames, mappings, tables, today)
    commit = {"ehrlakeJob": "clean", "ehrlakeRunId": run_id}
    for name, frame in tables.items():
        entity = ENTITIES[name]
        out = frame.select(*[F.col(f.name).cast(f.type).alias(f.name) for f in entity.fields])
        if name == "imaging":
            out = _image_layout(out)
        elif cluster and "patient_key" in out.columns:
            out = _by_patient(out)
        lake.write(out, entity.table, mode=WriteMode.OVERWRITE, commit_info=commit)
        counts = (
            lake.read(entity.table)
            .agg(
                F.count("*").alias("rows"),
                F.sum(F.when(F.size("quality_flags") > 0, 1).otherwise(0)).alias("flagged")
                if "quality_flags" in out.columns
                else F.lit(0).alias("flagged"),
            )
            .first()
        )
        report.rows[name], report.flagged[name] = int(counts["rows"]), int(counts["flagged"] or 0)
    return report


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


def _clinical(lake, frames: dict[str, DataFrame], mappings, tables: dict[str, DataFrame], today) -> None:
    """Patients first (ages need birth dates), then facilities (regions), then every event table."""
    births = _birth_dates(lake, mappings)
    patients = _patients(frames["patient"], births, today)
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


def _mapped(lake, mapping: Mapping, entity: Entity) -> DataFrame:
    """The bronze table through one mapping, cast to the silver types; unmapped columns are null."""
    df = lake.read(mapping.table)
    for join in mapping.joins:
        if not lake.exists(join.table):
            raise ConfigError(
                f"mapping {mapping.source}.{mapping.entity}: joined table {join.table} does not exist"
            )
        other = lake.read(join.table).select(*join.using, *join.columns).dropDuplicates(list(join.using))
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


def _birth_dates(lake, mappings: list[Mapping]) -> DataFrame | None:
    """patient_key -> exact birth date, opened from the sealed bronze column for computing ages
    inside this job only (it is never written to silver)."""
    tables = {"bronze.fhir_patient": "birth_date", "bronze.synthea_patients": "birthdate"}
    parts = []
    for table, column in tables.items():
        if not lake.exists(table):
            continue
        df = lake.read(table)
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
