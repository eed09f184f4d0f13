"""AES-256-GCM encryption of column values, each bound to its row.

Ciphertext is a string ``ek1:<key_id>:<base64(nonce | ciphertext+tag)>`` so it carries its key id
(rotation works value by value) and fits any string column. Large values (whole raw records) are
sealed as ``ek1z``: compressed first with zstd and the shipped dictionary ``seal-v1.zdict`` (see
``scripts/train_seal_dictionary.py``), since nothing can compress them once they are ciphertext.
The associated data is the row's identity plus the column name: moving a ciphertext to another
row or column fails authentication instead of decrypting to someone else's name.

Direct identifiers are sealed to the reveal public key instead (``ek2:<reveal key id>:<base64(
ephemeral public key | nonce | ciphertext+tag)>``, see :mod:`ehrlake.security.reveal_key`): one
ephemeral X25519 key per batch, its shared secret with the reveal key run through HKDF-SHA256 to an
AES-256-GCM key, the same associated data. Sealing needs only the public key; opening, the private.
Whole records sealed to it are compressed first as well (``ek2z``).
"""

from __future__ import annotations

import base64
import functools
import secrets
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ehrlake.errors import KeyAccessError
from ehrlake.security.keys import DataKey
from ehrlake.security.reveal_key import RevealPublicKey

PREFIX = "ek1"
COMPRESSED = "ek1z"  # zstd with the v1 dictionary, then sealed
SEALED_TO = "ek2"  # sealed to the reveal public key
SEALED_TO_COMPRESSED = "ek2z"  # zstd with the v1 dictionary, then sealed to the reveal public key
PREFIXES = (PREFIX, COMPRESSED, SEALED_TO, SEALED_TO_COMPRESSED)
_EPHEMERAL = 32  # bytes of an X25519 public key
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
    head = f"{COMPRESSED if compress else PREFIX}:{key.key_id}:".encode()
    squeeze = _zstd()[0].compress if compress else None
    return _seal_each(AESGCM(key.material), head, b"", values, row_ids, column, squeeze)


def _seal_each(aead: AESGCM, head: bytes, lead: bytes, values, row_ids, column: str, squeeze=None):
    """``head`` + base64(``lead`` | nonce | ciphertext+tag) per value, a fresh random nonce each,
    bound to row and column; None stays None."""
    nonces = secrets.token_bytes(12 * len(values))
    tail = f"\x1f{column}".encode()
    b64 = base64.b64encode
    out: list[bytes | None] = []
    for i, (value, row_id) in enumerate(zip(values, row_ids, strict=True)):
        if value is None:
            out.append(None)
            continue
        nonce = nonces[12 * i : 12 * i + 12]
        aad = (row_id if isinstance(row_id, bytes) else row_id.encode()) + tail
        out.append(head + b64(lead + nonce + aead.encrypt(nonce, squeeze(value) if squeeze else value, aad)))
    return out


def _shared_key(secret: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    info = b"ehrlake ek2" + ephemeral + recipient  # both public keys: the key is bound to this pair
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(secret))


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def seal_to(
    recipient: RevealPublicKey, values, row_ids, column: str, compress: bool = False
) -> list[bytes | None]:
    """Seal many UTF-8 values to the reveal public key (one ephemeral key for the batch); ``row_ids``
    may be str or bytes; ``compress`` as in :func:`seal_many`. Whoever calls this cannot open what
    it returns."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw(ephemeral.public_key())
    secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient.public))
    aead = _shared_key(secret, ephemeral_public, recipient.public)
    head = f"{SEALED_TO_COMPRESSED if compress else SEALED_TO}:{recipient.key_id}:".encode()
    squeeze = _zstd()[0].compress if compress else None
    return _seal_each(aead, head, ephemeral_public, values, row_ids, column, squeeze)


class _Opener:
    """Opens the values of one column, each under the key its id names: a data key (``ek1``), or
    the reveal private key (``ek2``, one HKDF per ephemeral key, so once per sealed batch)."""

    def __init__(self, keys: dict):
        self.keys = keys
        self.ciphers: dict = {}

    def cipher(self, key_id: str, blob: bytes) -> tuple[AESGCM, bytes]:
        key = self.keys[key_id]
        if isinstance(key, DataKey):
            if key_id not in self.ciphers:
                self.ciphers[key_id] = AESGCM(key.material)
            return self.ciphers[key_id], blob
        ephemeral, rest = blob[:_EPHEMERAL], blob[_EPHEMERAL:]
        if ephemeral not in self.ciphers:
            secret = key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
            self.ciphers[ephemeral] = _shared_key(secret, ephemeral, _raw(key.public_key()))
        return self.ciphers[ephemeral], rest


def decrypt_batch(keys: dict, values, row_ids, column: str) -> list[str | None]:
    """Open many values; ``keys`` maps key id to key: a :class:`DataKey`, or the reveal private key
    for ``ek2`` values (values of one column may span rotations and both kinds)."""
    opener = _Opener(keys)
    out: list[str | None] = []
    for value, row_id in zip(values, row_ids, strict=True):
        if value is None:
            out.append(None)
            continue
        key_id = key_id_of(value)
        aead, blob = opener.cipher(key_id, base64.b64decode(value.rsplit(":", 1)[1]))
        try:
            data = aead.decrypt(blob[:12], blob[12:], associated_data(row_id, column))
        except InvalidTag as exc:
            raise _auth_failed(column, row_id, key_id) from exc
        if value.startswith((COMPRESSED + ":", SEALED_TO_COMPRESSED + ":")):
            data = _zstd()[1].decompress(data)
        out.append(data.decode())
    return out


def _auth_failed(column: str, row_id: str, key_id: str) -> KeyAccessError:
    return KeyAccessError(
        f"{column} of row {row_id!r}: authentication failed under {key_id} (wrong key, or a value "
        "moved from another row or column)"
    )


def is_sealed(value: str) -> bool:
    """Whether a string is ehrlake ciphertext (of any kind)."""
    return value.split(":", 1)[0] in PREFIXES and value.count(":") >= 2


def key_id_of(ciphertext: str) -> str:
    prefix, key_id, _ = ciphertext.split(":", 2)
    if prefix not in PREFIXES:
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
