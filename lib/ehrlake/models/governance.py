"""Model governance: no model reaches production without a reviewer's approval.

``train --promote`` only *nominates* the best model of a run. A reviewer (a role of the access
policy with ``approve_models``: ``reviewer`` in the default policy, which trains nothing) approves
or rejects a version with a stated note: ``ehrlake models approve``. Approving a nominated version
makes it the task's production model in the same job; any approved version can be promoted later
(``ehrlake models promote``), one without a standing approval never. The role that trained a
model may not decide on it. Every decision and promotion is a row of ``gold.model_approvals`` or
the registry, and an audited job.
"""

from __future__ import annotations

import datetime as dt

from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import AccessDenied, EhrlakeError
from ehrlake.lake.modes import WriteMode
from ehrlake.models import registry
from ehrlake.security.audit import DENIED, Event
from ehrlake.security.grants import current_user

TABLE = "gold.model_approvals"
SCHEMA = T.StructType(
    [
        T.StructField("model_id", T.StringType(), False),
        T.StructField("version", T.IntegerType(), False),
        T.StructField("task", T.StringType(), False),
        T.StructField("decision", T.StringType(), False),  # approved | rejected
        T.StructField("role", T.StringType(), False),
        T.StructField("os_user", T.StringType()),
        T.StructField("note", T.StringType()),
        T.StructField("decided_at", T.TimestampType()),
    ]
)


def decisions(lake, model_id: str, version: int) -> list:
    """A version's approval decisions, oldest first (a handful: read on the driver)."""
    if not lake.exists(TABLE):
        return []
    rows = lake.read(TABLE).where((F.col("model_id") == model_id) & (F.col("version") == version))
    return rows.orderBy("decided_at").collect()


def approval(lake, model_id: str, version: int):
    """The version's standing approval (its latest decision, if that approved it), else None."""
    found = decisions(lake, model_id, version)
    return found[-1] if found and found[-1].decision == "approved" else None


def decision_word(approve: bool) -> str:
    return "approved" if approve else "rejected"


def decide(lake, model_id: str, version: int | None, role: str | None, note: str, approve: bool = True):
    """Record a reviewer's decision on a model version (the latest where ``version`` is None); an
    approved nominated version becomes production in the same job. Returns the version after it."""
    mv = registry.get(lake, model_id, version)
    role = role or lake.security.default_role
    if mv.params.get("trained_by") == role:  # first: the clearest reason where both apply
        lake.security.audit.record(
            Event("models.approve", DENIED, role, detail=f"{mv.label}: trained as {role}"), checkpoint=True
        )
        raise AccessDenied(f"{mv.label} was trained as {role}: another role (a reviewer) decides on it")
    lake.security.access.require_approver(role, f"{mv.label}: {decision_word(approve)}")
    if not (note or "").strip():
        raise EhrlakeError("a decision on a model states why (--note): it is kept with the model")
    decision = decision_word(approve)
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    with lake.security.job("models.approve", [TABLE], role, run_id) as (role, audit):
        lake.create(TABLE, SCHEMA, description="reviewers' approvals and rejections of model versions")
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        row = (mv.model_id, mv.version, mv.task, decision, role, current_user(), note.strip(), now)
        lake.write(lake.spark.createDataFrame([row], SCHEMA), TABLE, mode=WriteMode.APPEND,
                   commit_info={"ehrlakeJob": "models.approve", "ehrlakeRunId": run_id})  # fmt: skip
        audit.append((TABLE, f"{mv.label} {decision} by {role}: {note.strip()}"))
        if approve and mv.status == registry.NOMINATED:
            registry.set_production(lake, mv.model_id, mv.version)
            audit.append((registry.TABLE, f"{mv.label} production (nominated, now approved)"))
    return registry.get(lake, mv.model_id, mv.version)


def promote(lake, model_id: str, version: int | None, role: str | None = None):
    """Make an approved version its task's production model, as an audited job; refused without
    a standing approval."""
    mv = registry.get(lake, model_id, version)
    approved = approval(lake, mv.model_id, mv.version)
    if approved is None:
        raise EhrlakeError(
            f"{mv.label} has no approval: a reviewer approves it first (ehrlake models approve --model "
            f"{mv.model_id} --version {mv.version} --note '...' --role reviewer)"
        )
    with lake.security.job("models.promote", ["gold"], role) as (_, audit):
        registry.set_production(lake, mv.model_id, mv.version)
        audit.append((registry.TABLE, f"{mv.label} production (approved by {approved.role})"))
    return registry.get(lake, mv.model_id, mv.version)
