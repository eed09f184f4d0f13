"""The whole SMART sample (625 patients) through ingest, counted independently with plain json."""

from __future__ import annotations

import collections
import gzip
import json

import pytest
from conftest import shared

from ehrlake import ingest
from ehrlake.ingest import SourceKind
from ehrlake.ingest.fhir_model import BY_TYPE, OTHER_TABLE


@pytest.mark.slow
def test_smart_625_patients_bronze_rows_equal_resources_in_bundles(lake):
    bundles = shared("synthea_fhir_r4_smart", "bundles")
    distinct: dict[str, set] = collections.defaultdict(set)
    for path in bundles.glob("*.json.gz"):
        for entry in json.load(gzip.open(path)).get("entry", []):
            distinct[entry["resource"]["resourceType"]].add(entry["resource"]["id"])
    report = ingest.run(lake, SourceKind.FHIR_BUNDLES, str(bundles))
    assert report.balanced and report.total.quarantined == 0
    assert lake.row_count("bronze.fhir_patient") == len(distinct["Patient"]) == 625
    for rtype, ids in distinct.items():
        if rtype in BY_TYPE:
            assert lake.row_count(BY_TYPE[rtype].table) == len(ids), rtype
    other = {
        r["resource_type"]: r["count"]
        for r in lake.read(OTHER_TABLE).groupBy("resource_type").count().collect()
    }
    assert other == {t: len(ids) for t, ids in distinct.items() if t not in BY_TYPE}
