"""FHIR R4 out: the lake's results as resources another system can take in.

``ehrlake export fhir --what risk,findings,aggregates --out DIR`` writes, in the FHIR Bulk Data
layout (one NDJSON file per resource type and part, and a ``manifest.json`` naming each file with
its count):

- ``gold.risk_scores`` as ``RiskAssessment``: the probability and its qualitative band, the stored
  reasons as ``basis``, the model id and version as ``method``;
- ``gold.image_findings`` as ``Observation`` (category imaging): the finding as a boolean, the
  model's score as a component, the image's id as identifier;
- the published aggregates (``gold.eda_*``, small cells already suppressed) as ``MeasureReport``:
  one per table and year, a stratum per published row; a suppressed count is absent with the
  ``data-absent-reason`` ``masked``, never a number.

Subjects are the pseudonymous patient keys (``Patient/<patient_key>``): an export carries no
identifier, so it is what any role that may read the tables may take away. ``--source-ids S
--purpose P`` is the export back to source system ``S`` (a hospital taking its patients' risks into
its own record): only S's patients, each subject its record id there (``Patient/<id>`` with the
identifier system ``urn:ehrlake:source:S``), for a role that may reveal, with a purpose, audited
with the count released. Record ids are the source's own keys, not the identifiers sealed in bronze
(names, addresses, phone numbers stay sealed). Risk and findings are
built on the executors (a population's scores never pass through the driver); aggregates are small
by construction. Ids are hashes of what a resource is about, so exporting again gives the same files.
"""

from __future__ import annotations

import datetime as dt
import functools
import glob
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import EhrlakeError
from ehrlake.lake.catalog import bronze_patient_tables, list_tables
from ehrlake.security.audit import Event

WHAT = ("risk", "findings", "aggregates")
RISK_TABLE, FINDINGS_TABLE = "gold.risk_scores", "gold.image_findings"
TASK_SYSTEM = "urn:ehrlake:task"
MODEL_SYSTEM = "urn:ehrlake:model"
MEASURE_BASE = "urn:ehrlake:measure:"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
# the lake's risk bands as FHIR's qualitative risk codes
QUALITATIVE = {"high": "high", "medium": "moderate", "low": "low"}
MANIFEST = "manifest.json"
SOURCE_SYSTEM = "urn:ehrlake:source:"


def resource_id(*parts) -> str:
    """A stable FHIR id (64 hex characters, within the id type's limit) for what ``parts`` name."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _instant(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _model(model_id: str, version: int) -> dict:
    return {
        "coding": [{"system": MODEL_SYSTEM, "code": model_id, "version": str(version)}],
        "text": f"{model_id} v{version}",
    }


def _subject(row: dict) -> dict:
    """The pseudonymous key, or (``source_id`` present: an export back to a source system) the
    patient's record id in that system."""
    if row.get("source_id"):
        system = f"{SOURCE_SYSTEM}{row['source_system_of_id']}"
        return {"subject": {"reference": f"Patient/{row['source_id']}",
                            "identifier": {"system": system, "value": row["source_id"]}}}  # fmt: skip
    return {"subject": {"reference": f"Patient/{row['patient_key']}"}} if row.get("patient_key") else {}


def risk_assessment(row: dict) -> dict:
    """One ``gold.risk_scores`` row as a RiskAssessment."""
    about = (row["task"], row["as_of"].isoformat(), row["patient_key"])
    prediction = {"outcome": {"coding": [{"system": TASK_SYSTEM, "code": row["task"]}], "text": row["task"]}}
    if row["score"] is not None:
        prediction["probabilityDecimal"] = round(float(row["score"]), 6)
    if row.get("risk_band") in QUALITATIVE:
        band = QUALITATIVE[row["risk_band"]]
        prediction["qualitativeRisk"] = {"coding": [{"system": RISK_PROBABILITY, "code": band}]}
    resource = {
        "resourceType": "RiskAssessment",
        "id": resource_id("RiskAssessment", *about),
        "identifier": [{"system": "urn:ehrlake:risk-score", "value": "/".join(about)}],
        "status": "final",
        "code": {"coding": [{"system": TASK_SYSTEM, "code": row["task"]}]},
        **_subject(row),
        "occurrenceDateTime": row["as_of"].isoformat(),
        "method": _model(row["model_id"], row["model_version"]),
        "prediction": [prediction],
    }
    if row.get("top_reasons"):  # the readable reasons the score was stored with
        resource["basis"] = [{"display": reason} for reason in row["top_reasons"]]
    return resource


