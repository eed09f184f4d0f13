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
        raise KeyAccessError(
            f"{column} of row {row_id}: authentication failed under {key.key_id} (wrong key, or a value "
            "moved from another row or column)"
        ) from exc
