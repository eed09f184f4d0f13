"""Third-party lines that tell an ehrlake user nothing, kept out of the ``ehrlake`` command's output.

Some are printed by native code, below any log level this process can set: the JVM's notice that
Spark loads an incubator module (once per JVM), XGBoost's collective "Task N got rank N" (printed
by the Spark Python workers that train it; Spark copies their output to the JVM's stderr) and
netlib's failed attempt to load a native BLAS that the machine does not have. They all reach file
descriptor 2, which the JVM and its workers inherit from the ``ehrlake`` process, so the command
(:func:`ehrlake.cli.console`) points descriptor 2 at a pipe and copies it to the terminal without
these lines. Everything else passes unchanged; ``--verbose`` (``EHRLAKE_DEBUG``) keeps them all.
Library calls from Python (tests, notebooks) are never filtered.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading

NOISE = (
    re.compile(rb"\[\d\d:\d\d:\d\d\] Task \d+ got rank \d+"),
    re.compile(rb"WARNING: Using incubator modules: jdk\.incubator\.vector"),
    re.compile(rb"netlib-blas: JNI_OnLoad: dlopen\(libblas\.so\.3\) failed[^\n]*"),
)
_PAUSE = 0.2  # a partial line (a prompt) is shown once nothing more came for this long
_DRAIN = 10.0  # the longest an exiting command waits for the copier (a JVM still printing)


def clean(line: bytes) -> bytes | None:
    """``line`` without the noise in it; None where nothing else was on it."""
    out = line
    for pattern in NOISE:
        out = pattern.sub(b"", out)
    if out != line and not out.strip():
        return None
    return out


def filter_stderr() -> None:
    """Copy this process's descriptor 2 (and its children's, started after) without :data:`NOISE`."""
    if os.environ.get("EHRLAKE_DEBUG") or getattr(filter_stderr, "installed", False):
        return
    sys.stderr.flush()
    read, write = os.pipe()
    terminal = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    stop = threading.Event()
    copier = threading.Thread(target=_copy, args=(read, terminal, stop), name="stderr-filter", daemon=True)
    copier.start()
    filter_stderr.installed = True

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # this process writes to the terminal again; a JVM still alive keeps the pipe
        stop.set()
        # the copier ends at the pipe's end, or once quiet; a loaded machine may take a while to run
        # it, and what it has not copied yet (the command's own error line) would be lost at exit
        copier.join(timeout=_DRAIN)

    atexit.register(restore)


def _copy(read: int, terminal: int, stop: threading.Event) -> None:
    pending = b""
    while True:
        # whether to stop is read before looking at the pipe: everything the command wrote before it
        # asked the copier to stop is then in the pipe for this look. Read after (as it once was), a
        # look that came up empty just before the command's last line and the stop would end the copy
        # with that line (its one-line error) still unread: an exit 1 with nothing on stderr.
        stopping = stop.is_set()
        ready, _, _ = select.select([read], [], [], 0 if stopping else _PAUSE)
        chunk = os.read(read, 65536) if ready else b""
        if not chunk:  # quiet for a moment, or closed: a partial line (a prompt) is shown as it is
            kept = clean(pending) if pending else None
            if kept:
                os.write(terminal, kept)
            pending = b""
            if stopping or ready:
                return
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        out = [kept for kept in map(clean, lines) if kept is not None]
        if out:
            os.write(terminal, b"\n".join(out) + b"\n")
