"""Population generator: amplify real sample records into N distinct patients, as a Spark job.

``run(spark, patients=100_000, out="gen/")`` takes the bundled Synthea CSV exports as templates
and writes a Synthea CSV export of N patients that the ingest job reads like any other:

- patient i is a copy of template ``hash(seed, i) mod T`` with every id rewritten consistently
  (a new UUID from seed, clone and old id: encounters, care plans and every reference to them stay
  valid within the clone), all dates shifted by a per-patient offset (0-10 years back, so nothing
  moves into the future), and demographics re-sampled: region from a configured distribution
  (default ``conf/synth/india.yaml``: Indian states weighted by population), names and address from
  small lists, direct identifiers (SSN, passport, ...) replaced by made-up values;
- facilities are cloned per region (a template organisation and provider get one copy per state),
  and each clone's encounters go to the copies in its own state, so region-level EDA is meaningful;
- with ``fault_rate`` > 0, that share of rows is damaged the way real dumps are (an empty Id, an
  unparseable date), decided by a hash of the row, and counted per table and kind in
  ``_manifest.json`` so tests can check that ingest quarantines exactly those;
- every generated patient's template is named in ``_lineage/part-*.csv.gz`` (``patient``,
  ``template``, ``template_source_system``: the source system the templates were ingested under).
  Ingest reads it into ``bronze.generated_patients`` and clean into ``silver.patient_origin``, so the
  models' patient split keeps a copy on its template's side and evaluates on real patients only.

Formats: ``synthea-csv`` (default), ``fhir-ndjson`` (bulk-data NDJSON per resource type) and
``fhir-bundles`` (collection Bundles of 50 patients each), converted in the JVM by ``synth/fhir.py``;
the FHIR formats add truncated-JSON records to the faults (NDJSON only).

Everything is a pure function of (seed, N, templates): the same arguments give byte-identical files.
Templates are small (broadcast); clones are a Spark range, so N is bounded by disk, not the driver.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from ehrlake.config import build, read_yaml
from ehrlake.errors import ConfigError, EnvironmentProblem
from ehrlake.home import HOME
from ehrlake.ingest import synthea
from ehrlake.ingest.generated import LINEAGE
from ehrlake.synth import fhir
from ehrlake.synth.values import BAD_DATE, unit, uuid

REPO = HOME
DEFAULT_TEMPLATES = REPO / "data" / "sample" / "synthea_csv"
DEFAULT_REGIONS = REPO / "conf" / "synth" / "india.yaml"
MAX_SHIFT_DAYS = 3650
# Tables generated, in the order written. Claims, payers and supplies are left out: nothing
# downstream reads them, and they would triple the volume.
PATIENT_TABLES = (
    "encounters",
    "conditions",
    "observations",
    "medications",
    "procedures",
    "immunizations",
    "allergies",
    "careplans",
)
FORMATS = ("synthea-csv", "fhir-ndjson", "fhir-bundles")


@dataclass
class SynthReport:
    patients: int
    seed: int
    fault_rate: float
    out: str
    rows: dict[str, int] = field(default_factory=dict)
    faults: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> kind -> rows
    seconds: float = 0.0
    template_source_system: str = "local"

    def format(self) -> str:
        lines = [
            f"synth: {self.patients:,} patients (seed {self.seed}) -> {self.out} in {self.seconds:.1f} s"
        ]
        for table, rows in self.rows.items():
            faults = sum(self.faults.get(table, {}).values())
            lines.append(f"  {table:<14} {rows:>12,} rows  {faults:>8,} damaged")
        return "\n".join(lines)


def run(
    spark: SparkSession,
    patients: int,
    out: str,
    seed: int = 1,
    fault_rate: float = 0.0,
    fmt: str = "synthea-csv",
    templates: str | os.PathLike = DEFAULT_TEMPLATES,
    regions: str | os.PathLike = DEFAULT_REGIONS,
    tables: tuple[str, ...] = PATIENT_TABLES,
    template_source_system: str = "local",
) -> SynthReport:
    """Write ``patients`` generated patients under ``out`` (replaced if it exists); see module doc.
    ``tables`` limits the event tables written (patients and facilities always are);
    ``template_source_system`` is the source system the templates were (or will be) ingested under."""
    unknown = set(tables) - set(PATIENT_TABLES)
    if unknown:
        raise ConfigError(f"synth cannot generate {sorted(unknown)} (tables: {', '.join(PATIENT_TABLES)})")
    if fmt not in FORMATS:
        raise ConfigError(f"synth writes {', '.join(FORMATS)}; {fmt} is not implemented yet")
    if patients < 1:
        raise ConfigError("--patients must be at least 1")
    if not 0.0 <= fault_rate < 1.0:
        raise ConfigError("--fault-rate must be in [0, 1)")
    started = dt.datetime.now()
    region = _regions(regions)
    held = Held()
    tpl = _Templates(spark, Path(templates), held)
    report = SynthReport(
        patients, seed, fault_rate, os.path.abspath(out), template_source_system=template_source_system
    )
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    try:
        _generate(tpl, held, report, out, fmt, tables, region)
    finally:  # a long-lived session (a notebook, the test suite) keeps none of it
        held.release()
    report.seconds = (dt.datetime.now() - started).total_seconds()
    Path(out, "_manifest.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _generate(
    tpl: _Templates, held: Held, report: SynthReport, out: str, fmt: str, tables, region: Regions
) -> None:
    """Write every table's generated rows under ``out``; counts and faults go into ``report``."""
    seed, patients, fault_rate = report.seed, report.patients, report.fault_rate
    clones = held.cache(_clones(tpl.spark, patients, seed, tpl.patient_ids(), region))
    # rows per template patient, for counting output rows without a second pass over them
    per_template = {r["template"]: r["count"] for r in clones.groupBy("template").count().collect()}
    frames = {"patients": _patients(tpl.table("patients"), clones, seed, region)}
    frames["organizations"] = _organizations(tpl.table("organizations"), seed, region)
    frames["providers"] = _providers(tpl.table("providers"), seed, region)
    for name in tables:
        if tpl.has(name):
            frames[name] = _events(name, tpl.table(name), clones, seed)
    if fmt != "synthea-csv":  # FHIR has no provider or care-plan resources in the lake's model
        frames = {n: f for n, f in frames.items() if n in fhir.RESOURCE_TYPES}
    converted = {}
    for name, frame in frames.items():
        frame, faults = _damage(name, frame, seed, fault_rate, held)
        if fmt == "synthea-csv":
            _write(frame, out, name, _files_for(name, patients))
        else:
            converted[name] = fhir.resources(name, frame, seed)
            if fmt == fhir.NDJSON:  # in a bundle, one cut resource would break the whole file
                cut = fhir.truncate(converted[name], seed, name, fault_rate, held)
                converted[name], faults["bad_json"] = cut
                fhir.write_ndjson(converted[name], out, name, _files_for(name, patients))
        report.rows[name] = _rows(name, tpl, per_template, len(region.names))
        report.faults[name] = faults
    if fmt == fhir.BUNDLES:
        fhir.write_bundles(converted, out, patients)
    lineage = clones.select(
        F.col("new_patient").alias("patient"),
        "template",
        F.lit(report.template_source_system).alias("template_source_system"),
    )
    _write(
        lineage,
        out,
        "lineage_rows",  # staged apart from the _lineage folder it fills
        _files_for("patients", patients),
        os.path.join(LINEAGE, "part-{i:05d}.csv.gz"),
    )


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regions:
    country: str
    names: list[str]
    weights: list[float]
    cities: dict[str, str]
    given: list[str]
    family: list[str]


