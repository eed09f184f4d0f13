"""Encryption at ingest, end to end on the bundled sample data: no identifier and no key in clear."""

from __future__ import annotations

import base64
import csv
import functools
import gzip
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, SAMPLE, opened
from fhir_fixtures import bundle, condition, patient, write_json, write_ndjson

from ehrlake import ingest
from ehrlake.ingest import SourceKind
from ehrlake.security.keys import LINKAGE, FileKeyProvider

MIN_NEEDLE = 7  # shorter strings occur by chance in megabytes of base64 ciphertext
PATIENT_CSV_IDENTIFIERS = ("SSN", "DRIVERS", "PASSPORT", "FIRST", "LAST", "MAIDEN", "ADDRESS")


def _fhir_resources():
    for path in sorted((SAMPLE / "fhir_bundles").rglob("*.json*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            entries = json.load(fh).get("entry", [])
        for entry in entries:
            yield entry.get("resource") or {}
    for path in sorted((SAMPLE / "fhir_ndjson").rglob("*.ndjson*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def sample_identifiers() -> set[str]:
    """Names, street lines, phone numbers and identifiers (SSN, MRN, licence, passport) of every
    patient in the sample inputs, read straight from the files. A name that is also a place kept in
    clear (a surname like a county's) is left out: finding the county is not finding the name."""
    found: set[str] = set()
    places: set[str] = set()
    for resource in _fhir_resources():
        for address in resource.get("address", []):
            places.update(address.get(k) or "" for k in ("city", "district", "state", "country"))
        if resource.get("resourceType") != "Patient":
            continue
        for name in resource.get("name", []):
            found.update([name.get("family") or "", *name.get("given", [])])
        for address in resource.get("address", []):
            found.update(address.get("line", []))
        found.update(t.get("value") or "" for t in resource.get("telecom", []))
        found.update(
            i.get("value") or "" for i in resource.get("identifier", []) if i.get("value") != resource["id"]
        )
    for path in sorted((SAMPLE / "synthea_csv").rglob("patients.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                found.update(row.get(c) or "" for c in PATIENT_CSV_IDENTIFIERS)
                places.update(row.get(c) or "" for c in ("CITY", "COUNTY", "STATE"))
    place_text = "\n".join(places)
    # the SMART bundles are named by their patient's MRN: file names are lineage, kept in clear (see
    # docs/security.md, what remains trusted), so an MRN that is also a file name is not looked for
    file_names = "\n".join(p.name for p in SAMPLE.rglob("*"))
    return {s for s in found if len(s) >= MIN_NEEDLE and s not in place_text and s not in file_names}


CIPHERTEXT = re.compile(rb"ek[12]z?:[^:\s\"]{1,80}:[A-Za-z0-9+/=]+")


def _plaintext_hits(data: bytes, needles: list[bytes]) -> list[bytes]:
    """Needles found as whole tokens (not inside a longer ASCII word) once ciphertext is cut out.
    One scan for all needles (a needle overlapped by an earlier hit may go unnamed: any hit fails)."""
    return _whole_tokens(tuple(needles)).findall(CIPHERTEXT.sub(b" ", data))


@functools.lru_cache(maxsize=4)
def _whole_tokens(needles: tuple[bytes, ...]) -> re.Pattern:
    longest_first = sorted(needles, key=len, reverse=True)
    return re.compile(
        rb"(?<![A-Za-z0-9])(?:" + b"|".join(map(re.escape, longest_first)) + rb")(?![A-Za-z0-9])"
    )


def test_the_scan_finds_a_name_in_clear_and_not_inside_a_word_or_ciphertext():
    """The scan the no-plaintext tests rely on can fail: a name as a token is found, in a Parquet
    page or a JSON log line alike; inside a longer word or a sealed value it is not."""
    needles = [b"Ramesh Kumar", b"555-0142"]
    assert _plaintext_hits(b'{"stats":"Ramesh Kumar"}', needles) == [b"Ramesh Kumar"]
    assert _plaintext_hits(b"tel:555-0142\n", needles) == [b"555-0142"]
    assert _plaintext_hits(b"XRamesh Kumarx 1555-01420", needles) == []
    assert _plaintext_hits(b"ek1:patient#3:UmFtZXNoIEt1bWFy", [b"UmFtZXNoIEt1bWFy"]) == []


@pytest.mark.slow
@pytest.mark.heavy
def test_sample_ingest_leaves_no_patient_identifier_in_clear_in_any_lake_file(lake, tmp_path):
    needles = sorted(sample_identifiers())
    assert len(needles) > 500  # names, SSNs, streets and phones of hundreds of patients
    bad = tmp_path / "bad"  # identifiers in records that fail: their payloads are quarantined, sealed
    no_id = patient("q1", family="Quarantinova", birth="31/12/1970")
    del no_id["id"]
    unreadable_date = patient("q2", family="Datewrongova", birth="30/12/1970")  # loaded, date null
    # identifying text typed into fields that are not read as text: it must not surface in a
    # quarantine message, a conformance issue, or a Parquet / Delta min-max statistic
    wrong_type = {"resourceType": "Zorabhai Quettawala", "id": "q3"}
    wrong_fields = patient("q4", deceasedDateTime="Deceasewrongova Kumari")
    wrong_fields["meta"]["lastUpdated"] = "Lastupdatova Devi"
    write_ndjson(bad / "Patient.ndjson", [no_id, unreadable_date, wrong_type, wrong_fields])
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "conditions.csv").write_text(
        "START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION\nCsvdatewrongova Rani,,p1,e1,44054006,Diabetes\n"
    )
    for kind, folder in (
        (SourceKind.FHIR_BUNDLES, SAMPLE / "fhir_bundles"),
        (SourceKind.FHIR_NDJSON, SAMPLE / "fhir_ndjson"),
        (SourceKind.SYNTHEA_CSV, SAMPLE / "synthea_csv"),
        (SourceKind.FHIR_NDJSON, bad),
        (SourceKind.SYNTHEA_CSV, csv),
    ):
        assert ingest.run(lake, kind, str(folder)).balanced
    planted = ["Quarantinova", "Datewrongova", "30/12/1970", "Zorabhai", "Deceasewrongova", "Lastupdatova"]
    raw_needles = [n.encode() for n in [*needles, *planted, "Csvdatewrongova"]]

    files = [p for p in Path(lake.root).rglob("*") if p.is_file()]
    assert any("_delta_log" in str(p) for p in files) and any(p.suffix == ".parquet" for p in files)
    for path in files:  # every byte: data files, Delta logs (with column stats), staging, quarantine
        assert not _plaintext_hits(path.read_bytes(), raw_needles), path
        if path.suffix == ".parquet":  # and every decoded value, since pages may be compressed
            table = pq.read_table(path)
            text = "\n".join(
                str(v) for column in table.columns for v in column.to_pylist() if v is not None
            ).encode()
            assert not _plaintext_hits(text, raw_needles), path

    # what a job holding the master key (not the reveal key) can open, in every table: no identifier
    # (dates stay under the data key: 30/12/1970 is q2's unreadable birth date)
    readable = _opened_by_jobs(lake)
    assert "raw_deid" in readable and "REDACTED" in readable  # the processing copies were opened
    assert not _plaintext_hits(readable.encode(), [n for n in raw_needles if n != b"30/12/1970"])

    # the values are there, sealed: opening them gives the sample's identifiers back
    names = {r.family_name for r in opened(lake, "bronze.fhir_patient").select("family_name").collect()}
    first_family = {
        (r.get("name") or [{}])[0].get("family")
        for r in _fhir_resources()
        if r.get("resourceType") == "Patient"
    }
    assert first_family - {None} <= names and len(names & set(needles)) > 40
    quarantined = opened(lake, "ops.quarantine").where("source_file LIKE '%bad%'").first()
    assert "Quarantinova" in quarantined.raw and "31/12/1970" not in quarantined.message
    patients = lake.read("bronze.fhir_patient")
    assert {"birth_year", "city", "state", "patient_key"} <= set(patients.columns)
    # q2's birth date is not a date: loaded with birth_date and birth_year null (see its conformance_issues)
    assert patients.where("id <> 'q2' AND (birth_year IS NULL OR patient_key IS NULL)").count() == 0


def _opened_by_jobs(lake) -> str:
    """Every value of every lake table as a job sees it after opening what the master key opens (all
    columns under data keys), one table after another."""
    from pyspark.sql import functions as F

    from ehrlake.security.protection import Sealing

    texts = []
    for info in lake.tables():
        df = lake.read(info.name)
        sealing = Sealing.of(df.schema)
        if sealing and sealing.under_data_key.columns:
            df = lake.security.protector.open(df, info.name, sealing.under_data_key)
        texts.append(f"{info.name} " + " ".join(df.columns))
        row = F.to_json(F.struct(*[F.col(f"`{c}`") for c in df.columns]))
        texts += [r[0] for r in df.select(row).toLocalIterator()]
    return "\n".join(texts)


def test_patient_key_links_one_patient_across_files_and_source_kinds_and_is_an_hmac(lake, tmp_path):
    write_ndjson(tmp_path / "a" / "Patient.ndjson", [patient("p1")])
    write_ndjson(tmp_path / "a" / "Condition.ndjson", [condition("c1", "p1")])
    write_json(tmp_path / "b" / "b.json", bundle([condition("c2", "p1"), condition("c3", "p2")]))
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "a"))
    ingest.run(lake, SourceKind.FHIR_BUNDLES, str(tmp_path / "b"))
    write_ndjson(tmp_path / "h" / "Condition.ndjson", [condition("c9", "p1")])
    ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "h"), source_system="hospital-b")

    store = lake.security.protector.store
    secret = store.get(store.linkage_id()).material
    expected = hmac.new(secret, b"local|p1", hashlib.sha256).hexdigest()
    keys = {r.id: r.patient_key for r in lake.read("bronze.fhir_condition").collect()}
    assert lake.read("bronze.fhir_patient").first().patient_key == expected
    assert keys["c1"] == keys["c2"] == expected  # two files, two source kinds, one patient
    assert keys["c3"] != expected and keys["c9"] != expected  # another patient; another hospital's p1
    assert expected != hashlib.sha256(b"local|p1").hexdigest()  # keyed: not recomputable without the secret
    with pytest.raises(Exception, match="never rotated"):
        store.rotate(LINKAGE)


def _key_material(secrets: Path, store_dir: Path) -> dict[str, bytes]:
    from ehrlake.security.keys import KeyStore

    provider = FileKeyProvider(str(secrets / "master.key"))
    store = KeyStore(str(store_dir), provider)
    material = {"master": provider.master_key()}
    if (secrets / "reveal.key").is_file():  # the reveal private key: never read by a job
        material["reveal"] = base64.b64decode((secrets / "reveal.key").read_text())
    for table in store.tables():
        for version in store.versions(table):
            material[version["key_id"]] = store.get(version["key_id"]).material
    return material


@pytest.mark.slow
@pytest.mark.heavy
def test_no_key_material_in_event_logs_logs_plans_delta_log_or_data(tmp_path, security_conf):
    """An ingest with Spark event logging on (every plan and task is logged): searched byte by byte
    for every key it used (master, data keys, linkage secret) raw, in hex and in base64."""
    security = yaml.safe_load(security_conf.read_text())["security"]
    events = tmp_path / "events"
    events.mkdir()
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "security": security,
                "spark": {
                    "master": "local[2]",
                    "conf": {
                        "spark.sql.session.timeZone": "UTC",
                        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
                        "spark.sql.shuffle.partitions": "4",
                        "spark.eventLog.enabled": "true",
                        "spark.eventLog.dir": str(events),
                        "spark.eventLog.compress": "false",  # searchable bytes
                        "spark.ui.enabled": "false",
                    },
                },
            }
        )
    )
    lake = tmp_path / "lake"
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [
            str(bin_dir / "ehrlake"),
            "ingest",
            "--source",
            "synthea-csv",
            "--input",
            str(SAMPLE / "synthea_csv"),
            "--lake",
            str(lake),
            "--conf",
            str(conf),
        ],  # fmt: skip
        capture_output=True,
        env={**__import__("os").environ, "PYSPARK_PYTHON": sys.executable},
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logs = [p for p in events.rglob("*") if p.is_file()]
    # the sealing step's plan was logged (sealed in the JVM where ehrlake's Spark classes are built,
    # else by an Arrow UDF)
    assert any(b"ehrlake_seal(" in p.read_bytes() or b"ArrowEvalPython" in p.read_bytes() for p in logs)

    material = _key_material(Path(security["master_key_file"]).parent, Path(security["key_store"]))
    assert {"master", "reveal", f"{LINKAGE}#v1", "bronze.synthea_patients#v1"} <= set(material)
    forms = {
        f"{name} {form}": encoded
        for name, key in material.items()
        for form, encoded in (
            ("raw", key),
            ("hex", key.hex().encode()),
            ("HEX", key.hex().upper().encode()),
            ("base64", base64.b64encode(key)),
            ("base64url", base64.urlsafe_b64encode(key).rstrip(b"=")),
        )
    }
    searched = [*logs, *(p for p in lake.rglob("*") if p.is_file()), *Path(security["key_store"]).iterdir()]
    blobs = [(str(p), p.read_bytes()) for p in searched] + [
        ("stdout", result.stdout),
        ("stderr", result.stderr),
    ]
    leaks = [(where, what) for where, blob in blobs for what, encoded in forms.items() if encoded in blob]
    assert not leaks


