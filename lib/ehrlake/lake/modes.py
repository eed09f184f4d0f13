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
