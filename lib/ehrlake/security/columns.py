"""Sealing and opening DataFrame columns on the executors.

The key never enters the query plan: the plan carries only the key store location and key ids, and
each executor unwraps the data key itself through the configured provider (as a KMS client would).
Where ehrlake's Spark classes are on the class path (``make setup`` builds them), columns and
patient keys are sealed in the JVM (``infra/spark``: ``SealColumn``, ``PatientKey``), with no
Python round trip; what only Python does (processing copies, see :mod:`copies`) and opening go
through one Arrow UDF call per batch, however many columns a table has.

A sealed value is bound (AES-GCM associated data) to its *row id*: the table's logical name and
its key columns joined by U+001F, plus the column name. Values of non-string columns are sealed as
their string (scalars) or JSON (arrays, structs) form and restored to their type when opened.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.errors import KeyAccessError
from ehrlake.security import copies, crypto
from ehrlake.security.keys import EnvKeyProvider, FileKeyProvider, KeyStore
from ehrlake.security.pseudonym import patient_key
from ehrlake.security.reveal_key import KEY_ID_PREFIX, RevealPublicKey, private_key, require_public
from ehrlake.session import loads

SEPARATOR = "\x1f"
# records and texts: compressed before sealing (see crypto)
COMPRESSED = frozenset({"raw"}) | copies.COMPRESSED


@dataclass(frozen=True)
class KeyRef:
    """What a task needs to find a key: locations only, never key material (safe to pickle)."""

    key_store: str
    master_key_file: str | None  # None: the master key comes from $EHRLAKE_MASTER_KEY
    reveal_key_file: str | None = None  # only on the reveal path (Protector.revealing), never in jobs

    @classmethod
    def from_config(cls, security) -> KeyRef:
        """Absolute paths, so executors whose working directory differs find the same files."""
        use_env = bool(os.environ.get(EnvKeyProvider.variable))
        return cls(
            os.path.abspath(security.key_store),
            None if use_env else os.path.abspath(security.master_key_file),
        )

    def key(self, key_id: str):
        """The key that opens values of ``key_id``: a data key, or the reveal private key."""
        return _key(self, key_id)

    def store(self) -> KeyStore:
        provider = FileKeyProvider(self.master_key_file) if self.master_key_file else EnvKeyProvider()
        return KeyStore(self.key_store, provider)


def _key(ref: KeyRef, key_id: str):
    """The data key, unwrapped once per executor process, key id and key-file version: a rotated
    or destroyed key takes effect on the next batch, not only in new executor processes. For a
    reveal key id, the reveal private key (only where ``ref`` names its file)."""
    if key_id.startswith(KEY_ID_PREFIX):
        return private_key(ref.reveal_key_file, key_id)
    table = key_id.rsplit("#", 1)[0]
    try:
        stamp = os.stat(ref.store().key_file(table)).st_mtime_ns
    except FileNotFoundError:
        stamp = 0
    return _unwrapped(ref, key_id, stamp)


@functools.lru_cache(maxsize=64)
def _unwrapped(ref: KeyRef, key_id: str, stamp: int):
    return ref.store().get(key_id)


@contextlib.contextmanager
def key_errors():
    """Surface a task that failed on a key (wrong, missing, or a value moved between rows) as the
    :class:`KeyAccessError` it raised on the executor, instead of a page of Spark traceback."""
    marker = "KeyAccessError: "
    try:
        yield
    except KeyAccessError:
        raise
    except Exception as exc:
        text = str(exc)
        if marker not in text:
            raise
        raise KeyAccessError(text.split(marker, 1)[1].splitlines()[0].strip()) from exc


def row_id(table: str, keys: list[str]) -> Column:
    """The identity a sealed value is bound to: table name and key values."""
    return F.concat_ws(
        SEPARATOR, F.lit(table), *[F.coalesce(F.col(k).cast("string"), F.lit("")) for k in keys]
    )


def _as_text(name: str, ddl: str) -> Column:
    if ddl == "string":
        return F.col(name)
    if ddl.startswith(("array", "struct", "map")):
        return F.to_json(F.col(name))
    return F.col(name).cast("string")


def _from_text(name: str, ddl: str) -> Column:
    if ddl == "string":
        return F.col(name)
    if ddl.startswith(("array", "struct", "map")):
        return F.from_json(F.col(name), ddl)
    return F.col(name).cast(ddl)


# $EHRLAKE_SEAL_ENGINE=python seals in the Arrow UDF even where the JVM sealer loads (bench/crypto.py
# compares the two); the ciphertext is the same format either way
SEAL_ENGINE = "EHRLAKE_SEAL_ENGINE"
JVM_SEALER = {"ehrlake_seal": "ehrlake.SealColumn", "ehrlake_patient_key": "ehrlake.PatientKey"}


def jvm_sealing(spark) -> bool:
    """Whether this session seals in the JVM (its functions registered here when it does)."""
    if os.environ.get(SEAL_ENGINE, "jvm") == "python" or not loads(spark._jvm, JVM_SEALER["ehrlake_seal"]):
        return False
    for name, cls in JVM_SEALER.items():
        spark.udf.registerJavaFunction(name, cls, "string")
    return True


def _spec(*parts: str | None) -> Column:
    """A JVM sealer's settings as one literal: ids and locations, never key material."""
    return F.lit(SEPARATOR.join(p or "" for p in parts))


