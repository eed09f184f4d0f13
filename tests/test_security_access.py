"""Role-based access on real tables: what each role sees, who may reveal, and that it is all audited."""

from __future__ import annotations

import json

import pytest
from conftest import opened
from fhir_fixtures import condition, patient, write_ndjson
from pyspark.sql import Window
from pyspark.sql import functions as F

from ehrlake import ingest
from ehrlake.errors import AccessDenied, KeyAccessError
from ehrlake.ingest import SourceKind
from ehrlake.lake import WriteMode
from ehrlake.security.audit import TABLE as AUDIT
from ehrlake.security.columns import key_errors
from ehrlake.security.protection import Sealing, TableProtection


@pytest.fixture
def loaded(lake, tmp_path):
    """Two patients in bronze, and a silver table holding sealed contact details beside analysis columns."""
    write_ndjson(
        tmp_path / "in" / "Patient.ndjson",
        [
            patient("p1", family="Raghunathan", telecom=[{"system": "phone", "value": "+91-98450-11111"}]),
            patient("p2"),
        ],
    )
    write_ndjson(tmp_path / "in" / "Condition.ndjson", [condition("c1", "p1")])
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"))
    contacts = opened(lake, "bronze.fhir_patient").select(
        "patient_key", "birth_year", "gender", "city", "family_name", "phone"
    )
    protector = lake.security.protector
    spec = TableProtection(("family_name", "phone"))
    sealed, _ = protector.protect(contacts, "silver.patient_contact", ["patient_key"], spec)
    # the test builds this silver table by hand; the clean stage will build the real ones
    sealed = sealed.select(*contacts.columns)
    lake.write(sealed, "silver.patient_contact", mode=WriteMode.OVERWRITE)
    return lake


def _audit(lake, action: str):
    return [r.asDict() for r in lake.read(AUDIT).where(F.col("action") == action).orderBy("seq").collect()]


def test_analyst_sees_no_identifier_column_in_silver_and_cannot_read_bronze_or_reveal(loaded):
    lake = loaded
    silver = lake.read("silver.patient_contact", role="analyst")
    assert set(silver.columns) == {"patient_key", "birth_year", "gender", "city"}  # sealed ones dropped
    assert silver.count() == 2
    with pytest.raises(AccessDenied, match="may not read bronze.fhir_patient"):
        lake.read("bronze.fhir_patient", role="analyst")
    key = silver.first().patient_key
    with pytest.raises(AccessDenied, match="may not reveal"):
        lake.reveal("silver.patient_contact", key, role="analyst", purpose="curious")
    outcomes = [(e["action"], e["role"], e["table_name"], e["outcome"]) for e in _audit(lake, "read")]
    assert ("read", "analyst", "silver.patient_contact", "allowed") in outcomes
    assert ("read", "analyst", "bronze.fhir_patient", "denied") in outcomes
    assert _audit(lake, "reveal")[-1]["outcome"] == "denied"


def test_engineer_sees_identifiers_only_as_ciphertext_and_cannot_open_them(loaded):
    """Names and whole records as sent are sealed to the reveal key, which jobs do not hold: the
    master key that ingest needs opens the records' processing copy (views flatten it) and the birth
    date, but not one name or phone number; only the reveal path does."""
    table = "bronze.fhir_patient"
    df = loaded.read(table, role="engineer")
    rows = df.collect()
    assert all(r.family_name.startswith("ek2:reveal#") for r in rows)
    assert all(r.raw.startswith("ek2z:reveal#") for r in rows)  # compressed, then sealed to the key
    assert all(r.raw_deid.startswith(f"ek1z:{table}#") for r in rows)
    sealing = Sealing.of(df.schema)
    assert {"family_name", "given_names", "address_line", "raw"} <= sealing.to_reveal
    assert not {"raw_deid", "birth_date"} & sealing.to_reveal  # what jobs read themselves
    protector = loaded.security.protector
    copy = json.loads(protector.open(df, table, sealing.under_data_key).where("id = 'p1'").first().raw_deid)
    assert (copy["id"], copy["birthDate"], copy["gender"]) == ("p1", "1970-05-01", "female")
    assert not {"name", "telecom", "address"} & set(copy) and "Raghunathan" not in json.dumps(copy)
    assert copy["meta"]["security"][-1]["code"] == "REDACTED"
    with pytest.raises(KeyAccessError, match="open only with the reveal key"), key_errors():
        protector.open(df, table, sealing.only(["raw"])).collect()
    with pytest.raises(KeyAccessError, match="open only with the reveal key"), key_errors():
        protector.open(df, table, sealing.only(["family_name"])).collect()
    assert "Rao" in {r.family_name for r in protector.revealing().open(df, table, sealing).collect()}
    # a value sealed to the reveal key and moved to another row does not open there
    moved = df.withColumn("family_name", F.first("family_name").over(Window.orderBy("id")))
    with pytest.raises(KeyAccessError, match="authentication failed"), key_errors():
        protector.revealing().open(moved, table, sealing.only(["family_name"])).collect()


