"""Column encryption on executors: round trip, no plaintext in output, no key material in the plan."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from pyspark.sql import functions as F

from ehrlake.errors import KeyAccessError
from ehrlake.security import reveal_key
from ehrlake.security.columns import (
    SEAL_ENGINE,
    KeyRef,
    jvm_sealing,
    key_errors,
    open_columns,
    row_id,
    seal_columns,
)
from ehrlake.security.keys import FileKeyProvider
from ehrlake.security.pseudonym import patient_key
from ehrlake.session import delta_jars


@pytest.fixture
def ref(tmp_path):
    FileKeyProvider(str(tmp_path / "master.key")).create()
    return KeyRef(str(tmp_path / "keystore"), str(tmp_path / "master.key"))


def test_encrypt_then_decrypt_round_trips_and_hides_plaintext(spark, ref):
    key = ref.store().current("bronze.fhir_patient")
    df = spark.createDataFrame(
        [("p1", "Rao", "Pune"), ("p2", "Iyer", None)], "id string, family string, city string"
    )
    sealed = seal_columns(df, ref, key.key_id, {"family": "string", "city": "string"}, row_id("t", ["id"]))
    rows = {r.id: r for r in sealed.collect()}
    assert rows["p1"].family.startswith("ek1:bronze.fhir_patient#v1:") and "Rao" not in rows["p1"].family
    assert rows["p2"].city is None
    plan = sealed._jdf.queryExecution().toString()
    assert key.material.hex() not in plan and base64.b64encode(key.material).decode() not in plan
    opened = open_columns(sealed, ref, {"family": "string", "city": "string"}, row_id("t", ["id"]))
    assert {(r.id, r.family, r.city) for r in opened.collect()} == {
        ("p1", "Rao", "Pune"),
        ("p2", "Iyer", None),
    }


def test_ciphertext_swapped_between_rows_fails_instead_of_decrypting(spark, ref):
    key = ref.store().current("bronze.fhir_patient")
    df = spark.createDataFrame([("p1", "Rao"), ("p2", "Iyer")], "id string, family string")
    sealed = seal_columns(df, ref, key.key_id, {"family": "string"}, row_id("t", ["id"]))
    swapped = sealed.withColumn("id", F.when(F.col("id") == "p1", "p2").otherwise("p1"))
    with pytest.raises(Exception, match="authentication failed"):
        open_columns(swapped, ref, {"family": "string"}, row_id("t", ["id"])).collect()


def test_typed_columns_round_trip_through_their_text_form(spark, ref):
    key_id = ref.store().current_id("bronze.t")
    df = spark.createDataFrame(
        [("p1", ["Asha", "K"], "1970-05-01", 18.52)],
        "id string, given array<string>, born string, lat double",
    ).withColumn("born", F.col("born").cast("date"))
    types = {"given": "array<string>", "born": "date", "lat": "double"}
    sealed = seal_columns(df, ref, key_id, types, row_id("bronze.t", ["id"]))
    assert all(t == "string" for _, t in sealed.select(*types).dtypes)
    back = open_columns(sealed, ref, types, row_id("bronze.t", ["id"])).first()
    assert (back.given, str(back.born), back.lat) == (["Asha", "K"], "1970-05-01", 18.52)


@pytest.fixture(params=["jvm", "python"])
def engine(request, spark, monkeypatch):
    """Each sealing engine: ehrlake's JVM sealer (built by make setup) and the Arrow UDF."""
    monkeypatch.setenv(SEAL_ENGINE, request.param)
    if request.param == "jvm":
        assert any(jar.endswith("ehrlake-spark.jar") for jar in delta_jars()), "make setup builds it"
    assert jvm_sealing(spark) == (request.param == "jvm")
    return request.param


def test_both_engines_seal_records_and_patient_keys_python_opens(spark, ref, tmp_path, engine):
    """The JVM sealer writes what Python opens: records sealed to the reveal public key and
    compressed (zstd with the shipped dictionary), values under the data key, non-ASCII text, and
    the same patient keys as pseudonym.patient_key."""
    reveal_key.create(str(tmp_path / "reveal.key"), ref.key_store)
    store = ref.store()
    key_id, linkage_id = store.current_id("bronze.t"), store.linkage_id()
    record = '{"resourceType": "Patient", "name": [{"family": "Rāo"}], "note": "' + "x" * 500 + '"}'
    df = spark.createDataFrame(
        [("p1", "s", "P-1", record, "Rāo"), ("p2", "s", "P-2", None, "Iyer"), ("p3", "s", None, "{}", "Das")],
        "id string, source_system string, patient string, raw string, family string",
    )
    row = row_id("bronze.t", ["id"])
    columns = {"raw": "string", "family": "string"}
    sealed = seal_columns(df, ref, key_id, columns, row, (linkage_id, "patient"), frozenset({"raw"}))
    rows = {r.id: r for r in sealed.collect()}
    assert rows["p1"].raw.startswith("ek2z:reveal#") and rows["p1"].family.startswith(f"ek1:{key_id}:")
    assert rows["p2"].raw is None and rows["p3"].patient_key is None
    secret = store.get(linkage_id).material
    assert rows["p1"].patient_key == patient_key(secret, "s", "P-1") != rows["p2"].patient_key
    assert "Rāo" not in rows["p1"].raw + rows["p1"].family
    revealing = dataclasses.replace(ref, reveal_key_file=str(tmp_path / "reveal.key"))
    opened = open_columns(sealed, revealing, columns, row).collect()
    assert {(r.id, r.raw, r.family) for r in opened} == {
        ("p1", record, "Rāo"),
        ("p2", None, "Iyer"),
        ("p3", "{}", "Das"),
    }


def test_jvm_sealer_with_the_wrong_master_key_fails_with_a_key_error(spark, ref, tmp_path, engine):
    key_id = ref.store().current_id("bronze.t")
    other = tmp_path / "other.key"
    FileKeyProvider(str(other)).create()
    df = spark.createDataFrame([("p1", "Rao")], "id string, family string")
    wrong = KeyRef(ref.key_store, str(other))
    with pytest.raises(KeyAccessError, match="cannot be unwrapped with the master key"), key_errors():
        seal_columns(df, wrong, key_id, {"family": "string"}, row_id("t", ["id"])).collect()


def test_each_column_keeps_one_ephemeral_key_per_task_in_both_engines(spark, ref, tmp_path, engine):
    """A table's sealed columns share one JVM sealer instance per task: each column keeps its own
    state (one ephemeral reveal key for its values, not one per value, which made every value pay
    an X25519 agreement), as the Arrow UDF keeps one per batch."""
    reveal_key.create(str(tmp_path / "reveal.key"), ref.key_store)
    df = spark.createDataFrame(
        [(f"p{i}", f"Name {i}", f"{i} Main St") for i in range(200)], "id string, a string, b string"
    )
    sealed = seal_columns(
        df.coalesce(1), ref, ref.store().current_id("t"), {"a": "string", "b": "string"},
        row_id("t", ["id"]), to_reveal=frozenset({"a", "b"}),
    ).collect()  # fmt: skip
    for column in ("a", "b"):
        leads = {base64.b64decode(getattr(r, column).rsplit(":", 1)[1])[:32] for r in sealed}
        assert len(leads) == 1, column