def _struct_type(names) -> str:
    return "struct<" + ",".join(f"`{n}`:string" for n in names) + ">"


def _sealer(
    ref: KeyRef,
    key_id: str,
    names: tuple[str, ...],
    linkage_id: str | None,
    reveal: RevealPublicKey | None,
    to_reveal: frozenset[str],
    deidentified: tuple[tuple[str, str], ...] = (),
    inputs: tuple[str, ...] = (),
    keyed: bool = True,
):
    """One Arrow UDF that seals ``names`` (those in ``to_reveal`` to the ``reveal`` public key, the
    rest under data key ``key_id``), then each ``deidentified`` (target, source) pair: the processing
    copy ``target`` of ``source`` (:mod:`ehrlake.security.copies`) under the data key; given a
    linkage key id (the copies' secret), it also computes patient_key unless not ``keyed`` (the JVM
    does). ``inputs``: further plain columns copies are made from, not sealed themselves. One Python
    round trip per batch for everything a table needs."""
    keyed = keyed and linkage_id is not None
    fields = [*names, *(t for t, _ in deidentified), *(["patient_key"] if keyed else [])]

    @F.arrow_udf(_struct_type(fields))
    def seal(row_ids: pa.Array, values: pa.Array, systems: pa.Array, patients: pa.Array) -> pa.Array:
        out = []
        secret = _key(ref, linkage_id).material if linkage_id else None  # copies' and patient_key's
        if names or deidentified:
            key = _key(ref, key_id) if set(names) - to_reveal or deidentified else None
            ids = row_ids.cast(pa.binary()).to_pylist()
            read = dict.fromkeys([*names, *(s for _, s in deidentified), *inputs])
            plain = {n: values.field(n).cast(pa.binary()).to_pylist() for n in read}  # UTF-8
            for n in names:
                if n in to_reveal:
                    sealed = crypto.seal_to(reveal, plain[n], ids, n, n in COMPRESSED)
                else:
                    sealed = crypto.seal_many(key, plain[n], ids, n, n in COMPRESSED)
                out.append(pa.array(sealed, pa.binary()).cast(pa.string()))
            for target, source in deidentified:
                make = copies.MAKERS[target]
                copy = [make(v, secret) for v in plain[source]]
                sealed = crypto.seal_many(key, copy, ids, target, compress=target in COMPRESSED)
                out.append(pa.array(sealed, pa.binary()).cast(pa.string()))
        if keyed:  # one HMAC per patient of the batch: a file holds a patient's rows together
            pairs = list(zip(systems.to_pylist(), patients.to_pylist(), strict=True))
            by_pair = {pair: patient_key(secret, *pair) for pair in set(pairs) if pair[1] is not None}
            out.append(pa.array([by_pair.get(pair) for pair in pairs], pa.string()))
        return pa.StructArray.from_arrays(out, names=fields)

    return seal


def _opener(ref: KeyRef, names: tuple[str, ...]):
    @F.arrow_udf(_struct_type(names))
    def unseal(row_ids: pa.Array, values: pa.Array) -> pa.Array:
        ids = row_ids.to_pylist()
        opened = []
        for n in names:
            column = values.field(n).to_pylist()
            keys = {k: _key(ref, k) for k in {crypto.key_id_of(v) for v in column if v is not None}}
            opened.append(pa.array(crypto.decrypt_batch(keys, column, ids, n), pa.string()))
        return pa.StructArray.from_arrays(opened, names=list(names))

    return unseal