@dataclass(frozen=True)
class _Region:
    population: int = 0
    city: str = ""

    def validate(self) -> None:
        if self.population < 1 or not self.city:
            raise ConfigError("a region needs a positive population and a city")


@dataclass(frozen=True)
class _RegionsFile:
    """A regions YAML (e.g. conf/synth/india.yaml): each region's population and city, and names."""

    country: str = ""
    regions: dict[str, _Region] = field(default_factory=dict)
    given_names: tuple = ()
    family_names: tuple = ()

    def validate(self) -> None:
        if not self.regions:
            raise ConfigError("regions must map each region's name to its population and city")
        if not self.given_names or not self.family_names:
            raise ConfigError("given_names and family_names must each list at least one name")


def _regions(path) -> Regions:
    """The regions file, typed and checked: a missing or misspelt key is named in one line."""
    names = build(_RegionsFile, read_yaml(path), str(path))
    regions = names.regions
    total = sum(r.population for r in regions.values())
    return Regions(
        names.country,
        list(regions),
        [r.population / total for r in regions.values()],
        {n: r.city for n, r in regions.items()},
        list(names.given_names),
        list(names.family_names),
    )


class Held:
    """The frames one synth run caches (templates, clones, damaged tables): released when it ends."""

    def __init__(self) -> None:
        self._frames: list[DataFrame] = []

    def cache(self, frame: DataFrame) -> DataFrame:
        self._frames.append(frame.cache())
        return self._frames[-1]

    def release(self) -> None:
        for frame in self._frames:
            frame.unpersist()
        self._frames.clear()


