"""One schema, many renderings: Spark StructType <-> Delta schema, and write-time alignment.

Delta's schema string is Spark's StructType JSON, so conversion is lossless both ways. Every field is
stored nullable: bronze data is untrusted, and a non-nullable column would turn a bad record into a
failed job instead of a quarantine row.
"""

from __future__ import annotations

import json

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ehrlake.errors import SchemaMismatch


def nullable(dtype: T.DataType) -> T.DataType:
    """The same type with every nested field and element nullable."""
    if isinstance(dtype, T.StructType):
        return T.StructType(
            [T.StructField(f.name, nullable(f.dataType), True, f.metadata) for f in dtype.fields]
        )
    if isinstance(dtype, T.ArrayType):
        return T.ArrayType(nullable(dtype.elementType), True)
    if isinstance(dtype, T.MapType):
        return T.MapType(dtype.keyType, nullable(dtype.valueType), True)
    return dtype


def to_delta_json(schema: T.StructType) -> str:
    return json.dumps(nullable(schema).jsonValue())


def from_delta_json(schema_json: str) -> T.StructType:
    data = json.loads(schema_json)
    for field in _walk_fields(data):
        field.setdefault("metadata", {})
    return T.StructType.fromJson(data)


def _walk_fields(node):
    if isinstance(node, dict):
        if "name" in node and "type" in node and "nullable" in node:
            yield node
        for value in node.values():
            yield from _walk_fields(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_fields(value)


def _same_type(a: T.DataType, b: T.DataType) -> bool:
    return nullable(a).simpleString() == nullable(b).simpleString()


def align(
    df: DataFrame, table_schema: T.StructType, table: str, evolve: bool
) -> tuple[DataFrame, list[T.StructField]]:
    """Shape ``df`` to the table's columns and order.

    Returns the aligned frame and the new columns to add to the table (only when ``evolve``).
    Missing columns become nulls (like Delta); a column with another type, or a new column without
    ``evolve``, raises :class:`SchemaMismatch` naming the columns.
    """
    incoming = {f.name for f in df.schema.fields}
    new = new_columns(df.schema, table_schema, table, evolve)
    columns = [
        F.col(f"`{f.name}`") if f.name in incoming else F.lit(None).cast(f.dataType).alias(f.name)
        for f in table_schema.fields
    ] + [F.col(f"`{f.name}`") for f in new]
    return df.select(*columns), new


def new_columns(
    schema: T.StructType, table_schema: T.StructType, table: str, evolve: bool
) -> list[T.StructField]:
    """The columns of ``schema`` that the table lacks, to add (only when ``evolve``); a column with
    another type, or a new column without ``evolve``, raises :class:`SchemaMismatch`."""
    existing = {f.name: f for f in table_schema.fields}
    incoming = {f.name: f for f in schema.fields}
    wrong = [
        f"{n} ({incoming[n].dataType.simpleString()} vs table {existing[n].dataType.simpleString()})"
        for n in incoming
        if n in existing and not _same_type(incoming[n].dataType, existing[n].dataType)
    ]
    if wrong:
        raise SchemaMismatch(f"cannot write to {table}: column types differ: {', '.join(wrong)}")
    new = [incoming[n] for n in incoming if n not in existing]
    if new and not evolve:
        raise SchemaMismatch(
            f"cannot write to {table}: new columns {', '.join(f.name for f in new)} are not in the table; "
            "pass evolve_schema=True to add them"
        )
    return [T.StructField(f.name, nullable(f.dataType), True, f.metadata) for f in new]
