"""Column encryption on executors: round trip, no plaintext in output, no key material in the plan."""

from __future__ import annotations

import base64

import pytest
from pyspark.sql import functions as F

from ehrlake.security.columns import KeyRef, open_columns, row_id, seal_columns
from ehrlake.security.keys import FileKeyProvider


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
