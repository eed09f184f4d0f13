"""AES-256-GCM encryption of column values, each bound to its row.

Ciphertext is a string ``ek1:<key_id>:<base64(nonce | ciphertext+tag)>`` so it carries its key id
(rotation works value by value) and fits any string column. Large values (whole raw records) are
sealed as ``ek1z``: compressed first with zstd and the shipped dictionary ``seal-v1.zdict`` (see
``scripts/train_seal_dictionary.py``), since nothing can compress them once they are ciphertext.
The associated data is the row's identity plus the column name: moving a ciphertext to another
row or column fails authentication instead of decrypting to someone else's name.
"""

from __future__ import annotations

import base64
import functools
import secrets
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ehrlake.errors import KeyAccessError
from ehrlake.security.keys import DataKey

PREFIX = "ek1"
COMPRESSED = "ek1z"  # zstd with the v1 dictionary, then sealed
_DICTIONARY = Path(__file__).with_name("seal-v1.zdict")


@functools.cache
def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    dictionary = zstandard.ZstdCompressionDict(_DICTIONARY.read_bytes())
    return (
        zstandard.ZstdCompressor(level=1, dict_data=dictionary, write_dict_id=False),
        zstandard.ZstdDecompressor(dict_data=dictionary),
    )


def associated_data(row_id: str, column: str) -> bytes:
    return f"{row_id}\x1f{column}".encode()


def encrypt_value(key: DataKey, plaintext: str | None, row_id: str, column: str) -> str | None:
    return encrypt_batch(key, [plaintext], [row_id], column)[0]


def encrypt_batch(key: DataKey, values, row_ids, column: str, compress: bool = False) -> list[str | None]:
    """Seal many values (str); see :func:`seal_many`."""
    raw = [None if v is None else v.encode() for v in values]
    return [None if v is None else v.decode() for v in seal_many(key, raw, row_ids, column, compress)]


def seal_many(key: DataKey, values, row_ids, column: str, compress: bool = False) -> list[bytes | None]:
    """The vectorised path: UTF-8 values in, ASCII ciphertext out, one cipher object and one draw of
    nonces per batch, no str round trips. ``compress`` zstd-compresses each value first (for large,
    repetitive values such as raw records). ``row_ids`` may be str or bytes."""
    aead = AESGCM(key.material)
    nonces = secrets.token_bytes(12 * len(values))
    head = f"{COMPRESSED if compress else PREFIX}:{key.key_id}:".encode()
    tail = f"\x1f{column}".encode()
    squeeze = _zstd()[0].compress if compress else None
    b64 = base64.b64encode
    out: list[bytes | None] = []
    for i, (value, row_id) in enumerate(zip(values, row_ids, strict=True)):
        if value is None:
            out.append(None)
            continue
        nonce = nonces[12 * i : 12 * i + 12]
        aad = (row_id if isinstance(row_id, bytes) else row_id.encode()) + tail
        out.append(head + b64(nonce + aead.encrypt(nonce, squeeze(value) if squeeze else value, aad)))
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
            data = aead.decrypt(blob[:12], blob[12:], associated_data(row_id, column))
        except InvalidTag as exc:
            raise _auth_failed(column, row_id, key.key_id) from exc
        if value.startswith(COMPRESSED + ":"):
            data = _zstd()[1].decompress(data)
        out.append(data.decode())
    return out


def _auth_failed(column: str, row_id: str, key_id: str) -> KeyAccessError:
    return KeyAccessError(
        f"{column} of row {row_id!r}: authentication failed under {key_id} (wrong key, or a value "
        "moved from another row or column)"
    )


def key_id_of(ciphertext: str) -> str:
    prefix, key_id, _ = ciphertext.split(":", 2)
    if prefix not in (PREFIX, COMPRESSED):
        raise KeyAccessError(f"value is not ehrlake ciphertext (prefix {prefix!r})")
    return key_id


def decrypt_value(key: DataKey, ciphertext: str | None, row_id: str, column: str) -> str | None:
    """Decrypt, or raise :class:`KeyAccessError`: never return garbage for a wrong key or row."""
    if ciphertext is None:
        return None
    key_id = key_id_of(ciphertext)
    if key_id != key.key_id:
        raise KeyAccessError(f"value was encrypted with {key_id}, not {key.key_id}")
    return decrypt_batch({key_id: key}, [ciphertext], [row_id], column)[0]
