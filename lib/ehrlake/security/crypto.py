"""AES-256-GCM encryption of column values, each bound to its row.

Ciphertext is a string ``ek1:<key_id>:<base64(nonce | ciphertext+tag)>`` so it carries its key id
(rotation works value by value) and fits any string column. The associated data is the row's
identity plus the column name: moving a ciphertext to another row or column fails authentication
instead of decrypting to someone else's name.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ehrlake.errors import KeyAccessError
from ehrlake.security.keys import DataKey

PREFIX = "ek1"


def associated_data(row_id: str, column: str) -> bytes:
    return f"{row_id}\x1f{column}".encode()


def encrypt_value(key: DataKey, plaintext: str | None, row_id: str, column: str) -> str | None:
    if plaintext is None:
        return None
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(key.material).encrypt(nonce, plaintext.encode(), associated_data(row_id, column))
    return f"{PREFIX}:{key.key_id}:{base64.b64encode(nonce + sealed).decode()}"


def encrypt_batch(key: DataKey, values, row_ids, column: str) -> list[str | None]:
    """Seal many values with one cipher object and one draw of nonces (the vectorised path)."""
    aead = AESGCM(key.material)
    nonces = secrets.token_bytes(12 * len(values))
    head = f"{PREFIX}:{key.key_id}:"
    out: list[str | None] = []
    for i, (value, row_id) in enumerate(zip(values, row_ids, strict=True)):
        if value is None:
            out.append(None)
            continue
        nonce = nonces[12 * i : 12 * i + 12]
        sealed = aead.encrypt(nonce, value.encode(), associated_data(row_id, column))
        out.append(head + base64.b64encode(nonce + sealed).decode())
    return out


def decrypt_batch(keys: dict[str, DataKey], values, row_ids, column: str) -> list[str | None]:
    """Open many values; ``keys`` maps key id to key (values of one column may span rotations)."""
    ciphers = {key_id: (key, AESGCM(key.material)) for key_id, key in keys.items()}
    out: list[str | None] = []
    for value, row_id in zip(values, row_ids, strict=True):
        if value is None:
            out.append(None)
            continue
        key, aead = ciphers[key_id_of(value)]
        blob = base64.b64decode(value.rsplit(":", 1)[1])
        try:
            out.append(aead.decrypt(blob[:12], blob[12:], associated_data(row_id, column)).decode())
        except InvalidTag as exc:
            raise _auth_failed(column, row_id, key.key_id) from exc
    return out


def _auth_failed(column: str, row_id: str, key_id: str) -> KeyAccessError:
    return KeyAccessError(
        f"{column} of row {row_id!r}: authentication failed under {key_id} (wrong key, or a value "
        "moved from another row or column)"
    )


def key_id_of(ciphertext: str) -> str:
    prefix, key_id, _ = ciphertext.split(":", 2)
    if prefix != PREFIX:
        raise KeyAccessError(f"value is not ehrlake ciphertext (prefix {prefix!r})")
    return key_id


def decrypt_value(key: DataKey, ciphertext: str | None, row_id: str, column: str) -> str | None:
    """Decrypt, or raise :class:`KeyAccessError`: never return garbage for a wrong key or row."""
    if ciphertext is None:
        return None
    key_id = key_id_of(ciphertext)
    if key_id != key.key_id:
        raise KeyAccessError(f"value was encrypted with {key_id}, not {key.key_id}")
    blob = base64.b64decode(ciphertext.rsplit(":", 1)[1])
    try:
        return AESGCM(key.material).decrypt(blob[:12], blob[12:], associated_data(row_id, column)).decode()
    except InvalidTag as exc:
        raise _auth_failed(column, row_id, key.key_id) from exc
