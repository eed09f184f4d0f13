"""The processing copy of FHIR records (security/deidentify.py): what goes, what stays, on real records."""

from __future__ import annotations

import gzip
import json

from conftest import SAMPLE

from ehrlake.security.deidentify import REDACTED, fhir_record


def _copy(resource: dict) -> dict:
    return json.loads(fhir_record(json.dumps(resource).encode()))


def test_direct_identifiers_go_and_clinical_content_stays():
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "text": {"status": "generated", "div": "<div>Asha Rao, 12 MG Road</div>"},
        "extension": [
            {
                "url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                "valueString": "Iyer",
            },
            {"url": "http://example.org/home", "valueAddress": {"line": ["12 MG Road"]}},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F"},
        ],
        "identifier": [{"system": "https://healthid.abdm.gov.in", "value": "91-1234-5678-9012"}],
        "name": [{"family": "Rao", "given": ["Asha"]}],
        "telecom": [{"system": "phone", "value": "+91-98450-11111"}],
        "address": [{"line": ["12 MG Road"], "city": "Pune"}],
        "photo": [{"contentType": "image/jpeg", "data": "AAAA"}],
        "contact": [{"name": {"family": "Rao"}}],
        "gender": "female",
        "birthDate": "1970-05-01",
        "deceasedDateTime": "Asha Rao, see notes",  # text typed into a date element
        "managingOrganization": {"reference": "Organization/o1", "display": "Dr. Mehta's clinic"},
    }
    copy = _copy(patient)
    assert copy["identifier"] == [{"system": "https://healthid.abdm.gov.in"}]  # which kind, not the number
    assert copy["extension"] == [patient["extension"][2]]
    assert copy["managingOrganization"] == {"reference": "Organization/o1"}
    assert {k: copy[k] for k in ("id", "gender", "birthDate")} == {
        "id": "p1",
        "gender": "female",
        "birthDate": "1970-05-01",
    }
    assert not {"name", "telecom", "address", "photo", "contact", "text", "deceasedDateTime"} & set(copy)
    assert copy["meta"]["security"] == [REDACTED]
    for secret in ("Rao", "Asha", "MG Road", "98450", "5678", "Iyer", "Mehta"):
        assert secret not in json.dumps(copy)


def test_codes_values_and_organisation_names_stay_notes_and_attachments_go():
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "meta": {"lastUpdated": "2024-01-01T00:00:00Z", "security": [{"code": "N"}]},
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "HbA1c"}],
            "text": "HbA1c",
        },
        "valueQuantity": {"value": 7.1, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
        "effectivePeriod": {"start": "2021-01-01T10:00:00+05:30", "end": "2021-01-01"},
        "performer": [{"reference": "Practitioner/d1", "display": "Dr. Anil Mehta"}],
        "note": [{"text": "Asha says her husband Ravi ..."}],
    }
    copy = _copy(obs)
    assert copy["code"] == obs["code"] and copy["valueQuantity"] == obs["valueQuantity"]
    assert copy["effectivePeriod"] == obs["effectivePeriod"] and "note" not in copy
    assert copy["meta"] == {"lastUpdated": "2024-01-01T00:00:00Z", "security": [{"code": "N"}, REDACTED]}
    org = _copy(
        {"resourceType": "Organization", "id": "o", "name": "AIIMS Delhi", "telecom": [{"value": "011"}]}
    )
    assert org["name"] == "AIIMS Delhi" and "telecom" not in org
    doc = _copy(
        {
            "resourceType": "DocumentReference",
            "id": "d",
            "masterIdentifier": {"system": "s", "value": "v-123"},
            "content": [
                {"attachment": {"contentType": "text/plain", "data": "QXNoYSBSYW8=", "url": "Binary/1"}}
            ],
        }
    )
    assert doc["masterIdentifier"] == {"system": "s"}
    assert doc["content"] == [{"attachment": {"contentType": "text/plain"}}]


def test_unreadable_or_too_deep_records_keep_nothing_and_do_not_crash():
    for text in (b"not json", b"[1, 2]", b'{"a":' * 5000 + b"1" + b"}" * 5000):
        assert json.loads(fhir_record(text)) == {"meta": {"security": [REDACTED]}}
    assert fhir_record(None) is None


def test_no_patient_name_phone_or_ssn_survives_in_the_sample_bundles():
    """Every record of the bundled SMART sample (40 patients, ~12,000 resources): no patient's name,
    phone, street, SSN, driver's licence or passport number in any record's processing copy."""
    records, needles = [], set()
    for path in sorted((SAMPLE / "fhir_bundles").glob("*.json.gz")):
        with gzip.open(path, "rt") as fh:
            entries = json.load(fh).get("entry", [])
        for entry in entries:
            resource = entry["resource"]
            records.append(json.dumps(resource).encode())
            if resource["resourceType"] == "Patient":
                for name in resource.get("name", []):
                    needles.update([name.get("family"), *name.get("given", [])])
                needles.update(t.get("value") for t in resource.get("telecom", []))
                needles.update(line for a in resource.get("address", []) for line in a.get("line", []))
                needles.update(i.get("value") for i in resource.get("identifier", []))
    needles = {n for n in needles if n and len(n) >= 5}
    assert len(records) > 10_000 and len(needles) > 150
    copies = b"\n".join(fhir_record(r) for r in records).decode()
    assert [n for n in needles if n in copies] == []
    assert copies.count('"code":"REDACTED"') == len(records)
