"""Synthea CSV exports into bronze: one table per CSV table, tolerant of Synthea's version drift.

Columns are matched by name, case-insensitively, so added, removed and reordered columns between
Synthea versions are fine: declared columns missing from a file are null, and columns the
declaration does not know stay in ``raw`` (the original CSV line; the file's header is in lineage).
Parsing and typing are shared with every CSV source (``csv_tables.py``); this module only declares
Synthea's tables.
"""

from __future__ import annotations

from ehrlake.ingest.csv_tables import CsvCatalog, CsvTable


def _t(name, columns, **kw) -> CsvTable:
    return CsvTable(f"bronze.synthea_{name}", tuple(columns.split(",")), **kw)


TABLES = {
    t.table.removeprefix("bronze.synthea_"): t
    for t in (
        _t(
            "patients",
            "id,birthdate,deathdate,ssn,drivers,passport,prefix,first,middle,last,suffix,maiden,marital,"
            "race,ethnicity,gender,birthplace,address,city,state,county,fips,zip,lat,lon,healthcare_expenses,"
            "healthcare_coverage,income,country",
            key_columns=("id",),
            dates=("birthdate", "deathdate"),
            numbers=("lat", "lon", "healthcare_expenses", "healthcare_coverage", "income"),
        ),
        _t(
            "encounters",
            "id,start,stop,patient,organization,provider,payer,encounterclass,code,description,"
            "base_encounter_cost,total_claim_cost,payer_coverage,reasoncode,reasondescription",
            key_columns=("id",),
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
            key_columns=("id",),
            dates=("start", "stop"),
        ),
        _t(
            "claims",
            "id,patientid,providerid,primarypatientinsuranceid,secondarypatientinsuranceid,departmentid,"
            "patientdepartmentid,diagnosis1,diagnosis2,diagnosis3,diagnosis4,diagnosis5,diagnosis6,diagnosis7,"
            "diagnosis8,referringproviderid,appointmentid,currentillnessdate,servicedate,supervisingproviderid,"
            "status1,status2,statusp,outstanding1,outstanding2,outstandingp,lastbilleddate1,lastbilleddate2,"
            "lastbilleddatep,healthcareclaimtypeid1,healthcareclaimtypeid2",
            key_columns=("id",),
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
            key_columns=("id",),
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
            "id,name,address,city,state,zip,lat,lon,phone,revenue,utilization,country",
            key_columns=("id",),
            numbers=("lat", "lon", "revenue", "utilization"),
        ),
        _t(
            "providers",
            "id,organization,name,gender,speciality,address,city,state,zip,lat,lon,utilization",
            key_columns=("id",),
            numbers=("lat", "lon", "utilization"),
        ),
        _t(
            "payers",
            "id,name,address,city,state_headquartered,zip,phone,amount_covered,amount_uncovered,revenue,"
            "covered_encounters,uncovered_encounters,covered_medications,uncovered_medications,covered_procedures,"
            "uncovered_procedures,covered_immunizations,uncovered_immunizations,unique_customers,qols_avg,member_months",
            key_columns=("id",),
            numbers=("amount_covered", "amount_uncovered", "revenue", "qols_avg", "member_months"),
        ),
    )
}
# imaging_studies rows repeat one Id per instance in Synthea, so the Id is not a key there.
# ``country`` is not a Synthea column: exports of other countries (``ehrlake synth``) add it.

# A table may come split in parts: ``patients.csv`` or ``patients.part-00000.csv.gz``.
CATALOG = CsvCatalog("Synthea CSV", TABLES, {name: (name, f"{name}.part-*") for name in TABLES})