def test_clinician_reveals_one_patient_and_the_reveal_is_audited(loaded):
    lake = loaded
    key = lake.read("bronze.fhir_condition", role="clinician").where("id = 'c1'").first().patient_key
    shown = lake.reveal("bronze.fhir_patient", key, role="clinician", purpose="ward round, bed 12").collect()
    assert len(shown) == 1 and shown[0].id == "p1"
    assert (shown[0].family_name, shown[0].phone, str(shown[0].birth_date)) == (
        "Raghunathan",
        "+91-98450-11111",
        "1970-05-01",
    )
    assert '"family": "Raghunathan"' in shown[0].raw
    event = _audit(lake, "reveal")[-1]
    assert (event["role"], event["patient_key"], event["outcome"], event["detail"]) == (
        "clinician",
        key,
        "allowed",
        "ward round, bed 12",
    )
    assert "family_name" in event["columns"] and event["os_user"]
    # a bulk read by the clinician still opens nothing
    bulk = lake.read("bronze.fhir_patient", role="clinician")
    assert "family_name" not in bulk.columns and "raw" not in bulk.columns
    assert lake.security.audit.verify(lake).ok


def test_unknown_role_is_denied_and_audited(loaded):
    with pytest.raises(AccessDenied, match="unknown role 'intern'"):
        loaded.read("silver.patient_contact", role="intern")
    event = _audit(loaded, "read")[-1]
    assert (event["role"], event["outcome"]) == ("intern", "denied")


def test_auditor_reads_the_audit_log_but_no_clinical_table(loaded):
    assert loaded.read(AUDIT, role="auditor").count() > 0
    with pytest.raises(AccessDenied):
        loaded.read("silver.patient_contact", role="auditor")


def test_ingest_as_a_role_without_write_access_is_refused_before_reading_anything(lake, tmp_path):
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1")])
    with pytest.raises(AccessDenied, match="analyst may not write the bronze"):
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"), role="analyst")
    assert not lake.exists("bronze.fhir_patient")


def test_rotation_with_reencrypt_writes_one_version_and_old_versions_need_their_key(isolated_lake, tmp_path):
    lake = isolated_lake
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1", family="Venkataraman"), patient("p2")])
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"))
    table = "bronze.fhir_patient"
    before = lake.version(table)
    store = lake.security.protector.store
    assert store.rotate(table) == f"{table}#v2"
    result = lake.security.protector.reencrypt(lake, table)
    assert result.version == before + 1
    now = {r.id: r for r in lake.read(table).collect()}
    assert all(r.raw_deid.startswith(f"ek1z:{table}#v2:") for r in now.values())
    assert {r.family_name for r in opened(lake, table).collect()} == {"Venkataraman", "Rao"}
    old = lake.read(table, version=before)
    assert all(r.raw_deid.startswith(f"ek1z:{table}#v1:") for r in old.collect())
    # names and records as sent are sealed to the reveal key, not a data key: re-encryption leaves
    # them as they were
    sent = {r.id: (r.family_name, r.raw) for r in old.collect()}
    assert sent == {i: (r.family_name, r.raw) for i, r in now.items()}
    reopened = lake.security.protector.open(old, table, Sealing.of(old.schema).under_data_key)
    assert sorted('"p1"' in r.raw_deid for r in reopened.collect()) == [False, True]  # time travel opens
    # once v1 is destroyed, the old version cannot be opened: a clear error naming table and key id
    path = store.key_file(table)
    data = json.loads(path.read_text())
    data["versions"] = [v for v in data["versions"] if v["key_id"] != f"{table}#v1"]
    path.write_text(json.dumps(data))
    gone = rf"^table {table}: data key {table}#v1 is not in the key store"
    with pytest.raises(KeyAccessError, match=gone), key_errors():
        lake.security.protector.open(
            lake.read(table, version=before), table, Sealing.of(old.schema).under_data_key
        ).collect()