def test_a_job_against_another_or_an_empty_key_store_is_refused_and_creates_no_keys(spark, tmp_path):
    """Run from another directory, a relative ``key_store`` names a new, empty store: the job must
    stop and say where the lake's store is, instead of sealing rows with keys nobody else has."""
    import shutil

    from ehrlake.config import SecurityConfig
    from ehrlake.errors import KeyAccessError
    from ehrlake.lake import Lake
    from ehrlake.security import Security, init_keys

    def lake_from(directory):
        return Lake(root, spark, security=Security.from_config(secured(directory), root))

    def secured(directory):
        return SecurityConfig(
            master_key_file=str(directory / "secrets" / "master.key"),
            key_store=str(directory / "secrets" / "keystore"),
            reveal_key_file=str(directory / "secrets" / "reveal.key"),
            access_policy=str(REPO / "conf" / "access_policy.yaml"),
        )

    home, elsewhere, other = tmp_path / "home", tmp_path / "elsewhere", tmp_path / "other"
    init_keys(secured(home))
    root = str(tmp_path / "lake")
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1")])
    assert ingest.run(lake_from(home), SourceKind.FHIR_NDJSON, str(tmp_path / "in")).balanced
    # the same master key (as $EHRLAKE_MASTER_KEY would give it), but no key store in that directory
    (elsewhere / "secrets").mkdir(parents=True)
    shutil.copy(home / "secrets" / "master.key", elsewhere / "secrets" / "master.key")
    write_ndjson(tmp_path / "more" / "Patient.ndjson", [patient("p2")])
    expected = f"bound to the key store at {home / 'secrets' / 'keystore'}"
    with pytest.raises(KeyAccessError, match=expected):
        ingest.run(lake_from(elsewhere), SourceKind.FHIR_NDJSON, str(tmp_path / "more"))
    assert not (elsewhere / "secrets" / "keystore").exists()
    # another, real key store: refused too
    init_keys(secured(other))
    with pytest.raises(KeyAccessError, match="is another key store"):
        ingest.run(lake_from(other), SourceKind.FHIR_NDJSON, str(tmp_path / "more"))
    # a lake from before identities (no identity file) holding sealed rows, and an empty store
    os.remove(os.path.join(root, "_ehrlake", "identity.json"))
    with pytest.raises(KeyAccessError, match="holds sealed tables but the configured key store"):
        ingest.run(lake_from(elsewhere), SourceKind.FHIR_NDJSON, str(tmp_path / "more"))
    assert lake_from(home).read("bronze.fhir_patient").count() == 1


