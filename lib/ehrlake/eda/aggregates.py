"""Gold aggregates for public-health analysts, computed in Spark from silver and suppressed.

Every table is one row per cell of its dimensions, with the count of *persons* (not records) in the
cell, derived rates, and ``suppressed`` (``primary`` / ``complementary`` / null): counts under k are
hidden together with enough other cells that no hidden count can be recovered from totals
(``suppression.py``). Region is the state; ``(unknown)`` where a record carries none.

- ``gold.eda_demographics``: persons by age band x sex x state (age on the reference date);
- ``gold.eda_condition_prevalence``: persons with each of the top conditions, by year x state, and
  per 1,000 persons seen that year in that state;
- ``gold.eda_utilisation``: encounters per 1,000 persons by class x year x state, mean length of
  stay, and the 30-day readmission rate of inpatient stays;
- ``gold.eda_readmission_by_facility``: inpatient stays and 30-day readmission rate per facility
  and year (a rate whose numerator is under k is hidden);
- ``gold.eda_nfhs5_comparison``: the population against NFHS-5 state indicators (``nfhs.py``).
"""

from __future__ import annotations

import datetime as dt
import threading

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake import encounters
from ehrlake.eda import nfhs
from ehrlake.eda.suppression import as_spark, bounded_cells, local_frame, suppressed_cells
from ehrlake.lake import WriteMode
from ehrlake.session import side_by_side

AGE_BANDS = ((0, 4), (5, 14), (15, 24), (25, 44), (45, 64), (65, 74), (75, 84), (85, 200))
UNKNOWN = "(unknown)"


def age_band(age) -> F.Column:
    band = F.lit(None).cast("string")
    for low, high in reversed(AGE_BANDS):
        label = f"{low}+" if high >= 200 else f"{low}-{high}"
        band = F.when((age >= low) & (age <= high), F.lit(label)).otherwise(band)
    return F.coalesce(band, F.lit(UNKNOWN))


def _region(column: str = "state") -> F.Column:
    return F.coalesce(F.col(column), F.lit(UNKNOWN))


# Tables by state also come as national tables (state summed out), each suppressed on its own. That
# discloses nothing more: the suppression audit already assumes every marginal total of the state
# table is known, and a national cell is exactly such a total. Without them, a country-wide figure
# drawn from the state table would add up hidden cells as zeros (or hide nearly everything).
NATIONAL = "_national"


def demographics(lake, reference: dt.date, by_state: bool = True) -> DataFrame:
    people = lake.read("silver.patient").where("NOT coalesce(deceased, false)")
    age = F.lit(reference.year) - F.col("birth_year")
    dims = ["age_band", "sex", *(["state"] if by_state else [])]
    counts = (
        people.select(age_band(age).alias("age_band"), F.col("gender").alias("sex"), _region().alias("state"))
        .groupBy(*dims)
        .agg(F.count("*").alias("persons"))
    )
    return _full_grid(counts, dims, "persons")


def _full_grid(df: DataFrame, dims: list[str], count: str) -> DataFrame:
    """Every combination of the dimensions' values, zero where absent: suppression must see the
    zeros a published table would show (a small cell beside zeros is otherwise easy to solve).

    The aggregate ``df`` is computed once, on the driver (bounded: a table of more cells is not
    publishable), and the grid built there: crossing each dimension's distinct values in Spark ran
    the aggregate again for every dimension and the join (utilisation: nine scans of encounters)."""
    cells = bounded_cells(df)
    values = [cells[d].drop_duplicates() for d in dims]
    grid = pd.MultiIndex.from_product(values, names=dims).to_frame(index=False)
    full = grid.merge(cells, on=dims, how="left")
    full[count] = full[count].fillna(0)
    return local_frame(df, full[df.columns])


# SNOMED semantic tags of records that are not diseases: Synthea records employment, education,
# stress or "medication review due" as conditions; they would crowd the disorders out of a top list
NOT_DISEASES = r"\((finding|situation|person|event|regime/therapy|procedure)\)\s*$"


