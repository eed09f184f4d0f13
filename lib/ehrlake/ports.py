"""A free TCP port for a server ehrlake starts (a Flower SuperLink or SuperNode, a TensorFlow
worker's gRPC server, the SQL server and Spark master the tests start).

A port bind(0) returns comes from the kernel's ephemeral range, the range it also hands to every
outgoing connection: between the probe closing and the server binding, another socket (a
SuperNode's own connection to its SuperLink, seen once in CI) can take it. Ports are therefore
chosen below that range, checked bindable, and never twice for the same caller's ``taken`` set.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from ehrlake.errors import EhrlakeError

LOWEST = 10000  # below it: well-known and registered services more often listen


def ephemeral_low() -> int:
    """The lowest port the kernel hands out itself (to bind(0) and to outgoing connections)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # IANA's dynamic range: macOS and Windows use it


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port bindable on ``host`` now, below the ephemeral range and not in ``taken`` (added to
    it). Where the range starts too low to leave room, the kernel's choice (bind(0)) is used."""
    taken = set() if taken is None else taken
    low = ephemeral_low()
    for _ in range(100):
        port = random.randint(LOWEST, low - 1) if low > LOWEST + 1 else 0
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise EhrlakeError(f"no free port on {host or 'any address'} in 100 tries")
