"""Watermarks: which version of each source table a derived table reflects (``ops.watermarks``).

An incremental job (``ehrlake clean --incremental``) processes only what changed in its sources
since the versions its last run read; this table remembers those versions, one row per job and
derived table, with a fingerprint of the job's configuration (a changed mapping means rebuild).
A job records its marks after its writes have committed: a crash in between leaves the old marks,
so the next run recomputes a little more than it needs to, never less.

A mark may also say what the job left in its table (:class:`Counts`: the table's version after the
write, its rows and the rows each of its conditions selects), so that the next run adds what it
changed to those counts instead of scanning the whole table; any other writer since (a patient
forgotten, keys rotated) moves the version on, and the counts are then taken by a scan again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from pyspark.sql import functions as F

TABLE = "ops.watermarks"
SCHEMA = (
    "job string, table string, sources string, fingerprint string, run_id string, recorded_at timestamp, "
    "counts string"  # added after the first lakes were written: an older table gains it on the next record
)


@dataclass(frozen=True)
class Counts:
    """A derived table's rows at ``version``, and its rows that each of the job's conditions
    selects (``tallies``: clean's flagged rows, say), as the job that wrote it counted them."""

    version: int
    rows: int
    tallies: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Watermark:
    job: str
    table: str
    sources: dict[str, int]  # source table -> the version the job read
    fingerprint: str  # of what else decides the output (mappings): a change means rebuild
    run_id: str
    counts: Counts | None = None  # what the job left in the table, when it says


def read(lake, job: str) -> dict[str, Watermark]:
    """The job's marks by derived table (none before its first run)."""
    if not lake.exists(TABLE):
        return {}
    rows = lake.read(TABLE).where(F.col("job") == job).collect()  # one row per derived table
    return {
        r.table: Watermark(
            r.job,
            r.table,
            {k: int(v) for k, v in json.loads(r.sources).items()},
            r.fingerprint,
            r.run_id,
            _counts(getattr(r, "counts", None)),
        )
        for r in rows
    }


def _counts(text: str | None) -> Counts | None:
    """A mark's counts, from its JSON (none before the column existed)."""
    if not text:
        return None
    data = json.loads(text)
    tallies = {name: int(n) for name, n in data.get("tallies", {}).items()}
    return Counts(int(data["version"]), int(data["rows"]), tallies)


def record(lake, marks: list[Watermark], commit_info: dict) -> None:
    """Replace the marks of these (job, table) pairs, in one commit."""
    if not marks:
        return
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    rows = [
        (
            m.job,
            m.table,
            json.dumps(m.sources, sort_keys=True),
            m.fingerprint,
            m.run_id,
            now,
            json.dumps(asdict(m.counts)) if m.counts else None,
        )
        for m in marks
    ]
    lake.merge_rows(rows, SCHEMA, TABLE, ["job", "table"], evolve_schema=True, commit_info=commit_info)


def fingerprint(*parts) -> str:
    """A short stable digest of configuration objects (their ``repr``: dataclasses, tuples, str)."""
    return hashlib.sha256("\n".join(repr(p) for p in parts).encode()).hexdigest()[:16]


def code(*modules: ModuleType | Path) -> str:
    """A digest of the source of ``modules`` (a package, or a package's folder: every ``.py`` file
    in it): for a job's fingerprint, so that an upgrade that changes how rows are derived rebuilds
    what the old code derived rather than mixing the two in one table."""
    digest = hashlib.sha256()
    for module in modules:
        path = module / "__init__.py" if isinstance(module, Path) else Path(module.__file__)
        files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
        for file in files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


__all__ = ["TABLE", "Counts", "Watermark", "read", "record", "fingerprint", "code"]