class Shared:
    """What several tables of one run read, computed once: the persons seen per year (and state),
    three tables' denominator; the top conditions' persons at both levels (two tables); the
    inpatient stays of the years shown with their readmission outcome (two tables).

    Each is a frame made on first use, persisted when ``cache`` (a run; it ends with
    :meth:`close`). Tables are built side by side, so under a lock; Spark then computes a
    persisted frame's partitions once even where two tables' jobs ask at the same time. Before, each
    table computed its own and evaluated its joins twice (once for the full grid, once for the
    suppression): silver.encounter was read about eight times a run."""

    def __init__(self, lake, years: int, last_year: int, end: dt.datetime | None, cache: bool = True):
        self.lake, self.years, self.last_year, self.end, self.cache = lake, years, last_year, end, cache
        self._frames: dict[str, DataFrame] = {}
        self._lock = threading.Lock()

    def shown(self, column: str = "year") -> F.Column:
        """Whether a row's ``column`` (a year) is one of the years the tables show."""
        return F.col(column).between(self.last_year - self.years + 1, self.last_year)

    def seen(self, where: list[str]) -> DataFrame:
        """Distinct persons with an encounter in a year shown, per ``where`` (year and state, or year)."""
        level = 0 if "state" in where else 1  # grouping_id of rollup(year, state)
        return self._once("seen", self._seen).where(F.col("_level") == level).select(*where, "persons")

    def conditions(self, top: int) -> DataFrame:
        """Persons with each of the ``top`` conditions (:func:`condition_prevalence`) per year,
        condition and state (``_level`` 0) and per year and condition (``_level`` 1), with the
        condition's ``display``."""
        return self._once(f"conditions-{top}", lambda: self._conditions(top))

    def stays(self) -> DataFrame:
        """The inpatient stays begun in the years shown (:meth:`_stays`): year, state,
        organization_id and ``_readmitted``."""
        return self._once("stays", self._stays)

    def close(self) -> None:
        """Drop the persisted frames (the run is over)."""
        for frame in self._frames.values():
            frame.unpersist()
        self._frames.clear()

    def _once(self, name: str, build) -> DataFrame:
        with self._lock:
            if name not in self._frames:
                frame = build()
                self._frames[name] = frame.persist() if self.cache else frame
            return self._frames[name]

    def _seen(self) -> DataFrame:
        enc = self.lake.read("silver.encounter").where(F.col("start_at").isNotNull())
        enc = enc.select("patient_key", F.year("start_at").alias("year"), _region().alias("state"))
        return (
            enc.where(self.shown())
            .rollup("year", "state")
            .agg(F.countDistinct("patient_key").alias("persons"), F.grouping_id().alias("_level"))
            .where(F.col("_level") < 2)
        )

    def _conditions(self, top: int) -> DataFrame:
        cond = self.lake.read("silver.condition").where(F.col("onset_at").isNotNull())
        cond = cond.where(~F.coalesce(F.col("display").rlike(NOT_DISEASES), F.lit(False)))
        cond = cond.withColumn("year", F.year("onset_at")).where(self.shown())
        people = self.lake.read("silver.patient").select("patient_key", _region().alias("state"))
        cond = cond.join(people, "patient_key", "left").fillna({"state": UNKNOWN})
        top_codes = (
            cond.groupBy("code_system", "code")
            .agg(F.countDistinct("patient_key").alias("_n"), F.min("display").alias("display"))
            .orderBy(F.desc("_n"), "code")
            .limit(top)
            .drop("_n")
        )
        condition = F.concat_ws(":", "code_system", "code").alias("condition")
        return (
            cond.drop("display")
            .join(F.broadcast(top_codes), ["code_system", "code"])
            .select("year", condition, "state", "patient_key", "display")
            .rollup("year", "condition", "state")
            .agg(
                F.countDistinct("patient_key").alias("persons"),
                F.first("display").alias("display"),
                F.grouping_id().alias("_level"),
            )
            .where(F.col("_level") < 2)
        )

    def _stays(self) -> DataFrame:
        """``_readmitted``: 1 or 0 as the ``readmission_30d`` label has it, null where the label
        excludes the stay (no discharge time, died by discharge, its 30 days past the end of the
        data): one definition, encounters.py. A rate is then the label's mean over the stays it can
        judge, as a model's base rate is."""
        if self.lake.exists("silver.patient"):
            deaths = self.lake.read("silver.patient").select("patient_key", "death_date")
        else:
            deaths = self.lake.spark.createDataFrame([], "patient_key string, death_date date")
        stays = encounters.readmission_outcomes(self.lake.read("silver.encounter"), deaths, self.end)
        return (
            stays.withColumn("year", F.year("start_at"))
            .where(self.shown())
            .select("year", "state", "organization_id", F.col("readmitted").alias("_readmitted"))
        )