class _Templates:
    """The sample Synthea exports, each table read as strings with lower-case column names."""

    def __init__(self, spark: SparkSession, root: Path, held: Held):
        self.spark = spark
        self.held = held
        self.dirs = sorted(
            {os.path.dirname(p) for p in glob.glob(str(root / "**" / "patients.csv*"), recursive=True)}
        )
        if not self.dirs:
            raise EnvironmentProblem(f"no Synthea CSV export (patients.csv) under {root}")
        self._cache: dict[str, DataFrame] = {}

    def has(self, name: str) -> bool:
        return any(glob.glob(os.path.join(d, f"{name}.csv*")) for d in self.dirs)

    def table(self, name: str) -> DataFrame:
        if name not in self._cache:
            parts = []
            for d in self.dirs:
                files = sorted(glob.glob(os.path.join(d, f"{name}.csv*")))
                if files:
                    df = self.spark.read.csv(files, header=True, inferSchema=False)
                    parts.append(df.toDF(*[c.lower() for c in df.columns]))
            frame = parts[0]
            for p in parts[1:]:
                frame = frame.unionByName(p, allowMissingColumns=True)
            self._cache[name] = F.broadcast(self.held.cache(frame))
        return self._cache[name]

    def patient_ids(self) -> list[str]:
        return sorted(r["id"] for r in self.table("patients").select("id").collect())


# --- pieces ----------------------------------------------------------------------------------


def _pick(values: list[str], u: Column, weights: list[float] | None = None) -> Column:
    """values[i] where u falls in the i-th share of [0, 1) (equal shares without weights)."""
    weights = weights or [1 / len(values)] * len(values)
    out, edge = None, 0.0
    for value, w in zip(values, weights, strict=True):
        edge += w
        out = F.when(u < edge, F.lit(value)) if out is None else out.when(u < edge, F.lit(value))
    return out.otherwise(F.lit(values[-1]))


def _clones(spark, n: int, seed: int, template_ids: list[str], region: Regions) -> DataFrame:
    """One row per generated patient: clone number, template patient, new id, shift, state."""
    templates = spark.createDataFrame(list(enumerate(template_ids)), "t_index int, template string")
    clone = F.col("id").cast("string")
    return (
        spark.range(n)
        .withColumn(
            "t_index",
            F.pmod(F.xxhash64(F.lit(seed), F.lit("template"), "id"), F.lit(len(template_ids))).cast("int"),
        )
        .join(F.broadcast(templates), "t_index")
        .select(
            F.col("id").alias("clone"),
            "template",
            uuid(str(seed), "patient", clone).alias("new_patient"),
            (-F.floor(unit(seed, "shift", F.col("id")) * MAX_SHIFT_DAYS)).cast("int").alias("shift"),
            _pick(region.names, unit(seed, "region", F.col("id")), region.weights).alias("region"),
        )
    )


def _shifted(col: Column, kind: str, days: Column) -> Column:
    if kind == "date":
        return F.date_format(F.date_add(F.to_date(col), days), "yyyy-MM-dd")
    moved = F.timestamp_add("DAY", days, F.to_timestamp(col))
    return F.date_format(moved, "yyyy-MM-dd'T'HH:mm:ss'Z'")


