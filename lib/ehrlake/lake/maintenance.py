"""Keeping the lake's tables cheap to read and bounded on disk: ``ehrlake lake maintain``.

Every ingest, merge and scoring run adds files; a table read by every analyst query ends up as
hundreds of small files, each a file open, a footer read and a task. Maintenance, per table:

1. **retention** as Delta table properties, so any Delta reader (Spark, delta-rs, Trino) sees the
   same promise: removed files kept ``retain_days`` for time travel, the log ``log_days``;
2. **compaction**: small files bin-packed into few large ones (Delta's OPTIMIZE; delta-rs's
   ``optimize.compact`` on the other engine), one commit that changes no row, so readers at any
   version see the same data; ``zorder`` rewrites the table Z-ordered on those columns instead;
3. **vacuum**: files no version within the retention needs are deleted (with orphans of crashed
   writers). Time travel further back than ``retain_days`` is given up, by design.

Tables read by deep-learning workers a file at a time (:data:`SHARDED`) keep their files as written.

The audit log is never rewritten or vacuumed: its history is its evidence (``audit verify``
accepts only appends), and how long it is kept is the agency's legal decision, not a tuning knob.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltalake import DeltaTable

from ehrlake.errors import ConfigError
from ehrlake.lake.catalog import TableName, list_tables
from ehrlake.lake.stats import stats_columns

KEPT_AS_IS = ("audit",)  # layers maintenance never touches
# tables whose files are the training workers' shards (ehrlake.dl.datasets plans one worker per set
# of files, written runtime.images_per_file rows each): compacted, there would be fewer shards than
# workers. They get retention and vacuum, never compaction.
SHARDED = ("silver.imaging", "gold.tensors_")


@dataclass
class Maintained:
    """One table's maintenance: files before and after, what compaction and vacuum did."""

    table: str
    files_before: int
    files_after: int
    compacted: int  # files rewritten into others
    vacuumed: int  # files deleted from disk
    zordered: list[str]  # the columns it was Z-ordered on (those asked for that it has, with statistics)

    def line(self) -> str:
        zorder = f"  z-ordered on {', '.join(self.zordered)}" if self.zordered else ""
        return (
            f"{self.table:<32} files {self.files_before:>5} -> {self.files_after:<5} "
            f"compacted {self.compacted:>5}  vacuumed {self.vacuumed:>5}{zorder}"
        )


def maintain(
    lake,
    tables: list[str] | None = None,
    retain_days: int = 7,
    log_days: int = 30,
    zorder: list[str] | None = None,
    role: str | None = None,
    dry_run: bool = False,
) -> list[Maintained]:
    """Maintain ``tables`` (default: every table outside :data:`KEPT_AS_IS`) as ``role``, which must
    be allowed to write their layers; audited as one ``maintain`` job. ``dry_run``: counts only."""
    if retain_days < 1 or log_days < retain_days:
        raise ConfigError("retention: --retain-days must be at least 1 and the log kept at least as long")
    names = [str(t) for t in list_tables(lake.root)] if tables is None else list(tables)
    names = [n for n in names if TableName.parse(n).layer not in KEPT_AS_IS]
    for name in names:
        if not lake.exists(name):
            raise ConfigError(f"{name} is not a table of this lake")
    layers = sorted({TableName.parse(n).layer for n in names})
    properties = {
        "delta.deletedFileRetentionDuration": f"interval {retain_days} days",
        "delta.logRetentionDuration": f"interval {log_days} days",
    }
    done = []
    with lake.security.job("maintain", layers, role) as (_, written):
        for name in names:
            log = DeltaTable(lake.path(name))  # file count and properties from the log, no data read
            before = len(log.file_uris())
            sharded = name.startswith(SHARDED)
            # Z-ordering sorts files by a column so readers skip files by its min/max statistics:
            # useless (and refused by Delta) on a column without them (ehrlake.lake.stats)
            with_stats = stats_columns(lake.schema(name))
            by = [] if sharded or dry_run else [c for c in zorder or [] if c in with_stats]
            compacted = 0
            if not dry_run:
                current = log.metadata().configuration
                if any(current.get(k) != v for k, v in properties.items()):  # else no commit
                    lake.set_properties(name, properties)
                if not sharded:
                    compacted, _ = lake.optimize(name, by)
            vacuumed = len(lake.vacuum(name, retain_days * 24, dry_run=dry_run))
            log.update_incremental()
            done.append(Maintained(name, before, len(log.file_uris()), compacted, vacuumed, by))
            if compacted or vacuumed:
                written.append((name, f"{compacted} files compacted, {vacuumed} vacuumed"))
    return done