def condition_prevalence(
    lake, years: int, top: int, last_year: int, by_state: bool = True, shared: Shared | None = None
) -> DataFrame:
    """Persons with each of the ``top`` most frequent diseases (SNOMED findings and situations left
    out, see ``NOT_DISEASES``), per year and state (or the whole country), last ``years`` years;
    ``shared``: the run's :class:`Shared` inputs."""
    shared = shared or Shared(lake, years, last_year, None, cache=False)
    where = ["year", "state"] if by_state else ["year"]
    conditions = shared.conditions(top)
    level = F.col("_level") == (0 if by_state else 1)
    counts = conditions.where(level).select(*where, "persons", "condition")
    grid = _full_grid(counts, [*where, "condition"], "persons")
    seen = shared.seen(where).withColumnRenamed("persons", "population")
    per_1000 = F.round(F.col("persons") * 1000 / F.col("population"), 2)
    out = grid.join(seen, where, "left").withColumn("per_1000_seen", per_1000)
    names = conditions.select("condition", "display").dropDuplicates(["condition"])
    return out.join(names, "condition", "left")


def utilisation(
    lake, years: int, last_year: int, end: dt.datetime | None, k: int, shared: Shared | None = None
) -> DataFrame:
    shared = shared or Shared(lake, years, last_year, end, cache=False)
    enc = lake.read("silver.encounter").where(F.col("start_at").isNotNull())
    enc = enc.withColumn("year", F.year("start_at")).where(shared.shown())
    enc = enc.withColumn("state", _region()).withColumn(
        "class", F.coalesce("encounter_class", F.lit(UNKNOWN))
    )
    readmit = shared.stays().withColumn("state", _region())
    per_class = enc.groupBy("year", "state", "class").agg(
        F.count("*").alias("encounters"),
        F.countDistinct("patient_key").alias("persons"),
        F.round(F.avg(F.when(F.col("class") == "inpatient", F.col("length_of_stay_days"))), 2).alias(
            "mean_length_of_stay_days"
        ),
    )
    rates = readmit.groupBy("year", "state").agg(
        F.round(F.avg("_readmitted"), 4).alias("readmission_30d_rate"),
        F.count("*").alias("inpatient_stays"),
        F.sum("_readmitted").alias("_readmissions"),
    )
    grid = _full_grid(per_class, ["year", "state", "class"], "persons").fillna({"encounters": 0})
    seen = shared.seen(["year", "state"]).withColumnRenamed("persons", "population")
    out = grid.join(seen, ["year", "state"], "left").withColumn(
        "encounters_per_1000", F.round(F.col("encounters") * 1000 / F.col("population"), 1)
    )
    # a rate whose numerator is a small count discloses it (rate x stays): hidden like a small cell
    small = (F.col("_readmissions") >= 1) & (F.col("_readmissions") < k)
    inpatient_row = F.col("class") == "inpatient"
    return (
        out.join(rates, ["year", "state"], "left")
        .withColumn("readmission_30d_rate", F.when(inpatient_row & ~small, F.col("readmission_30d_rate")))
        .withColumn("inpatient_stays", F.when(inpatient_row, F.col("inpatient_stays")))
        .drop("_readmissions")
    )


