"""A lake's identity, and the key store it is bound to.

Paths are not identities: the same lake may be mounted elsewhere, and a relative ``key_store`` read
from another working directory names another (new, empty) store. So a lake carries an id of its own
(``_ehrlake/identity.json``, written once) and records the id of the key store whose keys sealed it.
Every job checks the binding before it writes anything: a job run against the wrong or an empty key
store stops with a one-line error saying where the lake's store was, instead of creating new data
keys, a new linkage secret and a new signing key (rows sealed then could not be opened with the real
store, patient keys would stop linking and the audit chain would break). The audit witness is keyed
by the lake id too, so a copy of the lake is still checked against what the witness saw.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from ehrlake.errors import AccessDenied, KeyAccessError
from ehrlake.security import reveal_key
from ehrlake.security.grants import Grants
from ehrlake.security.keys import KeyStore, create_once, replace_whole

FILE = os.path.join("_ehrlake", "identity.json")
SEALED_MARK = b"ehrlake.sealed"  # in a Delta schema: the table holds sealed columns


@dataclass(frozen=True)
class LakeIdentity:
    lake_id: str
    key_store_id: str
    key_store: str  # where the store was when the lake was bound (for the error message only)
    grant_admin: str | None = None  # fingerprint of the grant administrator's key, once grants exist
    reveal_key: str | None = None  # id of the reveal public key identifiers are sealed to, once made


def read(lake_root: str) -> LakeIdentity | None:
    path = Path(lake_root) / FILE
    return LakeIdentity(**json.loads(path.read_text())) if path.is_file() else None


def bind(lake_root: str, store: KeyStore, grants: Grants | None = None) -> LakeIdentity:
    """The lake's identity, checked against ``store`` (created, and the store with it, on a lake's
    first job). Raises :class:`KeyAccessError` when ``store`` is not the lake's key store or holds
    another reveal public key than the lake's (identifiers sealed now could never be revealed with
    the lake's reveal key, or could be by whoever swapped it), and :class:`AccessDenied` when
    ``grants`` lack (or swapped) the administrator key the lake knows."""
    found = _bind_store(lake_root, store)
    public = reveal_key.public_key(str(store.directory))
    found, changed = _pinned(lake_root, found, "reveal_key", public.key_id if public else None)
    if changed is not None:
        raise KeyAccessError(
            f"lake {lake_root} seals identifiers to reveal key {found.reveal_key}, but the key store "
            f"{store.directory} {changed}; refusing to seal to any other key"
        )
    if grants is not None:
        found, changed = _pinned(lake_root, found, "grant_admin", grants.fingerprint())
        if changed is not None:
            raise AccessDenied(
                f"lake {lake_root} enforces role grants signed by key {found.grant_admin}, but "
                f"{grants.public_file} {changed}; roles stay refused until it is restored"
            )
    return found


def _pinned(
    lake_root: str, found: LakeIdentity, field: str, actual: str | None
) -> tuple[LakeIdentity, str | None]:
    """Trust on first use: a key fingerprint the lake has not recorded yet is recorded; one that
    differs from the recorded one comes back as what changed (None: all is well)."""
    recorded = getattr(found, field)
    if recorded is None and actual is not None:
        found = dataclasses.replace(found, **{field: actual})
        _write(lake_root, found)
    elif recorded is not None and actual != recorded:
        return found, "is missing it" if actual is None else "holds another one"
    return found, None


def _bind_store(lake_root: str, store: KeyStore) -> LakeIdentity:
    found = read(lake_root)
    if found is None:
        if store.store_id() is None and holds_sealed_data(lake_root):
            raise KeyAccessError(
                f"lake {lake_root} holds sealed tables but the configured key store "
                f"{store.directory.resolve()} is empty; "
                "refusing to create new keys for it (set security.key_store to the lake's store)"
            )
        return _create(lake_root, store)
    actual = store.store_id()
    if actual != found.key_store_id:
        what = "does not exist" if actual is None else "is another key store"
        raise KeyAccessError(
            f"lake {lake_root} is bound to the key store at {found.key_store} (id {found.key_store_id[:8]}); "
            f"the configured key store {store.directory.resolve()} {what}. Set security.key_store (and "
            "security.master_key_file) to the lake's, e.g. by running from the directory that holds them"
        )
    return found


def _create(lake_root: str, store: KeyStore) -> LakeIdentity:
    identity = LakeIdentity(
        secrets.token_hex(16), store.store_id(create=True), str(store.directory.resolve())
    )
    path = Path(lake_root) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not create_once(path, json.dumps(asdict(identity), indent=2), 0o644):
        return _bind_store(lake_root, store)  # another job bound the lake first: check against theirs
    return identity


def _write(lake_root: str, identity: LakeIdentity) -> None:
    replace_whole(Path(lake_root) / FILE, json.dumps(asdict(identity), indent=2))


def holds_sealed_data(lake_root: str) -> bool:
    """Whether any table of the lake has sealed columns (read from the Delta logs' schemas)."""
    for log in Path(lake_root).glob("*/*/_delta_log/*.json"):
        with open(log, "rb") as fh:
            if any(SEALED_MARK in line for line in fh if b'"metaData"' in line):
                return True
    return False
