"""Roles bound to identities: grants signed by a key administrator, checked for the OS user."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from fhir_fixtures import patient, write_ndjson

from ehrlake import ingest
from ehrlake.errors import AccessDenied
from ehrlake.ingest import SourceKind
from ehrlake.security.grants import Grants, current_user


@pytest.fixture
def deployment(spark, tmp_path, security_conf):
    """A lake with the session's keys and a grant administrator of its own; ``make(roles)`` grants
    the current user those roles and opens the lake (``reveals_per_hour`` optional)."""
    import yaml

    from ehrlake import config
    from ehrlake.lake import Lake
    from ehrlake.security import Security

    base = yaml.safe_load(security_conf.read_text())["security"]
    grants = Grants(tmp_path / "grants")
    admin = str(tmp_path / "admin.key")
    grants.init(admin)
    root = str(tmp_path / "lake")

    def make(roles, reveals_per_hour=20):
        grants.issue(admin, current_user(), list(roles))
        security = config.SecurityConfig(
            **{**base, "grants": str(grants.directory), "grant_admin_key": admin},
            reveals_per_hour=reveals_per_hour,
        )
        return Lake(root, spark, security=Security.from_config(security, root))

    make.grants, make.admin = grants, admin
    return make


def test_a_role_the_user_holds_no_grant_for_is_refused_whatever_role_says(deployment, tmp_path):
    lake = deployment(["analyst"])
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1")])
    with pytest.raises(AccessDenied, match=f"user {current_user()} holds no grant for role engineer"):
        ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"), role="engineer")
    assert not lake.exists("bronze.fhir_patient")
    lake = deployment(["engineer", "analyst"])  # the administrator adds engineer
    assert ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in"), role="engineer").balanced
    with pytest.raises(AccessDenied, match="may not read bronze.fhir_patient"):
        lake.read("bronze.fhir_patient", role="analyst")  # --role narrows to a granted, weaker role
    assert lake.security.audit.verify(lake).ok  # the refusals are in the chain, signed


def test_a_forged_or_edited_grant_is_refused(deployment):
    lake = deployment(["analyst"])
    path = deployment.grants.grant_file(current_user())
    grant = json.loads(path.read_text())
    path.write_text(json.dumps({**grant, "roles": ["analyst", "clinician"]}))  # self-promotion
    with pytest.raises(AccessDenied, match="not signed by the grant administrator"):
        lake.security.access.role("analyst", "read")


def test_removing_the_administrator_key_does_not_switch_grants_off(deployment, tmp_path):
    lake = deployment(["engineer"])
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1")])
    assert ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in")).balanced  # the lake learns the key
    deployment.grants.public_file.unlink()
    with pytest.raises(AccessDenied, match="enforces role grants signed by key"):
        lake.security.access.role("clinician", "reveal")


def test_reveals_beyond_the_hourly_limit_are_refused_and_audited(deployment, tmp_path):
    lake = deployment(["engineer", "clinician", "auditor"], reveals_per_hour=2)
    write_ndjson(tmp_path / "in" / "Patient.ndjson", [patient("p1"), patient("p2"), patient("p3")])
    assert ingest.run(lake, SourceKind.FHIR_NDJSON, str(tmp_path / "in")).balanced
    keys = [r.patient_key for r in lake.read("bronze.fhir_patient", role="engineer").collect()]
    for key in keys[:2]:
        assert lake.reveal("bronze.fhir_patient", key, "clinician", "follow-up").count() == 1
    with pytest.raises(AccessDenied, match="revealed 2 patients in the last hour"):
        lake.reveal("bronze.fhir_patient", keys[2], "clinician", "follow-up")
    events = lake.read("audit.events", role="auditor").where("action = 'reveal'").collect()
    assert sorted(e.outcome for e in events) == ["allowed", "allowed", "denied"]


def test_grants_cli_init_add_show(tmp_path):
    conf = tmp_path / "conf.yaml"
    conf.write_text(
        f"security:\n  grants: {tmp_path}/g\n  grant_admin_key: {tmp_path}/admin.key\n"
        f"  access_policy: {REPO / 'conf' / 'access_policy.yaml'}\n"
    )
    cli = [str(Path(sys.executable).parent / "ehrlake"), "grants"]

    def run(*args):
        return subprocess.run([*cli, *args, "--conf", str(conf)], capture_output=True, text=True, timeout=60)

    assert "roles are self-declared" in run("show").stdout
    assert run("init").returncode == 0
    assert run("add", "--user", "asha", "--role", "clinician", "--role", "analyst").returncode == 0
    assert run("show").stdout.strip() == "asha: analyst, clinician"
    bad = run("add", "--user", "asha", "--role", "superuser")
    assert bad.returncode == 1 and "unknown role(s) superuser" in bad.stderr
    again = run("init")
    assert again.returncode == 1 and "not replacing them" in again.stderr
