"""Role-based access: which tables and columns a role reads, whether it may reveal identities.

The policy (``conf/access_policy.yaml``) is enforced by the library for reads made with a role;
every decision is audited. It is the guard rail for honest clients (notebooks, jobs, analysts'
scripts). What keeps identifiers from a role that bypasses the library is the encryption itself:
only processes given the master key can open a sealed column (docs/security.md).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from ehrlake.config import build, read_yaml
from ehrlake.errors import AccessDenied, ConfigError
from ehrlake.lake.catalog import TableName
from ehrlake.security import identity
from ehrlake.security.audit import ALLOWED, DENIED, ERROR, AuditLog, Event
from ehrlake.security.columns import key_errors
from ehrlake.security.grants import Grants, current_user
from ehrlake.security.protection import Protector, Sealing

SEALED_MODES = ("drop", "ciphertext")


@dataclass(frozen=True)
class Role:
    """One role of ``conf/access_policy.yaml`` (its name is the key it is declared under)."""

    name: str = field(default="", metadata={"key": None})  # not read from the file
    description: str = ""
    read: tuple[str, ...] = ()  # table name globs
    write: tuple[str, ...] = ()  # layers its jobs may write, or single tables (layer.table globs)
    sealed: str = "drop"  # what a read shows of a sealed column: nothing, or the ciphertext
    deny_columns: tuple[str, ...] = ()
    reveal: bool = False
    approve_models: bool = False  # may approve or reject model versions for production
    # a SQL condition on a table's columns: the only rows the role reads (a site's own, for a
    # federated client: "source_system = 'hospital-a'"); a table it cannot apply to is not readable
    rows: str = ""

    def validate(self) -> None:
        if self.sealed not in SEALED_MODES:
            raise ConfigError(f"sealed must be {' or '.join(SEALED_MODES)}, not {self.sealed!r}")

    def may_read(self, table: str) -> bool:
        return any(fnmatch.fnmatchcase(table, pattern) for pattern in self.read)

    def may_write(self, target: str) -> bool:
        """``target``: a layer (``gold``), granted by that layer; or a table (``gold.decision_support``),
        granted by its layer or a table glob."""
        layer = target.split(".", 1)[0]
        return layer in self.write or any(
            "." in pattern and fnmatch.fnmatchcase(target, pattern) for pattern in self.write
        )

    @property
    def rows_detail(self) -> str | None:
        """What an audit event of this role's read records of its row limit (None: no limit)."""
        return f"rows: {self.rows}" if self.rows else None

    def rows_refusal(self, table: str) -> AccessDenied:
        """The refusal of a table whose columns cannot answer this role's row limit."""
        return AccessDenied(f"role {self.name} reads only rows where {self.rows}, which {table} cannot tell")

    def hidden(self, column: str, sealed: set[str]) -> bool:
        if column in sealed and self.sealed == "drop":
            return True
        return any(fnmatch.fnmatchcase(column, pattern) for pattern in self.deny_columns)


@dataclass(frozen=True)
class AccessPolicy:
    roles: dict[str, Role]

    @classmethod
    def load(cls, path: str) -> AccessPolicy:
        if not Path(path).is_file():
            raise ConfigError(f"access policy {path} does not exist (security.access_policy)")
        declared = build(_PolicyFile, read_yaml(path), f"access policy {path}")
        roles = {name: dataclasses.replace(role, name=name) for name, role in declared.roles.items()}
        if not roles:
            raise ConfigError(f"access policy {path} defines no roles")
        return cls(roles)


@dataclass(frozen=True)
class _PolicyFile:
    roles: dict[str, Role] = field(default_factory=dict)


