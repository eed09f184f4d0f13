"""Security: envelope-encrypted columns, pseudonymous patient keys, role-based access and the
tamper-evident audit log (docs/security.md). :class:`Security` bundles them for one lake."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ehrlake.security.access import Access, AccessPolicy
from ehrlake.security.audit import AuditLog
from ehrlake.security.columns import KeyRef
from ehrlake.security.protection import Protector


@dataclass
class Security:
    """Everything a lake needs to seal, open, authorise and audit."""

    protector: Protector
    access: Access
    audit: AuditLog
    default_role: str

    @classmethod
    def from_config(cls, security, lake_root: str) -> Security:
        protector = Protector(KeyRef.from_config(security))
        audit = AuditLog(lake_root, protector.store, security.audit_checkpoint_every)
        access = Access(AccessPolicy.load(security.access_policy), audit, protector)
        return cls(protector, access, audit, os.environ.get("EHRLAKE_ROLE") or security.role)
