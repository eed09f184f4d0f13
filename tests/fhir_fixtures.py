"""Small hand-made FHIR resources and bundles for ingest tests (answers computable by hand)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def patient(pid: str, version: str = "1", family: str = "Rao", birth: str = "1970-05-01", **extra) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": version, "lastUpdated": f"2024-01-0{version}T00:00:00Z"},
        "gender": "female",
        "birthDate": birth,
        "name": [{"family": family, "given": ["Asha"]}],
        "address": [{"city": "Pune", "state": "MH", "country": "IN"}],
        **extra,
    }


def condition(cid: str, pid: str, code: str = "44054006", onset: str = "2020-03-01") -> dict:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": "Diabetes"}]},
        "onsetDateTime": onset,
    }


def observation(oid: str, pid: str, value: float = 7.1) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"urn:uuid:{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}]},
        "effectiveDateTime": "2021-01-01T10:00:00+05:30",
        "valueQuantity": {"value": value, "unit": "%", "code": "%"},
    }


def bundle(resources: list[dict], kind: str = "transaction") -> dict:
    entries = []
    for r in resources:
        entry = {"fullUrl": f"urn:uuid:{r.get('id')}", "resource": r}
        if kind in ("transaction", "batch"):
            entry["request"] = {"method": "POST", "url": r.get("resourceType", "")}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def write_ndjson(path: Path, lines: list) -> Path:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_json(path: Path, doc) -> Path:
    data = (doc if isinstance(doc, str) else json.dumps(doc)).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path