def image_observation(row: dict) -> dict:
    """One ``gold.image_findings`` row as an imaging Observation."""
    about = (row["task"], row["image_id"], row["model_id"], row["model_version"])
    modality = f", modality {row['modality']}" if row.get("modality") else ""
    resource = {
        "resourceType": "Observation",
        "id": resource_id("Observation", *about),
        "identifier": [{"system": "urn:ehrlake:image", "value": row["image_id"]}],
        "status": "final",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
        "code": {"coding": [{"system": TASK_SYSTEM, "code": row["task"]}], "text": row["task"]},
        **_subject(row),
        "issued": _instant(row["scored_at"]),
        "method": _model(row["model_id"], row["model_version"]),
        "valueBoolean": bool(row["finding"]),
        "component": [
            {"code": {"text": "model score"}, "valueQuantity": {"value": round(float(row["score"]), 6)}}
        ],
        "note": [{"text": f"{row['format']} image from {row['source_system']}" + modality}],
    }
    return resource


def _value(value) -> str:
    return "" if value is None else str(value)


def measure_report(
    table: str, year: int | None, rows: list[dict], dimensions: list[str], measures: dict, made: dt.date
) -> dict:
    """A published aggregate table's rows (of one year) as a summary MeasureReport: a group per
    measure column, one stratifier over the dimension columns, a stratum per row. ``measures``:
    column -> ``count`` (an integer population) or ``score`` (a rate)."""
    period = (
        {"start": f"{year}-01-01", "end": f"{year}-12-31"} if year is not None else {"end": made.isoformat()}
    )
    groups = []
    for column, kind in measures.items():
        strata = []
        for row in rows:
            stratum = {
                "component": [
                    {"code": {"text": d}, "value": {"text": _value(row[d]) or "unknown"}} for d in dimensions
                ]
            }
            value, suppressed = row[column], row.get("suppressed")
            masked = value is None and suppressed  # hidden by small-cell suppression, not unknown
            if kind == "count":
                population = {"code": {"text": column}}
                if value is not None:
                    population["count"] = int(value)
                elif masked:
                    population["extension"] = [{"url": DATA_ABSENT, "valueCode": "masked"}]
                stratum["population"] = [population]
            elif value is not None:
                stratum["measureScore"] = {"value": round(float(value), 6)}
            elif masked:
                stratum["measureScore"] = {"extension": [{"url": DATA_ABSENT, "valueCode": "masked"}]}
            strata.append(stratum)
        group = {"code": {"text": column}}
        if strata:
            group["stratifier"] = [{"code": [{"text": " x ".join(dimensions) or "all"}], "stratum": strata}]
        groups.append(group)
    name, label = table.split(".", 1)[1], f"{table}/{'all' if year is None else year}"
    return {
        "resourceType": "MeasureReport",
        "id": resource_id("MeasureReport", table, year),
        "identifier": [{"system": "urn:ehrlake:aggregate", "value": label}],
        "status": "complete",
        "type": "summary",
        "measure": MEASURE_BASE + name,
        "date": made.isoformat(),
        "period": period,
        "group": groups,
    }


@dataclass(frozen=True)
class Export:
    out: str
    files: list[dict]  # the manifest's output entries: type, url, count
    seconds: float
    source_system: str | None = None  # subjects are this system's record ids

    def format(self) -> str:
        counts: dict[str, int] = {}
        for f in self.files:
            counts[f["type"]] = counts.get(f["type"], 0) + f["count"]
        spread = ", ".join(f"{n:,} {t}" for t, n in counts.items()) or "nothing"
        return (
            f"exported {spread} in {len(self.files)} NDJSON file(s) to {self.out} in {self.seconds:.1f} s "
            f"(FHIR R4, bulk-data layout; {MANIFEST} names each file); subjects are "
            + (f"{self.source_system}'s record ids (audited)" if self.source_system else "pseudonymous keys")
        )


def _check_out(out: str) -> None:
    """``out`` may be new, empty, or an earlier export (replaced whole); never a folder of other files."""
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MANIFEST)):
        raise EhrlakeError(f"{out} is not empty and holds no earlier export ({MANIFEST}); give a new folder")


def _publish(staged: str, out: str) -> None:
    """Put the finished export in ``out``'s place: a run that fails leaves the earlier one as it was."""
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(staged, out)


def _write(lines: DataFrame, out: str, resource_type: str) -> list[dict]:
    """Write a one-column frame of JSON lines as ``<Type>.<n>.ndjson`` files (one per non-empty
    Spark part), counting each file's lines as it is moved; no row passes through the driver."""
    staging = os.path.join(out, f"_{resource_type}")
    lines.write.mode("overwrite").option("compression", "none").text(staging)
    files = []
    for part in sorted(glob.glob(os.path.join(staging, "part-*"))):
        with open(part, "rb") as handle:
            count = sum(1 for _ in handle)
        if count:
            name = f"{resource_type}.{len(files) + 1}.ndjson"
            os.replace(part, os.path.join(out, name))
            files.append({"type": resource_type, "url": name, "count": count})
    shutil.rmtree(staging)
    return files


