"""The population generator: references stay valid across tables, a seed gives the same files,
damage comes at the configured rate and is quarantined exactly, and the output ingests."""

from __future__ import annotations

import datetime as dt
import glob
import gzip
import hashlib
import json
import os
import shutil

import pandas as pd
import pytest
from pyspark.sql import functions as F

from ehrlake import ingest, synth
from ehrlake.clean import origin
from ehrlake.errors import ConfigError
from ehrlake.ingest import SourceKind
from ehrlake.models.train import split
from ehrlake.synth import amplify
from ehrlake.synth.fhir import RESOURCE_TYPES


def table(out, name) -> pd.DataFrame:
    files = sorted(glob.glob(os.path.join(out, f"{name}.part-*.csv.gz")))
    return pd.concat([pd.read_csv(f, dtype=str) for f in files], ignore_index=True)


def digest(out) -> dict[str, str]:
    return {
        os.path.basename(f): hashlib.sha256(gzip.open(f).read()).hexdigest()
        for f in sorted(glob.glob(os.path.join(out, "*.csv.gz")))
    }


@pytest.fixture(scope="module")
def generated(spark, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "pop")
    report = synth.run(spark, 300, out, seed=7)
    return out, report


def test_references_stay_valid_across_tables(generated):
    out, report = generated
    patients = table(out, "patients")
    assert len(patients) == 300 == patients["id"].nunique() == report.rows["patients"]
    encounters = table(out, "encounters")
    assert set(encounters["patient"]) <= set(patients["id"])
    assert encounters["id"].is_unique
    orgs = table(out, "organizations")
    assert orgs["id"].is_unique and set(encounters["organization"]) <= set(orgs["id"])
    # an encounter's facility is in its patient's state
    org_state = orgs.set_index("id")["state"]
    pat_state = patients.set_index("id")["state"]
    assert (encounters["organization"].map(org_state) == encounters["patient"].map(pat_state)).all()
    for name in ("conditions", "observations", "medications", "procedures", "immunizations"):
        rows = table(out, name)
        assert len(rows) == report.rows[name] > 0
        assert set(rows["patient"]) <= set(patients["id"]), name
        referenced = set(rows["encounter"].dropna())
        assert referenced <= set(encounters["id"]), name
        by_encounter = encounters.set_index("id")["patient"]
        linked = rows[rows["encounter"].notna()]
        assert (linked["encounter"].map(by_encounter) == linked["patient"]).all(), name


def test_demographics_are_resampled_and_nothing_moves_into_the_future(generated):
    out, _ = generated
    patients = table(out, "patients")
    counts = patients["state"].value_counts()
    assert counts.index[0] == "Uttar Pradesh" and len(counts) > 15  # population-weighted
    assert set(patients["country"]) == {"IN"}
    assert patients["ssn"].str.startswith("999-").all()  # made up (999 is never issued), not copied
    assert set(patients["first"]) <= set(amplify._regions(synth.DEFAULT_REGIONS).given)
    today = dt.date.today().isoformat()
    assert patients["birthdate"].max() <= today
    assert table(out, "encounters")["start"].str[:10].max() <= today


def test_same_seed_same_files_other_seed_other_patients(spark, generated, tmp_path):
    out, _ = generated
    again = str(tmp_path / "again")
    synth.run(spark, 300, again, seed=7)
    assert digest(again) == digest(out)
    other = str(tmp_path / "other")
    synth.run(spark, 300, other, seed=8)
    assert not set(table(other, "patients")["id"]) & set(table(out, "patients")["id"])


def cached(spark) -> int:
    """Blocks the session holds for cached frames (a run that keeps them leaks a long session's heap)."""
    return spark.sparkContext._jsc.getPersistentRDDs().size()


