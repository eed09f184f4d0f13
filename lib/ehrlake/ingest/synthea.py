"""Synthea CSV exports into bronze: one table per CSV table, tolerant of Synthea's version drift.

Columns are matched by name, case-insensitively, so added, removed and reordered columns between
Synthea versions are fine: declared columns missing from a file are null, and columns the
declaration does not know stay in ``raw`` (the original CSV line; the file's header is in lineage).
Each file's header is read on the driver (one line per file); rows are parsed in the JVM.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from ehrlake.ingest.lineage import lineage
from ehrlake.ingest.quarantine import Reason, first_failure
from ehrlake.security.protection import declared

CORRUPT = "_corrupt"


@dataclass(frozen=True)
class CsvTable:
    """A Synthea CSV table: its columns in canonical (lower-case) names and their types."""

    name: str
    columns: tuple[str, ...]
    has_id: bool = False
    dates: tuple[str, ...] = ()
    timestamps: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)  # header name (lower) -> canonical name

    @property
    def table(self) -> str:
        return f"bronze.synthea_{self.name}"

    @property
    def keys(self) -> list[str]:
        return ["source_system", "id" if self.has_id else "row_key"]

    def type_of(self, column: str) -> str:
        if column in self.dates:
            return "date"
        if column in self.timestamps:
            return "timestamp"
        if column in self.numbers:
            return "double"
        return "string"


def _t(name, columns, **kw) -> CsvTable:
    return CsvTable(name, tuple(columns.split(",")), **kw)


TABLES = {
    t.name: t
    for t in (
        _t(
            "patients",
            "id,birthdate,deathdate,ssn,drivers,passport,prefix,first,middle,last,suffix,maiden,marital,"
            "race,ethnicity,gender,birthplace,address,city,state,county,fips,zip,lat,lon,healthcare_expenses,"
            "healthcare_coverage,income",
            has_id=True,
            dates=("birthdate", "deathdate"),
            numbers=("lat", "lon", "healthcare_expenses", "healthcare_coverage", "income"),
        ),
        _t(
            "encounters",
            "id,start,stop,patient,organization,provider,payer,encounterclass,code,description,"
            "base_encounter_cost,total_claim_cost,payer_coverage,reasoncode,reasondescription",
            has_id=True,
            timestamps=("start", "stop"),
            numbers=("base_encounter_cost", "total_claim_cost", "payer_coverage"),
        ),
        _t("conditions", "start,stop,patient,encounter,system,code,description", dates=("start", "stop")),
        _t(
            "observations",
            "date,patient,encounter,category,code,description,value,units,type",
            timestamps=("date",),
        ),
        _t(
            "medications",
            "start,stop,patient,payer,encounter,code,description,base_cost,payer_coverage,dispenses,"
            "totalcost,reasoncode,reasondescription",
            timestamps=("start", "stop"),
            numbers=("base_cost", "payer_coverage", "dispenses", "totalcost"),
        ),
        _t(
            "procedures",
            "start,stop,patient,encounter,system,code,description,base_cost,reasoncode,reasondescription",
            timestamps=("start", "stop"),
            numbers=("base_cost",),
            aliases={"date": "start"},
        ),
        _t(
            "immunizations",
            "date,patient,encounter,code,description,base_cost",
            timestamps=("date",),
            numbers=("base_cost",),
        ),
        _t(
            "allergies",
            "start,stop,patient,encounter,code,system,description,type,category,reaction1,description1,"
            "severity1,reaction2,description2,severity2",
            dates=("start", "stop"),
        ),
        _t(
            "careplans",
            "id,start,stop,patient,encounter,code,description,reasoncode,reasondescription",
            has_id=True,
            dates=("start", "stop"),
        ),
        _t(
            "claims",
            "id,patientid,providerid,primarypatientinsuranceid,secondarypatientinsuranceid,departmentid,"
            "patientdepartmentid,diagnosis1,diagnosis2,diagnosis3,diagnosis4,diagnosis5,diagnosis6,diagnosis7,"
            "diagnosis8,referringproviderid,appointmentid,currentillnessdate,servicedate,supervisingproviderid,"
            "status1,status2,statusp,outstanding1,outstanding2,outstandingp,lastbilleddate1,lastbilleddate2,"
            "lastbilleddatep,healthcareclaimtypeid1,healthcareclaimtypeid2",
            has_id=True,
            timestamps=(
                "currentillnessdate",
                "servicedate",
                "lastbilleddate1",
                "lastbilleddate2",
                "lastbilleddatep",
            ),
            numbers=("outstanding1", "outstanding2", "outstandingp"),
        ),
        _t(
            "claims_transactions",
            "id,claimid,chargeid,patientid,type,amount,method,fromdate,todate,placeofservice,"
            "procedurecode,modifier1,modifier2,diagnosisref1,diagnosisref2,diagnosisref3,diagnosisref4,units,"
            "departmentid,notes,unitamount,transferoutid,transfertype,payments,adjustments,transfers,outstanding,"
            "appointmentid,linenote,patientinsuranceid,feescheduleid,providerid,supervisingproviderid",
            has_id=True,
            timestamps=("fromdate", "todate"),
            numbers=("amount", "units", "unitamount", "payments", "adjustments", "transfers", "outstanding"),
        ),
        _t(
            "imaging_studies",
            "id,date,patient,encounter,series_uid,bodysite_code,bodysite_description,modality_code,"
            "modality_description,instance_uid,sop_code,sop_description,procedure_code",
            timestamps=("date",),
        ),
        _t("devices", "start,stop,patient,encounter,code,description,udi", timestamps=("start", "stop")),
        _t(
            "supplies",
            "date,patient,encounter,code,description,quantity",
            dates=("date",),
            numbers=("quantity",),
        ),
        _t(
            "payer_transitions",
            "patient,memberid,start_year,end_year,payer,secondary_payer,ownership,ownername",
        ),
        _t(
            "organizations",
            "id,name,address,city,state,zip,lat,lon,phone,revenue,utilization",
            has_id=True,
            numbers=("lat", "lon", "revenue", "utilization"),
        ),
        _t(
            "providers",
            "id,organization,name,gender,speciality,address,city,state,zip,lat,lon,utilization",
            has_id=True,
            numbers=("lat", "lon", "utilization"),
        ),
        _t(
            "payers",
            "id,name,address,city,state_headquartered,zip,phone,amount_covered,amount_uncovered,revenue,"
            "covered_encounters,uncovered_encounters,covered_medications,uncovered_medications,covered_procedures,"
            "uncovered_procedures,covered_immunizations,uncovered_immunizations,unique_customers,qols_avg,member_months",
            has_id=True,
            numbers=("amount_covered", "amount_uncovered", "revenue", "qols_avg", "member_months"),
        ),
    )
}
# imaging_studies rows repeat one Id per instance in Synthea, so the Id is not a key there.

# The same row content, re-read, must replace nothing; a changed row under the same Id replaces it.
# CSV rows carry no version, so within a batch the later file / line wins (no ordering columns).
UPDATE_WHEN = "s.record_hash <> t.record_hash"


def table_for(stem: str) -> str:
    """Bronze table of a CSV file stem; unknown stems get a name that only the quarantine uses."""
    return TABLES[stem].table if stem in TABLES else f"(unknown:{stem})"


def parse_header(line: str) -> list[str]:
    return next(csv.reader([line]))


def _csv_schema(header: list[str]) -> str:
    fields = ",".join(f"`{h.replace('`', '')}` STRING" for h in header)
    return f"{fields}, {CORRUPT} STRING"


def type_rows(
    rows: DataFrame,
    spec: CsvTable | None,
    header: list[str],
    run_id: str,
    ingested_at: Column,
    source_system: str,
) -> DataFrame:
    """Data lines of files sharing one header -> typed bronze rows with ``_reason``/``_message``."""
    by_canonical = {}
    for h in header:
        low = h.strip().lower()
        by_canonical.setdefault(spec.aliases.get(low, low) if spec else low, h)
    parsed = rows.withColumn(
        "r",
        F.from_csv("text", _csv_schema(header), {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": CORRUPT}),
    )

    def raw(col: str) -> Column:
        return F.col(f"r.`{by_canonical[col]}`") if col in by_canonical else F.lit(None).cast("string")

    checks = [
        (F.col("bad_utf8"), Reason.INVALID_UTF8, F.lit("record is not valid UTF-8")),
        (F.lit(spec is None), Reason.UNKNOWN_TABLE, F.lit("not a known Synthea CSV table (file name)")),
        (
            F.col(f"r.{CORRUPT}").isNotNull(),
            Reason.WRONG_FIELD_COUNT,
            F.lit(f"expected {len(header)} fields as in the header"),
        ),
    ]
    if spec is None:
        typed: list[Column] = []
    else:
        if spec.has_id:
            checks.append(
                (raw("id").isNull() | (F.trim(raw("id")) == ""), Reason.MISSING_ID, F.lit("Id is empty"))
            )
        for col in spec.columns:
            kind = spec.type_of(col)
            if kind != "string" and col in by_canonical:
                bad = raw(col).isNotNull() & F.expr(f"try_cast(r.`{by_canonical[col]}` AS {kind})").isNull()
                reason = Reason.UNPARSEABLE_NUMBER if kind == "double" else Reason.UNPARSEABLE_DATE
                message = (
                    F.lit(f"{by_canonical[col]}: not a valid {kind} (value kept sealed in raw)")
                    if col in declared(spec.table).identifiers
                    else F.concat(F.lit(f"{by_canonical[col]}: '"), raw(col), F.lit("'"))
                )
                checks.append((bad, reason, message))
        typed = [
            (
                raw(c)
                if spec.type_of(c) == "string"
                else F.expr(f"try_cast(r.`{by_canonical[c]}` AS {spec.type_of(c)})")
                if c in by_canonical
                else F.lit(None).cast(spec.type_of(c))
            ).alias(c)
            for c in spec.columns
        ]
    reason, message = first_failure(checks)
    hashed = F.sha2("text", 256)
    occurrence = F.row_number().over(Window.partitionBy("source_file", hashed).orderBy("record_index"))
    return parsed.select(
        F.lit(source_system).alias("source_system"),
        F.concat(hashed, F.lit("#"), occurrence.cast("string")).alias("row_key"),
        *typed,
        F.col("text").alias("raw"),
        hashed.alias("record_hash"),
        *lineage(run_id, ingested_at),
        reason.alias("_reason"),
        message.alias("_message"),
    )
