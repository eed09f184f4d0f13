"""Key hierarchy, value encryption and patient keys with real cryptography (no Spark needed)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest

from ehrlake.errors import KeyAccessError
from ehrlake.security.crypto import decrypt_value, encrypt_value, key_id_of
from ehrlake.security.keys import EnvKeyProvider, FileKeyProvider, KeyStore
from ehrlake.security.pseudonym import patient_key


@pytest.fixture
def store(tmp_path):
    provider = FileKeyProvider(str(tmp_path / "secrets" / "master.key"))
    provider.create()
    return KeyStore(str(tmp_path / "keystore"), provider)


def test_master_key_file_is_created_0600_and_refused_when_readable_by_others(tmp_path):
    provider = FileKeyProvider(str(tmp_path / "m.key"))
    provider.create()
    assert oct(os.stat(tmp_path / "m.key").st_mode & 0o777) == "0o600"
    assert len(provider.master_key()) == 32
    os.chmod(tmp_path / "m.key", 0o644)
    with pytest.raises(KeyAccessError, match="readable by others"):
        provider.master_key()
    with pytest.raises(FileExistsError):
        provider.create()


def test_values_round_trip_and_carry_their_key_id(store):
    key = store.current("bronze.fhir_patient")
    sealed = encrypt_value(key, "Asha Rao", "local|p1", "family_name")
    assert key_id_of(sealed) == "bronze.fhir_patient#v1" and "Asha" not in sealed
    assert decrypt_value(key, sealed, "local|p1", "family_name") == "Asha Rao"
    assert encrypt_value(key, None, "local|p1", "family_name") is None


def test_ciphertext_moved_to_another_row_or_column_fails_authentication(store):
    key = store.current("bronze.fhir_patient")
    sealed = encrypt_value(key, "Asha Rao", "local|p1", "family_name")
    with pytest.raises(KeyAccessError, match="row 'local\\|p2'"):
        decrypt_value(key, sealed, "local|p2", "family_name")
    with pytest.raises(KeyAccessError, match="authentication failed"):
        decrypt_value(key, sealed, "local|p1", "city")


def test_rotation_keeps_old_versions_readable_and_new_writes_use_the_newest(store):
    old = store.current("bronze.fhir_patient")
    sealed_old = encrypt_value(old, "x", "r", "c")
    assert store.rotate("bronze.fhir_patient") == "bronze.fhir_patient#v2"
    new = store.current("bronze.fhir_patient")
    assert new.key_id.endswith("#v2") and new.material != old.material
    assert decrypt_value(store.get(key_id_of(sealed_old)), sealed_old, "r", "c") == "x"
    assert [v["key_id"] for v in store.versions("bronze.fhir_patient")] == [
        "bronze.fhir_patient#v1",
        "bronze.fhir_patient#v2",
    ]


def test_wrong_master_key_or_missing_version_is_a_clear_error_naming_table_and_key(
    store, tmp_path, monkeypatch
):
    store.current("bronze.fhir_patient")
    monkeypatch.setenv("EHRLAKE_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())
    wrong = KeyStore(str(store.directory), EnvKeyProvider())
    with pytest.raises(
        KeyAccessError, match=r"bronze.fhir_patient: data key bronze.fhir_patient#v1 cannot be unwrapped"
    ):
        wrong.get("bronze.fhir_patient#v1")
    with pytest.raises(KeyAccessError, match="#v9 is not in the key store"):
        store.get("bronze.fhir_patient#v9")


def test_key_store_holds_only_wrapped_keys(store):
    key = store.current("bronze.fhir_patient")
    text = (store.directory / "bronze.fhir_patient.keys.json").read_text()
    assert key.material.hex() not in text and base64.b64encode(key.material).decode() not in text
    assert repr(key) == "DataKey('bronze.fhir_patient#v1')"


def test_patient_key_is_hmac_of_system_and_id_and_links_across_files():
    secret = b"s" * 32
    expected = hmac.new(secret, b"hospital-a|123", hashlib.sha256).hexdigest()
    assert patient_key(secret, "hospital-a", "123") == expected
    assert patient_key(secret, "hospital-a", "123") == patient_key(secret, "hospital-a", "123")
    assert patient_key(secret, "hospital-b", "123") != expected
    assert patient_key(b"t" * 32, "hospital-a", "123") != expected


def test_keys_cli_init_rotate_show_without_spark(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"security:\n  master_key_file: {tmp_path}/s/master.key\n  key_store: {tmp_path}/s/ks\n"
        f"  reveal_key_file: {tmp_path}/s/reveal.key\n"
    )
    cli = [str(Path(sys.executable).parent / "ehrlake"), "keys"]

    def run(*args):
        return subprocess.run([*cli, *args, "--conf", str(conf)], capture_output=True, text=True, timeout=60)

    assert run("init").returncode == 0
    again = run("init")
    assert again.returncode == 1 and "exist already" in again.stderr
    assert run("rotate", "--table", "bronze.fhir_patient").returncode == 0
    assert run("rotate", "--table", "bronze.fhir_patient").returncode == 0
    shown = json.loads(run("show", "--json").stdout)
    assert [v["key_id"] for v in shown["tables"]["bronze.fhir_patient"]] == [
        "bronze.fhir_patient#v1",
        "bronze.fhir_patient#v2",
    ]
    master = (tmp_path / "s" / "master.key").read_text()
    assert master not in run("show").stdout
    bad = run("rotate", "--table", "nolayer")
    assert bad.returncode == 1 and "<layer>.<table>" in bad.stderr


def test_large_values_are_compressed_before_sealing_and_round_trip(store):
    from ehrlake.security.crypto import decrypt_batch, encrypt_batch

    key = store.current("bronze.fhir_observation")
    record = (
        '{"resourceType":"Observation","id":"o1","status":"final","code":{"coding":[{"system":'
        '"http://loinc.org","code":"8302-2","display":"Body Height"}]},"subject":{"reference":'
        '"urn:uuid:p1"},"valueQuantity":{"value":172.3,"unit":"cm","system":"http://unitsofmeasure.org"}}'
    )
    plain, packed = (encrypt_batch(key, [record], ["r1"], "raw", compress=c)[0] for c in (False, True))
    assert plain.startswith("ek1:") and packed.startswith("ek1z:bronze.fhir_observation#v1:")
    assert len(packed) < 0.6 * len(plain)  # the shipped dictionary knows FHIR's shape
    assert decrypt_batch({key.key_id: key}, [packed, plain], ["r1", "r1"], "raw") == [record, record]
    with pytest.raises(KeyAccessError, match="authentication failed"):
        decrypt_batch({key.key_id: key}, [packed], ["r2"], "raw")


def test_concurrent_rotations_from_many_processes_each_add_a_version(tmp_path):
    """20 ``ehrlake keys rotate`` at once on one table (a retry storm): every one succeeds, and
    the table ends with 20 distinct versions that all unwrap; no temporary file is left behind."""
    import subprocess
    import sys
    from pathlib import Path

    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"security:\n  master_key_file: {tmp_path}/s/master.key\n  key_store: {tmp_path}/s/ks\n"
        f"  reveal_key_file: {tmp_path}/s/reveal.key\n"
    )
    cli = [str(Path(sys.executable).parent / "ehrlake"), "keys"]
    assert (
        subprocess.run([*cli, "init", "--conf", str(conf)], capture_output=True, timeout=60).returncode == 0
    )
    procs = [
        subprocess.Popen(
            [*cli, "rotate", "--table", "bronze.fhir_patient", "--conf", str(conf)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(20)
    ]
    outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in outcomes), [err for code, err in outcomes if code]
    store = KeyStore(str(tmp_path / "s" / "ks"), FileKeyProvider(str(tmp_path / "s" / "master.key")))
    ids = [v["key_id"] for v in store.versions("bronze.fhir_patient")]
    assert ids == [f"bronze.fhir_patient#v{i}" for i in range(1, 21)]
    assert len({store.get(i).material for i in ids}) == 20
    assert not list((tmp_path / "s" / "ks").glob("*.tmp"))


def test_values_sealed_to_the_reveal_key_open_only_with_its_private_half(tmp_path):
    """``ek2``: anyone with the public key seals, only the private key opens; bound to row and
    column like ``ek1``; a private key file of another pair is refused by name."""
    from ehrlake.security import reveal_key
    from ehrlake.security.crypto import decrypt_batch, seal_to

    public = reveal_key.create(str(tmp_path / "reveal.key"), str(tmp_path / "ks"))
    assert reveal_key.public_key(str(tmp_path / "ks")) == public
    sealed = [v.decode() for v in seal_to(public, [b"Asha Rao", b"Iyer"], ["r1", "r2"], "family_name")]
    assert all(v.startswith(f"ek2:{public.key_id}:") and "Rao" not in v for v in sealed)
    private = reveal_key.private_key(str(tmp_path / "reveal.key"), public.key_id)
    keys = {public.key_id: private}
    assert decrypt_batch(keys, sealed, ["r1", "r2"], "family_name") == ["Asha Rao", "Iyer"]
    with pytest.raises(KeyAccessError, match="authentication failed"):
        decrypt_batch(keys, sealed[:1], ["r2"], "family_name")
    with pytest.raises(KeyAccessError, match="open only with the reveal key"):
        reveal_key.private_key(None, public.key_id)
    other = reveal_key.create(str(tmp_path / "other.key"), str(tmp_path / "ks2"))
    with pytest.raises(KeyAccessError, match="holds another key"):
        reveal_key.private_key(str(tmp_path / "other.key"), public.key_id)
    with pytest.raises(KeyAccessError, match="exists already"):
        reveal_key.create(str(tmp_path / "reveal.key"), str(tmp_path / "ks3"))
    assert other.key_id != public.key_id
