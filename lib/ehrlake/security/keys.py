"""Envelope encryption keys: a master key wraps per-table data keys.

The master key comes from a :class:`KeyProvider` (a 0600 key file or an environment variable here;
a cloud KMS implements the same two methods). Each table has versioned data keys, stored *wrapped*
(AES-256-GCM under the master key, bound to table and key id) in a key store directory outside the
lake, so copying the lake copies no usable key. Rotation adds a version; new writes use the newest,
and old ciphertext stays readable while its version exists.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ehrlake.errors import KeyAccessError

KEY_BYTES = 32  # AES-256
LINKAGE = "_linkage"  # the patient-linkage secret: one version, never rotated (keys would stop linking)


class KeyProvider(Protocol):
    """Where the master key lives. Implementations never log or return it except to :class:`KeyStore`."""

    def master_key(self) -> bytes: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class FileKeyProvider:
    """A raw 32-byte (or base64 of it) key in a file that only its owner may read (mode 0600)."""

    path: str

    def master_key(self) -> bytes:
        path = Path(self.path)
        if not path.is_file():
            raise KeyAccessError(f"master key file {path} does not exist (run: ehrlake keys init)")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyAccessError(
                f"master key file {path} is readable by others (mode {mode:o}); chmod 600 it"
            )
        return _decode_key(path.read_bytes().strip(), str(path))

    def describe(self) -> str:
        return f"file {self.path}"

    def create(self) -> None:
        """Write a new random master key with mode 0600; refuses to overwrite an existing one."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)))


@dataclass(frozen=True)
class EnvKeyProvider:
    """The master key, base64-encoded, in an environment variable (for schedulers and containers)."""

    variable: str = "EHRLAKE_MASTER_KEY"

    def master_key(self) -> bytes:
        value = os.environ.get(self.variable)
        if not value:
            raise KeyAccessError(f"environment variable {self.variable} holds no master key")
        return _decode_key(value.encode(), f"${self.variable}")

    def describe(self) -> str:
        return f"environment variable {self.variable}"


def _decode_key(raw: bytes, where: str) -> bytes:
    if len(raw) == KEY_BYTES:
        return raw
    try:
        key = base64.b64decode(raw, validate=True)
    except ValueError as exc:
        raise KeyAccessError(f"master key in {where} is neither 32 raw bytes nor base64") from exc
    if len(key) != KEY_BYTES:
        raise KeyAccessError(f"master key in {where} must be {KEY_BYTES} bytes, not {len(key)}")
    return key


@dataclass(frozen=True)
class DataKey:
    """An unwrapped data key; ``key_id`` (``<table>#v<N>``) travels with every ciphertext."""

    key_id: str
    material: bytes

    def __repr__(self) -> str:  # never print key bytes
        return f"DataKey({self.key_id!r})"


def _aside(path: Path, text: str, mode: int) -> Path:
    """``text`` in a private file beside ``path`` (a name no other writer uses)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return tmp


def replace_whole(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically: readers see the old file or the new one, never half of it."""
    os.replace(_aside(path, text, mode), path)


def create_once(path: Path, text: str, mode: int) -> bool:
    """Write ``path`` whole, only if it does not exist (False when another process got there first).
    Written aside and hard-linked into place, so a reader never sees it half-written."""
    tmp = _aside(path, text, mode)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


