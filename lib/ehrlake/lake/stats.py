"""Per-file Delta statistics (numRecords, minValues, maxValues, nullCount) from a Parquet footer.

Only the footer is read, so this costs one small read per file on the driver, independent of rows.
Readers (Spark's Delta reader, delta-rs) use these stats to skip files. Columns inside lists or maps
get no stats (their Parquet leaf counts do not describe the column), and long strings get no
min/max (the Delta spec would need truncation rules; leaving them out is always correct).

Text columns get no statistics at all, in the Parquet footer and page index or in the Delta log
(:func:`parquet_options`): a min or max is a copy of some row's value, outside the row, and text
from the input (a name typed into a date field, a quarantine message) must not be copied where
column sealing and access rules do not reach. Only hex digests the lake derives itself keep them.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq

_MAX_STRING_STAT = 64
TEXT_WITH_STATS = frozenset({"patient_key", "record_hash"})  # HMAC / SHA-256 hex: no input text
_PARQUET_STATS = "parquet.column.statistics.enabled"


def stats_columns(schema, booleans: bool = True) -> list[str]:
    """The dotted paths that may carry statistics: non-text leaves reached through structs
    (numbers, dates, timestamps, booleans unless ``booleans`` is false: Delta's own list of
    statistics columns refuses them) and :data:`TEXT_WITH_STATS`."""
    from pyspark.sql import types as T

    paths: list[str] = []

    def walk(field_type, path: str) -> None:
        if isinstance(field_type, T.StructType):
            for child in field_type.fields:
                walk(child.dataType, f"{path}.{child.name}")
        elif isinstance(field_type, T.StringType | T.BinaryType | T.ArrayType | T.MapType | T.VariantType):
            if path in TEXT_WITH_STATS:
                paths.append(path)
        elif booleans or not isinstance(field_type, T.BooleanType):
            paths.append(path)

    for field in schema.fields:
        walk(field.dataType, field.name)
    return paths


def parquet_options(schema) -> dict[str, str]:
    """Spark Parquet writer options: statistics off by default, back on for :func:`stats_columns`."""
    return {_PARQUET_STATS: "false", **{f"{_PARQUET_STATS}#{path}": "true" for path in stats_columns(schema)}}


def _json_value(value):
    """Render a Parquet statistic as Delta's JSON stats do; None means 'leave it out'."""
    if isinstance(value, bool):
        return None  # Delta records no min/max for booleans
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds") + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        return value if len(value) <= _MAX_STRING_STAT else None
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, int):
        return value
    return None  # binary and anything else: no min/max


def _leaf_paths(arrow_type: pa.DataType, prefix: tuple[str, ...]):
    """Yield the dotted paths of primitive leaves reachable through structs only."""
    if pa.types.is_struct(arrow_type):
        for i in range(arrow_type.num_fields):
            child = arrow_type.field(i)
            yield from _leaf_paths(child.type, prefix + (child.name,))
    elif not (
        pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_map(arrow_type)
    ):
        yield prefix


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def file_stats(metadata: pq.FileMetaData) -> dict:
    """Delta stats dict for one Parquet file's footer metadata."""
    arrow_schema = metadata.schema.to_arrow_schema()
    wanted = {".".join(p): p for f in arrow_schema for p in _leaf_paths(f.type, (f.name,))}
    mins: dict[str, object] = {}
    maxs: dict[str, object] = {}
    nulls: dict[str, int] = {}
    complete: dict[str, bool] = {}
    for rg in range(metadata.num_row_groups):
        group = metadata.row_group(rg)
        for ci in range(group.num_columns):
            column = group.column(ci)
            key = column.path_in_schema
            if key not in wanted:
                continue
            st = column.statistics
            if st is None or st.null_count is None:
                complete[key] = False
                continue
            nulls[key] = nulls.get(key, 0) + st.null_count
            if st.has_min_max:
                lo, hi = _json_value(st.min), _json_value(st.max)
                if lo is None or hi is None:
                    complete[key] = False
                    continue
                mins[key] = lo if key not in mins else min(mins[key], lo)
                maxs[key] = hi if key not in maxs else max(maxs[key], hi)
            elif group.num_rows != st.null_count:
                complete[key] = False
    stats: dict = {"numRecords": metadata.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    for key, path in wanted.items():
        if key in nulls and complete.get(key, True):
            _put(stats["nullCount"], path, nulls[key])
            if key in mins:
                _put(stats["minValues"], path, mins[key])
                _put(stats["maxValues"], path, maxs[key])
    return stats


def stats_json(metadata: pq.FileMetaData) -> str:
    return json.dumps(file_stats(metadata), separators=(",", ":"))
