"""Pseudonymous patient keys: HMAC-SHA256(linkage secret, source system | source patient id).

Deterministic, so the same patient from two files or two feeds of one system links; not reversible
without the secret, and the secret never enters a query plan (it is read where the HMAC runs).
"""

from __future__ import annotations

import hashlib
import hmac

SEPARATOR = "|"


def patient_key(secret: bytes, source_system: str, patient_id: str | None) -> str | None:
    if patient_id is None:
        return None
    message = f"{source_system}{SEPARATOR}{patient_id}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()
