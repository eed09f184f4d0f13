"""Every shared FHIR data set through ingest, counted independently with plain json: each resource
lands in a typed bronze table (one ViewDefinition per type in conf/views/), none is quarantined."""

from __future__ import annotations

import collections
import gzip
import json

import pytest
from conftest import shared

from ehrlake import ingest
from ehrlake.ingest import SourceKind, fhir_views
from ehrlake.ingest.fhir_model import OTHER_TABLE


def _open(path):
    return gzip.open(path, "rt") if path.name.endswith(".gz") else open(path)


def _resources(folder, kind: SourceKind):
    for path in sorted(folder.rglob("*")):
        if kind is SourceKind.FHIR_BUNDLES and path.name.endswith((".json", ".json.gz")):
            for entry in json.load(_open(path)).get("entry", []):
                yield entry["resource"]
        elif kind is SourceKind.FHIR_NDJSON and ".ndjson" in path.name:
            with _open(path) as lines:
                yield from (json.loads(line) for line in lines if line.strip())


DATA_SETS = [
    pytest.param(
        ("synthea_fhir_r4_smart", "bundles"), SourceKind.FHIR_BUNDLES, marks=pytest.mark.slow, id="smart-625"
    ),
    pytest.param(("synthea_fhir_r4_hiv",), SourceKind.FHIR_BUNDLES, marks=pytest.mark.slow, id="hiv-79"),
    pytest.param(("fhir_ndjson_pathling",), SourceKind.FHIR_NDJSON, id="pathling-ndjson"),
    pytest.param(("india_abdm_fhir",), SourceKind.FHIR_BUNDLES, id="abdm-documents"),
]


@pytest.mark.parametrize("parts,kind", DATA_SETS)
def test_every_resource_of_a_shared_data_set_lands_typed(lake, parts, kind):
    folder = shared(*parts)
    distinct: dict[str, set] = collections.defaultdict(set)
    total = 0
    for resource in _resources(folder, kind):
        distinct[resource["resourceType"]].add(resource["id"])
        total += 1
    report = ingest.run(lake, kind, str(folder))
    assert report.balanced and report.records_read == total
    assert report.total.quarantined == 0
    views = fhir_views.load()
    untyped = sorted(set(distinct) - set(views))
    assert not untyped, f"types without a view in conf/views/: {untyped}"
    for rtype, ids in distinct.items():
        table = views[rtype].table
        got = {r.id for r in lake.read(table).select("id").collect()}
        assert got == ids, rtype
    assert not lake.exists(OTHER_TABLE)