class Access:
    """Applies the policy to reads, reveals and job writes, and audits every decision."""

    def __init__(
        self,
        policy: AccessPolicy,
        audit: AuditLog,
        protector: Protector,
        grants: Grants | None = None,
        reveals_per_hour: int = 0,
    ):
        self.policy = policy
        self.audit = audit
        self.protector = protector
        self.grants = grants
        self.reveals_per_hour = reveals_per_hour

    def role(self, name: str | None, action: str, table: str | None = None, job: str | None = None) -> Role:
        """The policy's role ``name``, if the user running this process may act as it: with grants
        set up (``grants.py``), only a role a verified grant gives this OS user."""
        identity.bind(self.audit.lake_root, self.protector.store, self.grants)
        role = self.policy.roles.get(name or "")
        if role is None:
            self._deny(Event(action, role=name, table_name=table, job=job, detail="unknown role"))
            raise AccessDenied(f"unknown role {name!r} (roles: {', '.join(sorted(self.policy.roles))})")
        if self.grants is not None and self.grants.fingerprint() is not None:
            user = current_user()
            try:
                held = self.grants.roles_of(user)
            except AccessDenied:
                self._deny(
                    Event(action, role=name, table_name=table, job=job, detail="grant does not verify")
                )
                raise
            if role.name not in held:
                self._deny(Event(action, role=name, table_name=table, job=job, detail="role not granted"))
                raise AccessDenied(
                    f"user {user} holds no grant for role {role.name} "
                    f"(granted: {', '.join(held) or 'none'}); "
                    "a grant administrator gives one with: ehrlake grants add --user USER --role ROLE"
                )
        return role

    def _deny(self, event: Event) -> None:
        event.outcome = DENIED
        self.audit.record(event, checkpoint=True)

    def require_write(
        self, role_name: str | None, layers: list[str], job: str, run_id: str | None = None
    ) -> Role:
        """A job may write these layers (or single tables) under this role, or :class:`AccessDenied`
        (audited)."""
        role = self.role(role_name, "write", job=job)
        refused = [layer for layer in layers if not role.may_write(layer)]
        if refused:
            self._deny(Event("write", role=role.name, job=job, detail=f"layers {refused}", run_id=run_id))
            raise AccessDenied(f"role {role.name} may not write the {', '.join(refused)} layer(s) ({job})")
        return role

    def require_approver(self, role_name: str | None, subject: str) -> Role:
        """A role that may decide on model versions (``approve_models``), or :class:`AccessDenied`
        (audited)."""
        role = self.role(role_name, "models.approve")
        if not role.approve_models:
            self._deny(Event("models.approve", role=role.name, detail=subject))
            raise AccessDenied(f"role {role.name} may not approve models (the policy's approve_models)")
        return role

    def require_release(self, role_name: str | None, subject: str, purpose: str) -> Role:
        """A role that may reveal, releasing source record ids (not sealed identifiers) with a stated
        purpose, or :class:`AccessDenied` (audited): the export back to a source system."""
        role = self.role(role_name, "export.source_ids")
        event = Event("export.source_ids", role=role.name, detail=f"{purpose} | {subject}")
        if not role.reveal:
            self._deny(event)
            raise AccessDenied(f"role {role.name} may not release source record ids (the policy's reveal)")
        if not (purpose or "").strip():
            self._deny(event)
            raise AccessDenied("releasing source record ids needs a stated purpose (--purpose; audited)")
        return role

    def read(self, lake, table: str, role_name: str | None, **at) -> DataFrame:
        """``table`` as ``role_name`` may see it: hidden columns dropped, identifiers never opened."""
        table = str(TableName.parse(table))
        role = self.role(role_name, "read", table)
        if not role.may_read(table):
            self._deny(Event("read", role=role.name, table_name=table))
            raise AccessDenied(f"role {role.name} may not read {table}")
        df = self.own_rows(lake.read(table, **at), role, table)
        df = df.select(*[f"`{c}`" for c in self.shown_columns(lake, table, role, df.columns)])
        self.audit.record(
            Event("read", role=role.name, table_name=table, columns=df.columns, detail=role.rows_detail)
        )
        return df

    def own_rows(self, df: DataFrame, role: Role, table: str) -> DataFrame:
        """``df`` (rows of ``table``) narrowed to the rows ``role`` may read (all, without ``rows``);
        a table the condition cannot apply to (it lacks the columns) is refused and audited."""
        if not role.rows:
            return df
        try:
            narrowed = df.where(F.expr(role.rows))
            narrowed.schema  # noqa: B018 - analysed here (Spark Connect would wait for the first action)
            return narrowed
        except AnalysisException:
            self._deny(Event("read", role=role.name, table_name=table, detail=role.rows_detail))
            raise role.rows_refusal(table) from None

    @staticmethod
    def shown_columns(lake, table: str, role: Role, columns: list[str] | None = None) -> list[str]:
        """The columns of ``table`` (or of ``columns``, a version of it) the policy shows ``role``."""
        schema = lake.schema(table)
        sealing = Sealing.of(schema)
        sealed = set(sealing.columns) if sealing else set()
        return [c for c in (columns or schema.fieldNames()) if not role.hidden(c, sealed)]

    def reveal(self, lake, table: str, role_name: str | None, patient_key: str, purpose: str) -> DataFrame:
        """One patient's rows of ``table`` with identifiers opened, for a role allowed to reveal.

        Bounded (one patient), collected once so the audit event records what actually happened.
        """
        table = str(TableName.parse(table))
        role = self.role(role_name, "reveal", table)
        event = Event("reveal", role=role.name, table_name=table, patient_key=patient_key, detail=purpose)
        if not role.reveal or not role.may_read(table):
            self._deny(event)
            raise AccessDenied(f"role {role.name} may not reveal identities in {table}")
        if not (purpose or "").strip():
            self._deny(event)
            raise AccessDenied("a reveal needs a stated purpose (it is written to the audit log)")
        if self.reveals_per_hour and self._reveals_last_hour(event.os_user) >= self.reveals_per_hour:
            event.detail = f"{purpose} | over {self.reveals_per_hour} reveals per hour"
            self._deny(event)
            raise AccessDenied(
                f"user {event.os_user} has revealed {self.reveals_per_hour} patients in the last hour, "
                "the limit (security.reveals_per_hour); a bulk reveal needs a data release, not this path"
            )
        sealing = Sealing.of(lake.schema(table))
        df = lake.read(table)
        if "patient_key" not in df.columns:
            raise ConfigError(f"{table} has no patient_key column; nothing to reveal by patient")
        df = self.own_rows(df.where(F.col("patient_key") == patient_key), role, table)
        if sealing:
            df = self.protector.revealing().open(df, table, sealing)
            event.columns = sorted(sealing.columns)
        try:
            with key_errors():
                rows = df.collect()
        except Exception as exc:
            event.outcome, event.detail = ERROR, f"{purpose} | {type(exc).__name__}"
            self.audit.record(event, checkpoint=True)
            raise
        self.audit.record(event, checkpoint=True)
        return lake.spark.createDataFrame(rows, df.schema)

    def _reveals_last_hour(self, user: str) -> int:
        """Allowed reveals by ``user`` in the past hour, from the audit log (read on the driver with
        a filter on action: reveal events are few)."""
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.audit.path):
            return 0
        events = DeltaTable(self.audit.path).to_pyarrow_table(
            columns=["at", "os_user", "outcome"], filters=[("action", "=", "reveal")]
        )
        since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        return sum(
            1
            for at, who, outcome in zip(
                *(events.column(c).to_pylist() for c in ("at", "os_user", "outcome")), strict=True
            )
            if who == user and outcome == ALLOWED and at >= since
        )