def _shift_dates(df: DataFrame, name: str, days: Column) -> DataFrame:
    spec = synthea.TABLES[name]
    for col in df.columns:
        kind = spec.type_of(col)
        if kind in ("date", "timestamp"):
            df = df.withColumn(col, F.when(F.col(col).isNotNull(), _shifted(F.col(col), kind, days)))
    return df


def _patients(tpl: DataFrame, clones: DataFrame, seed: int, region: Regions) -> DataFrame:
    df = clones.join(tpl.withColumnRenamed("id", "template"), "template")
    df = _shift_dates(df, "patients", F.col("shift"))
    c = F.col("clone")
    made_up = {
        "ssn": F.format_string("999-%02d-%04d", F.pmod(c, F.lit(100)), F.pmod(c, F.lit(10000))),
        "drivers": F.when(F.col("drivers").isNotNull(), F.format_string("DL%09d", c)),
        "passport": F.when(F.col("passport").isNotNull(), F.format_string("P%08d", c)),
        "first": _pick(region.given, unit(seed, "given", c)),
        "last": _pick(region.family, unit(seed, "family", c)),
        "maiden": F.lit(None).cast("string"),
        "middle": F.lit(None).cast("string"),
        "address": F.format_string("%d Station Road", F.pmod(c, F.lit(997)) + 1),
        "city": _city(region),
        "state": F.col("region"),
        "county": F.lit(None).cast("string"),
        "fips": F.lit(None).cast("string"),
        "zip": F.format_string("%06d", F.pmod(F.xxhash64(F.lit(seed), c), F.lit(900000)) + 100000),
        "lat": F.lit(None).cast("string"),
        "lon": F.lit(None).cast("string"),
        "birthplace": F.col("region"),
        "country": F.lit(region.country),
    }
    df = df.withColumn("id", F.col("new_patient"))
    for name, value in made_up.items():
        if name in df.columns or name == "country":
            df = df.withColumn(name, value)
    return df.drop("clone", "template", "new_patient", "shift", "region", "t_index")


def _city(region: Regions) -> Column:
    mapping = F.create_map(*[F.lit(x) for pair in region.cities.items() for x in pair])
    return mapping[F.col("region")]


def _facility(seed: int, kind: str, region: Column, old: Column) -> Column:
    return F.when(old.isNotNull(), uuid(str(seed), kind, region, old))


def _one_per_id(tpl: DataFrame) -> DataFrame:
    """Template exports may share a facility id with different details: keep one, deterministically."""
    order = Window.partitionBy("id").orderBy(*[F.col(c).asc_nulls_last() for c in tpl.columns])
    return tpl.withColumn("_n", F.row_number().over(order)).where("_n = 1").drop("_n")


def _organizations(tpl: DataFrame, seed: int, region: Regions) -> DataFrame:
    states = tpl.sparkSession.createDataFrame([(r,) for r in region.names], "region string")
    df = _one_per_id(tpl).crossJoin(F.broadcast(states))
    df = df.withColumn("id", _facility(seed, "organization", F.col("region"), F.col("id")))
    df = df.withColumn("state", F.col("region")).withColumn("city", _city(region))
    for col in ("address", "zip", "lat", "lon", "phone"):
        if col in df.columns:
            df = df.withColumn(col, F.lit(None).cast("string"))
    return df.withColumn("country", F.lit(region.country)).drop("region")


def _providers(tpl: DataFrame, seed: int, region: Regions) -> DataFrame:
    states = tpl.sparkSession.createDataFrame([(r,) for r in region.names], "region string")
    df = _one_per_id(tpl).crossJoin(F.broadcast(states))
    df = df.withColumn("id", _facility(seed, "provider", F.col("region"), F.col("id")))
    df = df.withColumn(
        "organization", _facility(seed, "organization", F.col("region"), F.col("organization"))
    )
    df = df.withColumn("state", F.col("region")).withColumn("city", _city(region))
    df = df.withColumn("name", F.format_string("Dr. %s", F.substring("id", 1, 8)))
    for col in ("address", "zip", "lat", "lon"):
        if col in df.columns:
            df = df.withColumn(col, F.lit(None).cast("string"))
    return df.drop("region")