def test_sql_as_analyst_reads_what_the_policy_shows_and_nothing_else(loaded):
    """`ehrlake sql`'s library: a query over silver works with the analyst's columns only; bronze,
    a file by path, a hidden table name and any write are refused before they run; all audited."""
    from ehrlake import sql
    from ehrlake.lake import _native

    if not _native.available(loaded.spark):
        pytest.skip("Delta Lake JARs not on Spark's class path (make setup fetches them)")
    lake = loaded
    rows = sql.query(
        lake,
        "SELECT gender, count(*) AS n FROM silver.patient_contact GROUP BY gender ORDER BY gender",
        "analyst",
    ).collect()
    assert sum(r.n for r in rows) == 2
    everything = sql.query(
        lake, "WITH c AS (SELECT * FROM silver.patient_contact) SELECT * FROM c", "analyst"
    )
    assert set(everything.columns) == {"patient_key", "birth_year", "gender", "city"}  # no sealed column
    assert everything.count() == 2  # read after its views are gone from the session's catalog
    assert not lake.spark._jsparkSession.sessionState().catalog().databaseExists("silver")
    refused = {
        "SELECT * FROM bronze.fhir_patient": "bronze.fhir_patient may not be read by role analyst",
        "SELECT * FROM silver.patient_contact WHERE patient_key IN (SELECT patient_key FROM bronze.fhir_patient)": (
            "bronze.fhir_patient may not be read"
        ),
        f"SELECT * FROM delta.`{lake.path('bronze.fhir_patient')}`": "is not a table of this lake",
        "SELECT * FROM silver.nothing_here": "silver.nothing_here is not a table of this lake",
        "DROP TABLE silver.patient_contact": "only queries run here",
        # Spark's guard (sql/guard.py) on the analysed statement: no code of the client's runs
        "SELECT reflect('java.lang.System', 'getenv', 'HOME') FROM silver.patient_contact": (
            "client code does not run here"
        ),
        "INSERT INTO silver.patient_contact SELECT * FROM silver.patient_contact": "only queries run here",
    }
    for statement, error in refused.items():
        with pytest.raises(AccessDenied, match=error.replace("(", r"\(").replace("*", r"\*")):
            sql.query(lake, statement, "analyst")
    # the engineer sees the sealed columns as ciphertext, the policy's choice for that role
    assert "phone" in sql.query(lake, "SELECT * FROM silver.patient_contact", "engineer").columns
    events = [(e["outcome"], e["role"], e["table_name"], e["detail"]) for e in _audit(lake, "sql")]
    assert any(
        e[:3] == ("allowed", "analyst", "silver.patient_contact") and e[3].startswith("WITH c")
        for e in events
    )
    assert ("denied", "analyst", "bronze.fhir_patient", "SELECT * FROM bronze.fhir_patient") in events


def test_a_site_role_reads_only_its_own_rows_and_no_table_that_cannot_tell_them(lake, tmp_path):
    """A role limited to some rows (a federated client's site, issue 24): its own source system's
    rows through the library and through SQL; a table without the condition's columns is refused,
    not shown whole; every read records the condition, every refusal is audited."""
    from ehrlake import sql
    from ehrlake.lake import _native
    from ehrlake.security.access import AccessPolicy, Role

    for system, pid in (("hospital-a", "p1"), ("hospital-b", "p2")):
        write_ndjson(tmp_path / system / "Patient.ndjson", [patient(pid)])
        write_ndjson(tmp_path / system / "Condition.ndjson", [condition(f"c{pid}", pid)])
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / system), source_system=system)
    lake.write(
        lake.spark.createDataFrame([("x", 1)], "k string, n int"), "gold.no_site", mode=WriteMode.OVERWRITE
    )
    access = lake.security.access
    site = Role(name="site:hospital-a", read=("bronze.*", "gold.*"), rows="source_system = 'hospital-a'")
    access.policy = AccessPolicy({**access.policy.roles, site.name: site})
    access.grants = None  # the session's signed grants name the shipped roles only

    assert [r.source_system for r in access.read(lake, "bronze.fhir_condition", site.name).collect()] == [
        "hospital-a"
    ]
    assert access.read(lake, "bronze.fhir_condition", "engineer").count() == 2  # others unchanged
    with pytest.raises(AccessDenied, match="reads only rows where source_system = 'hospital-a'"):
        access.read(lake, "gold.no_site", site.name)
    if _native.available(lake.spark):
        statement = "SELECT source_system, count(*) AS n FROM bronze.fhir_condition GROUP BY source_system"
        assert [tuple(r) for r in sql.query(lake, statement, site.name).collect()] == [("hospital-a", 1)]
        with pytest.raises(AccessDenied, match="cannot tell"):
            sql.query(lake, "SELECT * FROM gold.no_site", site.name)
    reads = [e for e in _audit(lake, "read") if e["role"] == site.name]
    assert reads and {e["detail"] for e in reads if e["outcome"] == "allowed"} == {
        "rows: source_system = 'hospital-a'"
    }
    assert any(e["outcome"] == "denied" and e["table_name"] == "gold.no_site" for e in reads)
