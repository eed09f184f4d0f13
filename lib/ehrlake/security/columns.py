"""Encrypting and decrypting DataFrame columns on the executors, vectorised.

The key never enters the query plan: the plan carries only the key store location and the key id,
and each executor unwraps the data key itself through the configured provider (as a KMS client would).
Values are sealed with :mod:`ehrlake.security.crypto`, bound to the row identity and column name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from ehrlake.security import crypto
from ehrlake.security.keys import EnvKeyProvider, FileKeyProvider, KeyStore


@dataclass(frozen=True)
class KeyRef:
    """What a task needs to find a key: locations and ids only, never key material (safe to pickle)."""

    key_store: str
    master_key_file: str | None  # None: the master key comes from $EHRLAKE_MASTER_KEY

    def store(self) -> KeyStore:
        provider = FileKeyProvider(self.master_key_file) if self.master_key_file else EnvKeyProvider()
        return KeyStore(self.key_store, provider)


@functools.lru_cache(maxsize=64)
def _key(ref: KeyRef, key_id: str):
    """Unwrapped once per executor process and key id."""
    return ref.store().get(key_id)


def _sealer(ref: KeyRef, key_id: str, column: str):
    @F.pandas_udf("string")
    def seal(values: pd.Series, ids: pd.Series) -> pd.Series:
        key = _key(ref, key_id)
        return pd.Series(
            [
                None if v is None else crypto.encrypt_value(key, v, i, column)
                for v, i in zip(values, ids, strict=True)
            ]
        )

    return seal


def _opener(ref: KeyRef, column: str):
    @F.pandas_udf("string")
    def unseal(values: pd.Series, ids: pd.Series) -> pd.Series:
        return pd.Series(
            [
                None if v is None else crypto.decrypt_value(_key(ref, crypto.key_id_of(v)), v, i, column)
                for v, i in zip(values, ids, strict=True)
            ]
        )

    return unseal


def encrypt_columns(df: DataFrame, ref: KeyRef, key_id: str, columns: list[str], row_id: Column) -> DataFrame:
    """Replace each string column by its ciphertext under ``key_id``, bound to ``row_id``."""
    df = df.withColumn("_ehrlake_row_id", row_id)
    for column in columns:
        df = df.withColumn(
            column, _sealer(ref, key_id, column)(F.col(column).cast("string"), F.col("_ehrlake_row_id"))
        )
    return df.drop("_ehrlake_row_id")


def decrypt_columns(df: DataFrame, ref: KeyRef, columns: list[str], row_id: Column) -> DataFrame:
    """Replace each ciphertext column by its plaintext; a wrong key or moved value fails the task."""
    df = df.withColumn("_ehrlake_row_id", row_id)
    for column in columns:
        df = df.withColumn(column, _opener(ref, column)(F.col(column), F.col("_ehrlake_row_id")))
    return df.drop("_ehrlake_row_id")
