"""Every shared FHIR data set through ingest, counted independently with plain json: each resource
lands in a typed bronze table (one ViewDefinition per type in conf/views/), none is quarantined.

A resource is identified by its id, except inside a FHIR document (``Bundle.type = document``) whose
entries have relative fullUrls: those ids are local to the document (the ABDM samples both hold a
``Composition/1`` and an ``Observation/7``), so each document's entry is a record of its own.

The two Synthea sets (625 and 79 patients, 31 MB and 7 MB gzipped) are ingested as the few bundles
that between them hold every shape found in the whole set (each resource type with each combination of
fields it comes with: 46 shapes in 8 bundles of the 625): what could fail to land typed is a shape, not
a count, and the whole set took 4.5 minutes on 2 cores. The whole SMART set is still ingested by
the benches (bench/_lake.py), which do not check it resource by resource; the rest of the HIV set is
ingested by nothing now."""

from __future__ import annotations

import collections
import gzip
import json
import shutil

import pytest
from conftest import shared

from ehrlake import ingest
from ehrlake.ingest import SourceKind, fhir_views
from ehrlake.ingest.fhir_model import OTHER_TABLE


def _open(path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _resources(folder, kind: SourceKind):
    """(resource, its identity): the id, or (document identifier, fullUrl) inside a document."""
    for path in sorted(folder.rglob("*")):
        if kind is SourceKind.FHIR_BUNDLES and path.name.endswith((".json", ".json.gz")):
            bundle = json.load(_open(path))
            document = bundle.get("type") == "document"
            for entry in bundle.get("entry", []):
                resource, url = entry["resource"], entry.get("fullUrl", "")
                local = document and ":" not in url
                yield resource, (json.dumps(bundle["identifier"]), url) if local else resource["id"]
        elif kind is SourceKind.FHIR_NDJSON and ".ndjson" in path.name:
            with _open(path) as lines:
                yield from ((r, r["id"]) for r in (json.loads(line) for line in lines if line.strip()))


def _shapes(path) -> set[tuple]:
    """Each resource type in a bundle file with the fields it comes with."""
    return {
        (entry["resource"]["resourceType"], tuple(sorted(entry["resource"])))
        for entry in json.load(_open(path)).get("entry", [])
    }


def _every_shape(folder, into):
    """Copies into ``into`` the bundle files (chosen greedily) that hold every shape in ``folder``."""
    shapes = {path: _shapes(path) for path in sorted(folder.rglob("*.json*"))}
    wanted, chosen = set().union(*shapes.values()), []
    while wanted:
        path = max(shapes, key=lambda p: len(shapes[p] & wanted))
        chosen.append(path)
        wanted -= shapes.pop(path)
    into.mkdir()
    for path in chosen:
        shutil.copy(path, into / path.name)
    return into


DATA_SETS = [
    pytest.param(
        ("synthea_fhir_r4_smart", "bundles"),
        SourceKind.FHIR_BUNDLES,
        True,
        id="smart-625-shapes",
        marks=pytest.mark.heavy,
    ),
    pytest.param(
        ("synthea_fhir_r4_hiv",), SourceKind.FHIR_BUNDLES, True, id="hiv-79-shapes", marks=pytest.mark.heavy
    ),
    pytest.param(("fhir_ndjson_pathling",), SourceKind.FHIR_NDJSON, False, id="pathling-ndjson"),
    pytest.param(("india_abdm_fhir",), SourceKind.FHIR_BUNDLES, False, id="abdm-documents"),
]


@pytest.mark.parametrize("parts,kind,shapes_only", DATA_SETS)
def test_every_resource_of_a_shared_data_set_lands_typed(lake, tmp_path, parts, kind, shapes_only):
    folder = shared(*parts)
    if shapes_only:
        folder = _every_shape(folder, tmp_path / "shapes")
        assert 1 < len(list(folder.iterdir())) < 20
    distinct: dict[str, set] = collections.defaultdict(set)
    total = 0
    for resource, identity in _resources(folder, kind):
        distinct[resource["resourceType"]].add(identity)
        total += 1
    report = ingest.run(lake, kind, str(folder))
    assert report.balanced and report.records_read == total
    assert report.total.quarantined == 0
    views = fhir_views.load()
    untyped = sorted(set(distinct) - set(views))
    assert not untyped, f"types without a view in conf/views/: {untyped}"
    for rtype, identities in distinct.items():
        table = views[rtype].table
        got = {r.id for r in lake.read(table).select("id").collect()}
        ids = {i for i in identities if isinstance(i, str)}
        assert ids <= got and len(got) == len(identities), rtype
    assert not lake.exists(OTHER_TABLE)


def test_a_documents_records_keep_apart_from_another_documents_and_point_at_their_own_patient(lake):
    """Both ABDM documents are about their own ``Patient/1``: each lands as a patient, and every
    Observation links to the patient of the document it came in (not to the other document's)."""
    ingest.run(lake, SourceKind.FHIR_BUNDLES, str(shared("india_abdm_fhir")))
    patients = {r.id for r in lake.read("bronze.fhir_patient").select("id").collect()}
    assert len(patients) == 2
    observations = lake.read("bronze.fhir_observation").select("id", "patient_id", "source_file").collect()
    assert len(observations) == 11
    by_file = collections.defaultdict(set)
    for o in observations:
        assert o.patient_id in patients
        assert o.id.split(".")[0] == o.patient_id.split(".")[0]  # the document's scope
        by_file[o.source_file].add(o.patient_id)
    assert len(by_file) == 2 and all(len(p) == 1 for p in by_file.values())
    assert by_file[min(by_file)] != by_file[max(by_file)]
    history = lake.read("bronze.fhir_family_member_history").select("id", "conformance_issues").collect()
    assert len(history) == 2  # the second entry's id repeats the first's; its fullUrl does not
    assert sum(bool(h.conformance_issues) for h in history) == 1
