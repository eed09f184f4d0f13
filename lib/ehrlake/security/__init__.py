"""Security: envelope-encrypted columns, pseudonymous patient keys, role-based access and the
tamper-evident audit log (docs/security.md). :class:`Security` bundles them for one lake."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ehrlake.config import SecurityConfig
from ehrlake.home import HOME
from ehrlake.security import identity
from ehrlake.security.access import Access, AccessPolicy
from ehrlake.security.audit import ERROR, AuditLog, Event
from ehrlake.security.columns import KeyRef
from ehrlake.security.grants import Grants
from ehrlake.security.protection import Protector


@dataclass
class Security:
    """Everything a lake needs to seal, open, authorise and audit."""

    protector: Protector
    access: Access
    audit: AuditLog
    default_role: str
    small_cell_k: int = SecurityConfig.small_cell_k  # smallest count a published table shows

    @contextlib.contextmanager
    def job(self, job: str, layers: list[str], role: str | None = None, run_id: str | None = None):
        """Run a writing job under ``role``: refused up front unless the role may write ``layers``;
        the job adds ``(table, detail)`` pairs to the yielded list, and they are audited at the end
        (or the failure is). Yields the role actually used."""
        role = role or self.default_role
        # before any key is made or used: the lake's key store and grant administrator are checked
        identity.bind(self.audit.lake_root, self.protector.store, self.access.grants)
        self.access.require_write(role, layers, job, run_id)
        written: list[tuple[str, str]] = []
        try:
            yield role, written
        except Exception as exc:
            failed = Event(job, ERROR, role, job, detail=type(exc).__name__, run_id=run_id)
            self.audit.record(failed, checkpoint=True)
            raise
        events = [
            Event("write", role=role, job=job, table_name=t, detail=d, run_id=run_id) for t, d in written
        ]
        self.audit.record(*events, Event(job, role=role, job=job, run_id=run_id), checkpoint=True)

    def reencrypt(self, lake, table: str, role: str | None = None):
        """Rewrite ``table``'s columns sealed under a data key under its current one (after ``keys
        rotate``), as a job: refused unless ``role`` may write the table's layer, and audited."""
        from ehrlake.lake.catalog import TableName

        key_id = self.protector.store.current_id(table)
        with self.job("keys.reencrypt", [TableName.parse(table).layer], role) as (_, written):
            result = self.protector.reencrypt(lake, table)
            written.append((table, f"sealed columns under {key_id}: Delta version {result.version}"))
        return result

    def for_root(self, lake_root: str) -> Security:
        """The same keys, policy, grants and default role for another lake (a scratch lake an
        external dump is prepared in: its patient keys link with this lake's), audited in its own
        log."""
        a = self.access
        audit = AuditLog(lake_root, self.protector.store, self.audit.checkpoint_every)
        access = Access(a.policy, audit, self.protector, a.grants, a.reveals_per_hour)
        return dataclasses.replace(self, access=access, audit=audit)

    @classmethod
    def from_config(cls, security, lake_root: str) -> Security:
        reveal_key = os.path.abspath(security.reveal_key_file) if security.reveal_key_file else None
        protector = Protector(KeyRef.from_config(security), reveal_key)
        audit = AuditLog(lake_root, protector.store, security.audit_checkpoint_every)
        grants = Grants(Path(security.grants)) if security.grants else None
        policy = AccessPolicy.load(_policy_path(security.access_policy))
        access = Access(policy, audit, protector, grants, security.reveals_per_hour)
        role = os.environ.get("EHRLAKE_ROLE") or security.role
        return cls(protector, access, audit, role, security.small_cell_k)


def init_keys(security) -> list[str]:
    """Make what ``security`` names and does not exist yet: the master key (0600), the reveal key
    pair (private key to ``reveal_key_file``, public key into the key store) and the linkage secret
    (so concurrent first jobs share one). Returns one line per thing made (``ehrlake keys init``)."""
    from ehrlake.security import reveal_key
    from ehrlake.security.keys import FileKeyProvider

    made = []
    if not os.path.exists(security.master_key_file):
        FileKeyProvider(security.master_key_file).create()
        made.append(
            f"master key {security.master_key_file} (mode 0600): back it up, without it nothing opens"
        )
    if security.reveal_key_file and reveal_key.public_key(security.key_store) is None:
        public = reveal_key.create(security.reveal_key_file, security.key_store)
        made.append(
            f"reveal key {public.key_id}: private half {security.reveal_key_file} (mode 0600), for "
            "`ehrlake reveal` only; keep it with the key administrator, off the ingest machines"
        )
    KeyRef.from_config(security).store().linkage_id()
    return made


def _policy_path(path: str) -> str:
    """A relative policy path is looked up from the working directory, then from the checkout
    (so ``spark-submit`` from another directory still finds ``conf/access_policy.yaml``)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    beside_checkout = HOME / path
    return str(beside_checkout) if beside_checkout.exists() else path