def readmission_by_facility(
    lake, years: int, last_year: int, end: dt.datetime | None, k: int, shared: Shared | None = None
) -> DataFrame:
    """Inpatient stays per facility and year, and the share followed by another inpatient stay of
    the same person within 30 days of discharge (at any facility), among the stays the
    ``readmission_30d`` label can judge (:meth:`Shared._stays`)."""
    shared = shared or Shared(lake, years, last_year, end, cache=False)
    stays = shared.stays()
    stays = stays.withColumn("facility", F.coalesce("organization_id", F.lit(UNKNOWN)))
    per = stays.groupBy("year", "facility").agg(
        F.count("*").alias("stays"),
        F.sum("_readmitted").alias("_readmissions"),
        F.count("_readmitted").alias("_judged"),
        F.first("state").alias("state"),
    )
    small = (F.col("_readmissions") >= 1) & (F.col("_readmissions") < k)
    rate = F.round(F.col("_readmissions") / F.col("_judged"), 4)
    grid = _full_grid(per.drop("state"), ["year", "facility"], "stays")
    places = per.groupBy("facility").agg(F.first("state", ignorenulls=True).alias("state"))
    names = (
        lake.read("silver.organization")
        .select(F.col("organization_id").alias("facility"), F.col("name").alias("facility_name"))
        .dropDuplicates(["facility"])
        if lake.exists("silver.organization")
        else None
    )
    out = (
        grid.join(places, "facility", "left")
        .withColumn("readmission_30d_rate", F.when(~F.coalesce(small, F.lit(False)), rate))
        .drop("_readmissions", "_judged")
    )
    return out.join(names, "facility", "left") if names is not None else out


def notes_by_type(lake) -> DataFrame:
    """Notes per document type: the patients they are about, how many notes, and how many had no
    text to read (a PDF report): what the notes tables hold, for analysts."""
    notes = lake.read("silver.note")
    return notes.groupBy(F.coalesce("note_type", F.lit(UNKNOWN)).alias("note_type")).agg(
        F.countDistinct("patient_key").alias("patients"),
        F.count("*").alias("notes"),
        F.sum(F.col("no_text").isNotNull().cast("int")).alias("without_text"),
    )


def note_concepts(lake, top: int) -> DataFrame:
    """The ``top`` concepts found in notes by the patients whose notes mention them, with how often
    a mention is negated (a note that says "denies chest pain" is not a case of chest pain)."""
    mentions = lake.read("silver.note_concept")
    per = mentions.groupBy("kind", F.col("display").alias("concept")).agg(
        F.countDistinct("patient_key").alias("patients"),
        F.count("*").alias("mentions"),
        F.round(F.avg(F.col("negated").cast("double")), 3).alias("negated_share"),
    )
    return per.orderBy(F.desc("patients"), "kind", "concept").limit(top)