def seal_columns(
    df: DataFrame,
    ref: KeyRef,
    key_id: str,
    columns: dict[str, str],
    row: Column,
    patient: tuple[str, str] | None = None,
    to_reveal: frozenset[str] = frozenset(),
    deidentified: dict[str, str] | None = None,
    inputs: dict[str, str] | None = None,
) -> DataFrame:
    """Replace each column of ``columns`` (name -> Spark type DDL) by its ciphertext under ``key_id``,
    bound to ``row`` (see :func:`row_id`); those in ``to_reveal`` are sealed to the key store's reveal
    public key instead. ``deidentified`` (target -> source column of ``columns``) adds each target
    after its source: the source's de-identified processing copy, under ``key_id``. With ``patient``
    = (linkage key id, patient id column), also add ``patient_key`` = HMAC-SHA256(linkage secret,
    source_system | patient id). ``inputs`` (name -> DDL): plain columns that are only sources of
    copies, read by the sealing and left out of the result. Every other column passes through
    unchanged."""
    inputs = inputs or {}
    if not columns and patient is None:
        return df.drop(*inputs)
    read = columns | inputs
    copies = tuple((t, s) for t, s in (deidentified or {}).items() if s in read)
    linkage_id, patient_column = patient or (None, None)
    jvm = jvm_sealing(df.sparkSession)
    names = () if jvm else tuple(columns)  # sealed by the Arrow UDF
    reveal = require_public(ref.key_store) if to_reveal & set(columns) else None
    sealed: dict[str, Column] = {}
    for n, t in columns.items() if jvm else ():
        to = reveal if n in to_reveal else None
        sealed[n] = F.call_function(
            "ehrlake_seal",
            row,
            _as_text(n, t),
            _spec(
                n,
                "1" if n in COMPRESSED else "0",
                to.key_id if to else key_id,
                ref.key_store,
                ref.master_key_file,
                base64.b64encode(to.public).decode() if to else None,
            ),
        )
    if patient and jvm:
        sealed["patient_key"] = F.call_function(
            "ehrlake_patient_key",
            F.col("source_system"),
            F.col(patient_column).cast("string"),
            _spec(linkage_id, ref.key_store, ref.master_key_file),
        )
    in_python = [*names, *(t for t, _ in copies), *(["patient_key"] if patient and not jvm else [])]
    if in_python:
        values = F.struct(*[_as_text(n, t).alias(n) for n, t in read.items()] or [F.lit(None)])
        revealed = to_reveal & set(names)
        keyed = bool(patient) and not jvm
        udf = _sealer(ref, key_id, names, linkage_id, reveal, revealed, copies, tuple(inputs), keyed)
        df = df.withColumn(
            "_ehrlake_sealed",
            udf(
                row,
                values,
                F.col("source_system") if keyed else F.lit(None).cast("string"),
                F.col(patient_column).cast("string") if keyed else F.lit(None).cast("string"),
            ),
        )
        sealed |= {n: F.col(f"_ehrlake_sealed.`{n}`") for n in in_python}
    kept = []
    for c in df.columns:
        if c not in inputs and c != "_ehrlake_sealed":
            kept.append(sealed[c].alias(c) if c in columns else F.col(f"`{c}`"))
        kept += [sealed[t].alias(t) for t, s in copies if s == c]
    if patient:
        kept.append(sealed["patient_key"].alias("patient_key"))
    return df.select(*kept)


def open_columns(df: DataFrame, ref: KeyRef, columns: dict[str, str], row: Column) -> DataFrame:
    """Replace each ciphertext column by its plaintext, restored to its type; a wrong key, a missing
    key version or a value moved from another row fails the task with :class:`KeyAccessError`."""
    present = {n: t for n, t in columns.items() if n in df.columns}
    if not present:
        return df
    names = tuple(present)
    opened = _opener(ref, names)(row, F.struct(*[F.col(n) for n in names]))
    df = df.withColumn("_ehrlake_opened", opened)
    return df.select(
        *[
            _from_text(f"_ehrlake_opened.`{c}`", present[c]).alias(c) if c in present else F.col(f"`{c}`")
            for c in df.columns
            if c != "_ehrlake_opened"
        ]
    )