def _lines(spark, df: DataFrame, build) -> DataFrame:
    rows = df.rdd.map(lambda row: (json.dumps(build(row.asDict(recursive=True)), separators=(",", ":")),))
    return spark.createDataFrame(rows, T.StructType([T.StructField("value", T.StringType())]))


def _aggregate_tables(lake) -> list[str]:
    return sorted(str(n) for n in list_tables(lake.root) if n.layer == "gold" and n.table.startswith("eda_"))


def _aggregates(df: DataFrame, table: str, made: dt.date) -> list[dict]:
    """The MeasureReports of one published table (a few hundred rows: read on the driver)."""
    numeric = (T.LongType, T.DoubleType, T.FloatType)
    measures = {
        f.name: "count" if isinstance(f.dataType, T.LongType) else "score"
        for f in df.schema.fields
        if isinstance(f.dataType, numeric)
    }
    dimensions = [
        f.name for f in df.schema.fields if f.name not in measures and f.name not in ("year", "suppressed")
    ]
    rows = [r.asDict() for r in df.toLocalIterator()]
    years = sorted({r.get("year") for r in rows}, key=lambda y: (y is None, y))
    return [
        measure_report(table, year, [r for r in rows if r.get("year") == year], dimensions, measures, made)
        for year in years
    ]


def source_ids(lake, system: str, role: str) -> DataFrame:
    """``patient_key, source_id`` of the patients with a record in source system ``system``, from
    the bronze patient tables (read under ``role``); a patient with several records there: the
    least id."""
    frames = []
    for table in bronze_patient_tables(lake.root):
        if not {"patient_key", "id", "source_system"} <= set(lake.schema(table).fieldNames()):
            continue
        frames.append(
            lake.read(table, role=role)
            .where(F.col("source_system") == system)
            .select("patient_key", F.col("id").cast("string").alias("source_id"))
        )
    if not frames:
        raise EhrlakeError(f"no bronze patient table holds records of source system {system!r}")
    every = functools.reduce(DataFrame.unionByName, frames)
    return every.groupBy("patient_key").agg(F.min("source_id").alias("source_id"))


def run(
    lake,
    out: str,
    what: tuple[str, ...] = WHAT,
    task: str | None = None,
    role: str | None = None,
    source_system: str | None = None,
    purpose: str | None = None,
) -> Export:
    """Export ``what`` (of ``task`` where given) to ``out``, reading every table under ``role``'s
    policy; each file written is audited. ``source_system``: the export back to that system (see
    the module's docstring)."""
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise EhrlakeError(f"nothing called {', '.join(unknown)} to export; choose from {', '.join(WHAT)}")
    started = dt.datetime.now(dt.UTC)
    role = role or lake.security.default_role
    ids = None
    if source_system:
        lake.security.access.require_release(role, f"source ids of {source_system}", purpose or "")
        ids = source_ids(lake, source_system, role)
    out = os.path.abspath(out.rstrip("/"))
    _check_out(out)
    final, out = out, f"{out}.partial"  # written here, then moved into place whole
    shutil.rmtree(out, ignore_errors=True)  # what a failed run left
    os.makedirs(out)
    spark, files, read = lake.spark, [], []
    for kind, table, build, resource_type in (
        ("risk", RISK_TABLE, risk_assessment, "RiskAssessment"),
        ("findings", FINDINGS_TABLE, image_observation, "Observation"),
    ):
        if kind not in what or not lake.exists(table):
            continue
        df = lake.read(table, role=role)
        if task:
            df = df.where(df["task"] == task)
        if ids is not None:  # only the system's own patients, by their record id there
            df = df.join(ids, "patient_key").withColumn("source_system_of_id", F.lit(source_system))
        files += _write(_lines(spark, df, build), out, resource_type)
        read.append(table)
    if "aggregates" in what:
        reports = []
        for table in _aggregate_tables(lake):
            reports += _aggregates(lake.read(table, role=role), table, started.date())
            read.append(table)
        if reports:
            name = "MeasureReport.1.ndjson"
            with open(os.path.join(out, name), "w") as handle:
                handle.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in reports)
            files.append({"type": "MeasureReport", "url": name, "count": len(reports)})
    manifest = {
        "transactionTime": _instant(started),
        "request": f"ehrlake export fhir --what {','.join(what)}" + (f" --task {task}" if task else ""),
        "requiresAccessToken": False,
        "output": files,
        "error": [],
    }
    with open(os.path.join(out, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=2)
    _publish(out, final)
    events = [Event("export", role=role, table_name=t, detail=f"FHIR to {final}") for t in read]
    if ids is not None:
        released = sum(f["count"] for f in files if f["type"] in ("RiskAssessment", "Observation"))
        detail = f"{purpose} | {released:,} resources with record ids of {source_system} to {final}"
        events.append(Event("export.source_ids", role=role, detail=detail))
    lake.security.audit.record(*events, checkpoint=True)
    return Export(final, files, (dt.datetime.now(dt.UTC) - started).total_seconds(), source_system)