def run(
    lake, k: int | None = None, years: int = 10, top: int = 20, reference: dt.date | None = None, role=None
) -> dict:
    """Build and write every gold EDA table, suppressed (``k``: default the lake's
    ``security.small_cell_k``); returns rows and hidden cells per table."""
    k = k or lake.security.small_cell_k
    reference = reference or dt.date.today()
    has = {
        t: lake.exists(f"silver.{t}")
        for t in ("patient", "encounter", "condition", "observation", "note", "note_concept")
    }
    last, end = reference.year, None
    if has["encounter"]:
        # the readmission label's clock (encounters.data_end) and the last year shown, one pass
        now, latest = encounters.start_bounds(lake)
        end = now if now is not None else latest
        last = min(latest.year, last) if latest is not None else last
    shared = Shared(lake, years, last, end)
    utilisation_derived = [
        "encounters",
        "encounters_per_1000",
        "mean_length_of_stay_days",
        "readmission_30d_rate",
        "inpatient_stays",
    ]
    # table -> (silver inputs, frame builder, dimensions, count, columns derived from the count)
    specs = {
        "gold.eda_demographics": (
            ["patient"],
            lambda: demographics(lake, reference),
            ["age_band", "sex", "state"],
            "persons",
            [],
        ),
        f"gold.eda_demographics{NATIONAL}": (
            ["patient"],
            lambda: demographics(lake, reference, by_state=False),
            ["age_band", "sex"],
            "persons",
            [],
        ),
        "gold.eda_condition_prevalence": (
            ["patient", "condition", "encounter"],
            lambda: condition_prevalence(lake, years, top, last, shared=shared),
            ["year", "state", "condition"],
            "persons",
            ["per_1000_seen"],
        ),
        f"gold.eda_condition_prevalence{NATIONAL}": (
            ["patient", "condition", "encounter"],
            lambda: condition_prevalence(lake, years, top, last, by_state=False, shared=shared),
            ["year", "condition"],
            "persons",
            ["per_1000_seen"],
        ),
        "gold.eda_utilisation": (
            ["encounter"],
            lambda: utilisation(lake, years, last, end, k, shared),
            ["year", "state", "class"],
            "persons",
            utilisation_derived,
        ),
        "gold.eda_readmission_by_facility": (
            ["encounter"],
            lambda: readmission_by_facility(lake, years, last, end, k, shared),
            ["year", "facility"],
            "stays",
            ["readmission_30d_rate"],
        ),
        "gold.eda_nfhs5_comparison": (
            ["patient", "observation"],
            lambda: nfhs.comparison(lake, nfhs.survey(lake.spark)),
            ["state", "sex", "indicator"],
            "persons_meeting",
            ["lake_percent", "difference"],
        ),
        "gold.eda_notes": (
            ["note"],
            lambda: notes_by_type(lake),
            ["note_type"],
            "patients",
            ["notes", "without_text"],
        ),
        "gold.eda_note_concepts": (
            ["note_concept"],
            lambda: note_concepts(lake, top),
            ["kind", "concept"],
            "patients",
            ["mentions", "negated_share"],
        ),
    }
    # the indicators count the same persons (not additive across them), and the denominator is a
    # person count too: each indicator is suppressed on its own, on both counts. A patient has
    # notes of several types and mentions of several concepts: each row stands alone too.
    options = {
        "gold.eda_nfhs5_comparison": {"independent": ["indicator"], "counts": ["persons_measured"]},
        "gold.eda_notes": {"independent": ["note_type"]},
        "gold.eda_note_concepts": {"independent": ["kind", "concept"]},
    }
    tables = {  # a table whose silver inputs do not exist yet is skipped, not failed
        name: (build, dims, count, derived)
        for name, (inputs, build, dims, count, derived) in specs.items()
        if all(has[t] for t in inputs)
    }

    def publish(name: str) -> dict:
        build, dims, count, derived = tables[name]
        frame = build()  # its aggregate is computed here, beside the other tables'
        cells = suppressed_cells(frame, dims, count, k, derived=derived, **options.get(name, {}))
        lake.write(as_spark(frame, cells), name, mode=WriteMode.OVERWRITE, commit_info={"ehrlakeJob": "eda"})
        return {"cells": len(cells), "hidden": int(cells["suppressed"].notna().sum())}

    with lake.security.job("eda", ["gold"], role) as (_, written):
        # each table is a few small Spark jobs and then the suppression's linear programs on the
        # driver: tables are built side by side
        try:
            summary = dict(zip(tables, side_by_side(publish, tables, "eda-table"), strict=True))
        finally:
            shared.close()
        for name, shown in summary.items():
            written.append((name, f"{shown['cells']} cells, {shown['hidden']} suppressed (k={k})"))
    return summary
