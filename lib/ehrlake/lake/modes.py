"""The small named set of write modes (never free strings scattered around)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WriteMode(enum.Enum):
    APPEND = "append"
    """Add the rows as new files; existing files are untouched. Concurrent appends both land."""

    OVERWRITE = "overwrite"
    """Replace the table's rows, or only the partition named by ``where={col: value}``, atomically."""


@dataclass(frozen=True)
class CommitResult:
    """What one commit did; row counts come from file statistics, not from re-reading data."""

    table: str
    version: int
    operation: str
    files_added: int = 0
    files_removed: int = 0
    rows_written: int = 0
    metrics: dict = field(default_factory=dict)


def check_write(table: str, parts: list[str], mode: WriteMode, partition_by, where) -> None:
    """The write contract both engines keep: a table's partitioning is fixed, and ``where=`` names
    partitions (of partition columns only) to replace with ``OVERWRITE``."""
    from ehrlake.errors import SchemaMismatch

    if partition_by and list(partition_by) != parts:
        raise SchemaMismatch(f"{table} is partitioned by {parts}, not {list(partition_by)}")
    if where and mode is not WriteMode.OVERWRITE:
        raise SchemaMismatch("where= selects partitions to replace; it needs mode=OVERWRITE")
    if where and set(where) - set(parts):
        raise SchemaMismatch(f"where= may name only partition columns of {table}: {parts}")
