"""What changed in a Delta table between two versions, read from its commit log.

Incremental jobs (``ehrlake clean --incremental``) need the rows that arrived, were rewritten or
went away since the version they last processed. Delta's Change Data Feed gives that row by row,
but only for tables written with it enabled, and the delta-rs engine cannot write it; both
engines do write the same commit files, though, and each commit names the data files it added
and removed. The rows of those files are a superset of the changed rows (an append adds exactly
the new rows; a copy-on-write merge or delete also rewrites rows that did not change), which is
what a job that recomputes by a key (every row of a changed patient) needs, on any Delta table.

The range must still be in the log (``delta.logRetentionDuration``) and removed files not yet
vacuumed; when they are not, :func:`file_changes` says so with ``None`` and the job rebuilds.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class FileChanges:
    """Data files a table's commits ``since`` (exclusive) to ``until`` (inclusive) added or removed."""

    since: int
    until: int
    added: tuple[str, ...]
    removed: tuple[str, ...]
    # an added file carries a deletion vector: some of its rows are deleted, which reading the
    # file alone would not show (no engine here writes them; a table written elsewhere may)
    deletion_vectors: bool = False

    @property
    def files(self) -> tuple[str, ...]:
        return self.added + self.removed


def file_changes(path: str, since: int, until: int) -> FileChanges | None:
    """The files behind every change from version ``since`` to ``until`` of the table at ``path``
    (a local or mounted path), or ``None`` when the log or a removed file is gone."""
    log = os.path.join(path, "_delta_log")
    added: dict[str, None] = {}
    removed: dict[str, None] = {}
    vectors = False
    for version in range(since + 1, until + 1):
        commit = os.path.join(log, f"{version:020d}.json")
        if not os.path.isfile(commit):
            return None
        with open(commit, encoding="utf-8") as handle:
            actions = [json.loads(line) for line in handle if line.strip()]
        for action in actions:
            if "add" in action and action["add"].get("dataChange", True):
                added[_absolute(path, action["add"]["path"])] = None
                vectors = vectors or bool(action["add"].get("deletionVector"))
            elif "remove" in action and action["remove"].get("dataChange", True):
                file = _absolute(path, action["remove"]["path"])
                if file in added:  # added and removed within the range: its rows were never seen
                    del added[file]
                else:
                    removed[file] = None
    if any(not os.path.isfile(f) for f in removed):
        return None  # vacuumed: what those rows were can no longer be read
    return FileChanges(since, until, tuple(added), tuple(removed), vectors)


def _absolute(table: str, path: str) -> str:
    parsed = urllib.parse.urlparse(path)
    if parsed.scheme:
        return os.path.normpath(urllib.parse.unquote(parsed.path))
    return os.path.normpath(os.path.join(table, urllib.parse.unquote(path)))


__all__ = ["FileChanges", "file_changes"]
