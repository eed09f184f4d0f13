"""One run at a time, per job and lake, for jobs whose runs must not overlap.

Two cleans at once could each append the same new rows (incremental), or one append after the
other's overwrite: duplicates that Delta's optimistic concurrency does not see, because appends
never conflict. An exclusive ``flock`` on ``<lake>/_ehrlake/<job>.lock`` keeps such runs apart on
one machine and on shared POSIX or NFSv4 volumes; the kernel releases it when the process dies, so
a crashed run never leaves the lake locked. On object stores (no locks) the scheduler must
serialise these jobs (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from ehrlake.errors import JobRunning


@contextlib.contextmanager
def alone(root: str, job: str):
    """Hold ``job``'s lock on the lake at ``root`` for the block; JobRunning if another run has it."""
    folder = os.path.join(root, "_ehrlake")
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f"{job}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobRunning(
                f"another {job} is running on the lake {root}; run again when it has finished"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


__all__ = ["alone"]
