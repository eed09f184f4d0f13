"""The reveal key: direct identifiers are sealed to a public key whose private half ingest never holds.

The master key must be on every machine that ingests (jobs seal with data keys it unwraps, and the
pipeline opens ``raw`` and birth dates to build its tables), so an engineer holding it could open
everything sealed under it. Direct identifiers (names, addresses, telecom, identifier numbers,
coordinates) are therefore sealed differently: to an X25519 public key (``reveal.pub`` in the key
store, public by design), as ``ek2`` values (see :mod:`ehrlake.security.crypto`). Anyone with the
public key can seal; only the private key (``security.reveal_key_file``, mode 0600, kept where the
key administrator runs ``ehrlake reveal``) opens. Jobs never load it: their key references carry no
path to it, and opening an ``ek2`` value without it is a one-line :class:`KeyAccessError`.
"""

from __future__ import annotations

import base64
import hashlib
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ehrlake.errors import KeyAccessError
from ehrlake.security.keys import create_once

PUBLIC_FILE = "reveal.pub"  # in the key store directory
KEY_ID_PREFIX = "reveal#"  # key ids of reveal keys: reveal#<fingerprint> (data keys: <table>#v<N>)


@dataclass(frozen=True)
class RevealPublicKey:
    """What sealing needs: the public key bytes and the id every ``ek2`` value carries."""

    key_id: str
    public: bytes

    @classmethod
    def of(cls, public: bytes) -> RevealPublicKey:
        return cls(f"{KEY_ID_PREFIX}{fingerprint(public)}", public)


def fingerprint(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def create(private_file: str, store_directory: str) -> RevealPublicKey:
    """A new key pair: the private key to ``private_file`` (0600), the public key into the key store.
    Refuses to replace either (values sealed to the old pair would never open again)."""
    private_path, public_path = Path(private_file), Path(store_directory) / PUBLIC_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise KeyAccessError(f"{path} exists already; not replacing the reveal key")
    key = X25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not create_once(private_path, base64.b64encode(raw).decode(), 0o600):
        raise KeyAccessError(f"{private_path} was created by another process; not replacing it")
    create_once(public_path, base64.b64encode(public).decode(), 0o644)
    return RevealPublicKey.of(public)


def public_key(store_directory: str) -> RevealPublicKey | None:
    """The key store's reveal public key; None before ``ehrlake keys init`` made one."""
    path = Path(store_directory) / PUBLIC_FILE
    if not path.is_file():
        return None
    return RevealPublicKey.of(base64.b64decode(path.read_text().strip()))


def require_public(store_directory: str) -> RevealPublicKey:
    found = public_key(store_directory)
    if found is None:
        raise KeyAccessError(
            f"the key store {store_directory} has no reveal public key ({PUBLIC_FILE}); direct "
            "identifiers cannot be sealed without it (run: ehrlake keys init)"
        )
    return found


def private_key(private_file: str | None, expected: str) -> X25519PrivateKey:
    """The private key whose public key has id ``expected``, from a file only its owner may read."""
    if not private_file or not Path(private_file).is_file():
        raise KeyAccessError(
            f"values sealed to {expected} open only with the reveal key, which jobs do not hold; "
            "identities are revealed one patient at a time with `ehrlake reveal` where "
            f"security.reveal_key_file is ({private_file or 'not set'})"
        )
    path = Path(private_file)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyAccessError(f"reveal key file {path} is readable by others (mode {mode:o}); chmod 600 it")
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text().strip()))
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    if RevealPublicKey.of(public).key_id != expected:
        raise KeyAccessError(f"reveal key file {path} holds another key than {expected}")
    return key