def _events(name: str, tpl: DataFrame, clones: DataFrame, seed: int) -> DataFrame:
    """A template table's rows for every clone of their patient, ids and dates rewritten."""
    df = clones.join(tpl.withColumnRenamed("patient", "template"), "template")
    clone = F.col("clone").cast("string")
    df = df.withColumn("patient", F.col("new_patient"))
    if "encounter" in df.columns:
        df = df.withColumn(
            "encounter",
            F.when(F.col("encounter").isNotNull(), uuid(str(seed), "encounter", clone, F.col("encounter"))),
        )
    if name == "encounters":
        df = df.withColumn("id", uuid(str(seed), "encounter", clone, F.col("id")))
        for col, kind in (("organization", "organization"), ("provider", "provider")):
            if col in df.columns:
                df = df.withColumn(col, _facility(seed, kind, F.col("region"), F.col(col)))
    elif "id" in df.columns:
        df = df.withColumn("id", uuid(str(seed), name, clone, F.col("id")))
    df = _shift_dates(df, name, F.col("shift"))
    return df.drop("clone", "template", "new_patient", "shift", "region", "t_index")


# --- faults and output -----------------------------------------------------------------------


def _damage(name: str, df: DataFrame, seed: int, rate: float, held: Held) -> tuple[DataFrame, dict[str, int]]:
    """Damage ``rate`` of the rows (chosen by a hash of the row): an empty Id where the table has
    one, else an unparseable first date. Returns the frame and the count of each kind."""
    if rate <= 0:
        return df, {}
    spec = synthea.TABLES[name]
    # decided once, from the undamaged row (an expression would be re-evaluated on damaged columns)
    df = df.withColumn(
        "_damaged",
        unit(seed, f"fault:{name}", *[F.coalesce(F.col(c), F.lit("")) for c in df.columns]) < rate,
    )
    hit = F.col("_damaged")
    dates = [c for c in df.columns if spec.type_of(c) in ("date", "timestamp")]
    if "id" in spec.key_columns:
        kind, df = "missing_id", df.withColumn("id", F.when(hit, F.lit("")).otherwise(F.col("id")))
    elif dates:
        kind, df = (
            "unparseable_date",
            df.withColumn(dates[0], F.when(hit, F.lit(BAD_DATE)).otherwise(F.col(dates[0]))),
        )
    else:
        return df.drop("_damaged"), {}
    df = held.cache(df)
    count = df.where("_damaged").count()
    return df.drop("_damaged"), {kind: count}


def _files_for(name: str, patients: int) -> int:
    per_file = 200_000 if name in ("patients", "organizations", "providers") else 20_000
    return max(1, patients // per_file)


def _rows(name: str, tpl: _Templates, per_template: dict[str, int], regions: int) -> int:
    """Rows written for a table: clones x template rows (facilities: template rows x regions)."""
    if name == "patients":
        return sum(per_template.values())
    if name in ("organizations", "providers"):
        return tpl.table(name).select("id").distinct().count() * regions
    counts = tpl.table(name).groupBy("patient").count().collect()
    return sum(per_template.get(r["patient"], 0) * r["count"] for r in counts)


def _write(
    df: DataFrame, out: str, name: str, files: int, target: str = "{name}.part-{i:05d}.csv.gz"
) -> None:
    """``<out>/<name>.part-NNNNN.csv.gz`` files (or ``target``), rows in a fixed order (byte-identical
    re-runs)."""
    key = [c for c in ("patient", "id", "encounter", "date", "start", "code") if c in df.columns]
    staged = os.path.join(out, f"_{name}")
    df = df.repartition(files, *key).sortWithinPartitions(*df.columns)
    df.write.csv(staged, header=True, compression="gzip", mode="overwrite", escape='"')
    os.makedirs(os.path.dirname(os.path.join(out, target.format(name=name, i=0))), exist_ok=True)
    for i, part in enumerate(sorted(glob.glob(os.path.join(staged, "part-*.csv.gz")))):
        os.replace(part, os.path.join(out, target.format(name=name, i=i)))
    shutil.rmtree(staged)
