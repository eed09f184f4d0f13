"""Sealing and opening DataFrame columns on the executors, one Arrow batch at a time.

The key never enters the query plan: the plan carries only the key store location and key ids, and
each executor process unwraps the data key itself through the configured provider (as a KMS client
would). All sealed columns of a row go through one pandas UDF call, so a table pays one Python
round trip per batch however many identifiers it has.

A sealed value is bound (AES-GCM associated data) to its *row id*: the table's logical name and
its key columns joined by U+001F, plus the column name. Values of non-string columns are sealed as
their string (scalars) or JSON (arrays, structs) form and restored to their type when opened.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.security import crypto
from ehrlake.security.keys import EnvKeyProvider, FileKeyProvider, KeyStore
from ehrlake.security.pseudonym import patient_key

SEPARATOR = "\x1f"


@dataclass(frozen=True)
class KeyRef:
    """What a task needs to find a key: locations only, never key material (safe to pickle)."""

    key_store: str
    master_key_file: str | None  # None: the master key comes from $EHRLAKE_MASTER_KEY

    @classmethod
    def from_config(cls, security) -> KeyRef:
        """Absolute paths, so executors whose working directory differs find the same files."""
        use_env = bool(os.environ.get(EnvKeyProvider.variable))
        return cls(
            os.path.abspath(security.key_store),
            None if use_env else os.path.abspath(security.master_key_file),
        )

    def store(self) -> KeyStore:
        provider = FileKeyProvider(self.master_key_file) if self.master_key_file else EnvKeyProvider()
        return KeyStore(self.key_store, provider)


def _key(ref: KeyRef, key_id: str):
    """The data key, unwrapped once per executor process, key id and key-file version: a rotated
    or destroyed key takes effect on the next batch, not only in new executor processes."""
    table = key_id.rsplit("#", 1)[0]
    try:
        stamp = os.stat(ref.store().key_file(table)).st_mtime_ns
    except FileNotFoundError:
        stamp = 0
    return _unwrapped(ref, key_id, stamp)


@functools.lru_cache(maxsize=64)
def _unwrapped(ref: KeyRef, key_id: str, stamp: int):
    return ref.store().get(key_id)


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


def _struct_type(names) -> str:
    return "struct<" + ",".join(f"`{n}`:string" for n in names) + ">"


def _sealer(ref: KeyRef, key_id: str, names: tuple[str, ...]):
    @F.pandas_udf(_struct_type(names))
    def seal(row_ids: pd.Series, values: pd.DataFrame) -> pd.DataFrame:
        key = _key(ref, key_id)
        ids = row_ids.tolist()
        return pd.DataFrame(
            {
                n: crypto.encrypt_batch(
                    key, values[n].astype(object).where(values[n].notna(), None).tolist(), ids, n
                )
                for n in names
            }
        )

    return seal


def _opener(ref: KeyRef, names: tuple[str, ...]):
    @F.pandas_udf(_struct_type(names))
    def unseal(row_ids: pd.Series, values: pd.DataFrame) -> pd.DataFrame:
        ids = row_ids.tolist()
        out = {}
        for n in names:
            column = values[n].astype(object).where(values[n].notna(), None).tolist()
            key_ids = {crypto.key_id_of(v) for v in column if v is not None}
            out[n] = crypto.decrypt_batch({k: _key(ref, k) for k in key_ids}, column, ids, n)
        return pd.DataFrame(out)

    return unseal


def _patient_keyer(ref: KeyRef, linkage_id: str):
    @F.pandas_udf("string")
    def key(systems: pd.Series, patient_ids: pd.Series) -> pd.Series:
        secret = _key(ref, linkage_id).material
        return pd.Series(
            [
                None if p is None or pd.isna(p) else patient_key(secret, s, p)
                for s, p in zip(systems, patient_ids, strict=True)
            ],
            dtype=object,
        )

    return key


def seal_columns(df: DataFrame, ref: KeyRef, key_id: str, columns: dict[str, str], row: Column) -> DataFrame:
    """Replace each column of ``columns`` (name -> Spark type DDL) by its ciphertext under ``key_id``,
    bound to ``row`` (see :func:`row_id`). Every other column passes through unchanged."""
    if not columns:
        return df
    names = tuple(columns)
    sealed = _sealer(ref, key_id, names)(
        row, F.struct(*[_as_text(n, t).alias(n) for n, t in columns.items()])
    )
    return df.withColumn("_ehrlake_sealed", sealed).select(
        *[F.col(f"_ehrlake_sealed.`{c}`").alias(c) if c in columns else F.col(f"`{c}`") for c in df.columns]
    )


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


def with_patient_key(df: DataFrame, ref: KeyRef, linkage_id: str, patient_id: str) -> DataFrame:
    """Add ``patient_key`` = HMAC-SHA256(linkage secret, source_system | ``patient_id``)."""
    return df.withColumn(
        "patient_key", _patient_keyer(ref, linkage_id)(F.col("source_system"), F.col(patient_id))
    )