def test_a_swapped_reveal_public_key_is_refused_before_anything_is_sealed_to_it(isolated_lake, tmp_path):
    """Whoever replaces ``reveal.pub`` in the key store by a key of their own could open every
    identifier sealed afterwards: the lake records its reveal key on first use and refuses another."""
    from ehrlake.errors import KeyAccessError
    from ehrlake.security import reveal_key

    lake = isolated_lake
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1")])
    assert ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in")).balanced
    store = lake.security.protector.store.directory
    original = (store / reveal_key.PUBLIC_FILE).read_text()
    (store / reveal_key.PUBLIC_FILE).unlink()
    reveal_key.create(str(tmp_path / "mine.key"), str(store))  # the attacker's pair
    write_ndjson(tmp_path / "more" / "Patient.ndjson", [patient("p2")])
    with pytest.raises(KeyAccessError, match="seals identifiers to reveal key reveal#.*holds another one"):
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "more"))
    (store / reveal_key.PUBLIC_FILE).write_text(original)
    assert ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "more")).balanced
    assert lake.read("bronze.fhir_patient").count() == 2


def test_a_spark_setting_carrying_the_master_key_is_refused_before_anything_runs(tmp_path, security_conf):
    """``spark.executorEnv.EHRLAKE_MASTER_KEY`` (once suggested by the docs) puts the key into the
    event log: refused from the configuration and from spark-submit's ``--conf`` alike."""
    security = yaml.safe_load(security_conf.read_text())["security"]
    setting = "spark.executorEnv.EHRLAKE_MASTER_KEY"
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump({"security": security, "spark": {"conf": {setting: "c2VjcmV0"}}}))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"security": security}))
    dump = write_ndjson(tmp_path / "Patient.ndjson", [patient("p1")])
    runs = [
        (["--conf", str(conf)], {}),
        (["--conf", str(plain)], {"PYSPARK_SUBMIT_ARGS": f"--conf {setting}=c2VjcmV0 pyspark-shell"}),
    ]
    for args, extra in runs:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "ehrlake"),
                "ingest",
                "--source",
                "fhir-ndjson",
                "--input",
                str(dump),
                "--lake",
                str(tmp_path / "l"),
                *args,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            env={**os.environ, "PYSPARK_PYTHON": sys.executable, **extra},
            cwd=REPO,
            timeout=300,
        )
        assert result.returncode != 0
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"ehrlake: error: Spark setting {setting} would write the master key"), last
        assert not (tmp_path / "l").exists()