def test_damage_at_the_configured_rate_is_quarantined_exactly(spark, lake, tmp_path):
    out = str(tmp_path / "faulty")
    before = cached(spark)
    report = synth.run(spark, 200, out, seed=3, fault_rate=0.05)
    assert cached(spark) == before
    manifest = json.loads(open(os.path.join(out, "_manifest.json")).read())
    assert manifest["faults"] == report.faults
    for name in ("encounters", "observations", "immunizations", "providers"):
        share = sum(report.faults[name].values()) / report.rows[name]
        assert 0.035 < share < 0.065, (name, share)
    result = ingest.run(lake, SourceKind.SYNTHEA_CSV, out, source_system="gen")
    assert result.balanced
    for name, faults in report.faults.items():
        counts = result.entities[f"bronze.synthea_{name}"]
        assert counts.records_in == report.rows[name]
        assert counts.quarantined == sum(faults.values()), name
        assert counts.duplicate == 0, name
    reasons = {r.reason for r in lake.read("ops.quarantine").select("reason").distinct().collect()}
    assert reasons == {"missing_id", "unparseable_date"}


def test_copies_are_linked_to_their_templates_and_never_reach_the_test_split(spark, lake, tmp_path):
    """_lineage -> bronze.generated_patients -> silver.patient_origin: each copy's template_key is
    the key the sample patient got at its own ingest; the split keeps a copy with its template
    (same side, same fold) and drops the copies of test patients, so the test split is all real."""
    samples = tmp_path / "samples"
    for folder in glob.glob(os.path.join(amplify.DEFAULT_TEMPLATES, "*")):  # the templates' patients
        os.makedirs(samples / os.path.basename(folder))
        shutil.copy(os.path.join(folder, "patients.csv.gz"), samples / os.path.basename(folder))
    out = str(tmp_path / "copies")
    synth.run(spark, 400, out, seed=11, tables=(), template_source_system="local")
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(samples), source_system="local")
    report = ingest.run(lake, SourceKind.SYNTHEA_CSV, out, source_system="gen")
    assert any("400 generated patients" in n for n in report.notes)
    how, copies, mark = origin.refresh(lake, "test", "clean", None, "fp")
    assert (how, copies, mark.counts.rows) == ("rebuilt", 400, 400)
    people = lake.read("bronze.synthea_patients").select("patient_key", "source_system")
    links = lake.read(origin.TABLE).drop("source_system").join(people, "patient_key").toPandas()
    assert len(links) == 400 and set(links["source_system"]) == {"gen"}
    real = {r.patient_key for r in people.where("source_system = 'local'").collect()}
    assert set(links["template_key"]) <= real and len(set(links["template_key"])) > 100

    rows = origin.with_templates(lake, people.withColumn("index_id", F.col("patient_key")))
    train_df, test_df = split(rows, seed=42)
    train = {r.patient_key: r.cv_fold for r in train_df.collect()}
    test = {r.patient_key for r in test_df.collect()}
    assert test <= real and 0 < len(test) < len(real)
    template = dict(zip(links["patient_key"], links["template_key"], strict=True))
    kept = [p for p in template if p in train]
    assert kept and all(train[p] == train[template[p]] for p in kept)
    dropped = {p for p, t in template.items() if t in test}
    assert dropped and not dropped & (set(train) | test)
    assert len(train) + len(test) + len(dropped) == len(real) + 400

    # a new batch of copies: appended to what the last refresh left; nothing new, nothing written
    synth.run(spark, 30, str(tmp_path / "more"), seed=12, tables=(), template_source_system="local")
    ingest.run(lake, SourceKind.SYNTHEA_CSV, str(tmp_path / "more"), source_system="gen2")
    how, copies, mark = origin.refresh(lake, "test2", "clean", mark, "fp")
    assert (how, copies) == ("merged +30 ~0 -0", 430) and _same(lake, origin.TABLE, origin.SOURCE)
    version = lake.version(origin.TABLE)
    assert origin.refresh(lake, "test3", "clean", mark, "fp")[:2] == ("unchanged", 430)
    assert lake.version(origin.TABLE) == version
    # another writer since (a copy forgotten): rewritten from bronze, not appended to
    gone = lake.read(origin.TABLE).limit(1).select("patient_key")
    lake.merge(lake.read(origin.TABLE).limit(0), origin.TABLE, ["patient_key"], delete=gone)
    assert origin.refresh(lake, "test4", "clean", mark, "fp")[:2] == ("rebuilt", 430)
    assert _same(lake, origin.TABLE, origin.SOURCE)


def _same(lake, table: str, source: str) -> bool:
    columns = lake.read(table).columns
    return sorted(lake.read(table).collect()) == sorted(lake.read(source).select(*columns).collect())