class KeyStore:
    """Wrapped data keys per table, one JSON file per table under ``directory`` (outside the lake)."""

    def __init__(self, directory: str, provider: KeyProvider):
        self.directory = Path(directory)
        self.provider = provider

    def key_file(self, table: str) -> Path:
        return self.directory / f"{table}.keys.json"

    def store_id(self, create: bool = False) -> str | None:
        """This store's random id (``store.json``), so a lake can tell its own store from another
        one; None for a store that does not exist yet (``create``: make it, race-safe)."""
        path = self.directory / "store.json"
        if not path.is_file():
            if not create and not any(self.directory.glob("*.keys.json")):
                return None
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            create_once(path, json.dumps({"store_id": secrets.token_hex(16)}), 0o600)  # else theirs
        return json.loads(path.read_text())["store_id"]

    def _load(self, table: str) -> dict:
        path = self.key_file(table)
        if not path.is_file():
            return {"table": table, "versions": []}
        return json.loads(path.read_text())

    def _save(self, table: str, data: dict) -> None:
        """Replace a key file atomically (a private temporary file, then rename)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        replace_whole(self.key_file(table), json.dumps(data, indent=2), 0o600)

    @contextlib.contextmanager
    def _locked(self):
        """One rotation at a time across processes (an exclusive lock on ``.lock`` in the store):
        a rotation reads, adds a version and rewrites the file, and two at once would lose one."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def rotate(self, table: str) -> str:
        """Add a new data-key version for ``table`` (the first one on first use); returns its key id.
        Serialised across processes, so concurrent rotations each add their own version."""
        with self._locked():
            return self._rotate(table)

    def _first(self, table: str) -> str:
        """The first key id of ``table``, made if there is none (by us or a racing process)."""
        with self._locked():
            data = self._load(table)
            return data["versions"][0]["key_id"] if data["versions"] else self._rotate(table)

    def _rotate(self, table: str) -> str:
        data = self._load(table)
        if table == LINKAGE and data["versions"]:
            raise KeyAccessError(
                "the linkage secret is never rotated: every patient_key in the lake would change and "
                "stop linking to earlier records"
            )
        version = len(data["versions"]) + 1
        key_id = f"{table}#v{version}"
        material = secrets.token_bytes(KEY_BYTES)
        nonce = secrets.token_bytes(12)
        wrapped = AESGCM(self.provider.master_key()).encrypt(nonce, material, key_id.encode())
        data["versions"].append(
            {
                "key_id": key_id,
                "wrapped": base64.b64encode(nonce + wrapped).decode(),
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        )
        self._save(table, data)
        return key_id

    def current_id(self, table: str) -> str:
        """Id of the newest data key of ``table`` (created on first use), without unwrapping it."""
        data = self._load(table)
        return data["versions"][-1]["key_id"] if data["versions"] else self._first(table)

    def linkage_id(self) -> str:
        """Key id of the secret behind pseudonymous patient keys (created on first use, then fixed)."""
        data = self._load(LINKAGE)
        return data["versions"][0]["key_id"] if data["versions"] else self._first(LINKAGE)

    def tables(self) -> list[str]:
        return sorted(p.name.removesuffix(".keys.json") for p in self.directory.glob("*.keys.json"))

    def current(self, table: str) -> DataKey:
        """The newest data key of ``table``, created on first use."""
        data = self._load(table)
        if not data["versions"]:
            self._first(table)
            data = self._load(table)
        return self.get(data["versions"][-1]["key_id"])

    def get(self, key_id: str) -> DataKey:
        """Unwrap one data key; a missing version or a wrong master key is a :class:`KeyAccessError`."""
        table = key_id.rsplit("#", 1)[0]
        entry = next((v for v in self._load(table)["versions"] if v["key_id"] == key_id), None)
        if entry is None:
            raise KeyAccessError(f"table {table}: data key {key_id} is not in the key store {self.directory}")
        blob = base64.b64decode(entry["wrapped"])
        try:
            material = AESGCM(self.provider.master_key()).decrypt(blob[:12], blob[12:], key_id.encode())
        except InvalidTag as exc:
            raise KeyAccessError(
                f"table {table}: data key {key_id} cannot be unwrapped with the master key from "
                f"{self.provider.describe()} (wrong master key?)"
            ) from exc
        return DataKey(key_id, material)

    def versions(self, table: str) -> list[dict]:
        """Key ids and creation times (never key material), for ``ehrlake keys show``."""
        return [{"key_id": v["key_id"], "created_at": v["created_at"]} for v in self._load(table)["versions"]]