def test_bad_arguments_are_refused(spark, tmp_path):
    with pytest.raises(ConfigError, match="hl7v2 is not implemented"):
        synth.run(spark, 10, str(tmp_path / "x"), fmt="hl7v2")
    with pytest.raises(ConfigError, match="fault-rate"):
        synth.run(spark, 10, str(tmp_path / "x"), fault_rate=1.5)


def _resources(out) -> list[dict]:
    """Every resource of an NDJSON or Bundle output (unparseable lines skipped: they are the faults)."""
    found = []
    for path in sorted(glob.glob(os.path.join(out, "*.gz"))):
        text = gzip.open(path, "rt").read()
        docs = [text] if path.endswith(".json.gz") else text.splitlines()
        for doc in docs:
            try:
                obj = json.loads(doc)
            except json.JSONDecodeError:
                continue
            found.extend(e["resource"] for e in obj["entry"]) if obj[
                "resourceType"
            ] == "Bundle" else found.append(obj)
    return found


@pytest.mark.parametrize("fmt", ["fhir-ndjson", "fhir-bundles"])
def test_fhir_output_keeps_references_valid_and_ingests_with_its_faults(spark, lake, tmp_path, fmt):
    out = str(tmp_path / fmt)
    before = cached(spark)
    report = synth.run(spark, 120, out, seed=5, fault_rate=0.03, fmt=fmt, tables=("encounters", "conditions",
                       "observations", "medications", "immunizations"))  # fmt: skip
    assert cached(spark) == before
    resources = _resources(out)
    by_type: dict[str, set] = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], set()).add(r.get("id"))
    faults = {RESOURCE_TYPES[n]: sum(f.values()) for n, f in report.faults.items()}
    assert len(by_type["Patient"] - {""}) + faults["Patient"] == 120
    unresolved: dict[str, set] = {}
    for r in resources:
        for field in ("subject", "patient", "encounter", "serviceProvider"):
            ref = r.get(field, {}).get("reference") if isinstance(r.get(field), dict) else None
            if ref:
                kind, rid = ref.split("/", 1)
                if rid not in by_type[kind]:
                    unresolved.setdefault(kind, set()).add(rid)
    # a reference dangles only where its target is one of the damaged records
    for kind, ids in unresolved.items():
        assert len(ids) <= faults[kind], (kind, len(ids), faults[kind])
    assert (
        len(by_type["Observation"]) + report.faults["observations"].get("bad_json", 0)
        == report.rows["observations"]
    )
    kind = SourceKind.FHIR_NDJSON if fmt == "fhir-ndjson" else SourceKind.FHIR_BUNDLES
    result = ingest.run(lake, kind, out, source_system="gen")
    assert result.balanced
    tables = {"patients": "patient", "encounters": "encounter", "conditions": "condition",
              "observations": "observation", "medications": "medication_request", "immunizations": "immunization",
              "organizations": "organization"}  # fmt: skip
    for name, entity in tables.items():
        counts = result.entities[f"bronze.fhir_{entity}"]
        # missing ids are quarantined under their resource type, exactly; an impossible date loads
        # (the date null) and the record says so in conformance_issues
        faults = report.faults[name]
        assert counts.quarantined == faults.get("missing_id", 0), name
        assert counts.with_issues == faults.get("unparseable_date", 0), name
        assert counts.duplicate == 0, name
    # truncated JSON has no readable type: quarantined as malformed, all of it
    malformed = lake.read("ops.quarantine").where("reason = 'malformed_json'").count()
    assert malformed == sum(f.get("bad_json", 0) for f in report.faults.values())
    if fmt == "fhir-ndjson":
        assert sum(f.get("bad_json", 0) for f in report.faults.values()) > 0
    # same seed, same bytes
    again = str(tmp_path / "again")
    synth.run(spark, 120, again, seed=5, fault_rate=0.03, fmt=fmt, tables=("encounters", "conditions",
              "observations", "medications", "immunizations"))  # fmt: skip
    assert {os.path.basename(k): v for k, v in _digest_all(out).items()} == _digest_all(again)


def _digest_all(out) -> dict[str, str]:
    return {
        os.path.basename(f): hashlib.sha256(gzip.open(f).read()).hexdigest()
        for f in sorted(glob.glob(os.path.join(out, "*.gz")))
    }
