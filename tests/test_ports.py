"""ehrlake.ports: the ports servers are started on are outside the range the kernel hands to
outgoing connections, so no other socket can take one between its choice and its bind."""

from __future__ import annotations

import socket

from ehrlake.ports import ephemeral_low, free_port


def test_free_ports_are_bindable_distinct_and_below_the_kernels_own_range():
    taken: set[int] = set()
    ports = [free_port(taken=taken) for _ in range(20)]
    assert len(set(ports)) == 20 and taken == set(ports)
    low = ephemeral_low()
    assert all(p < low for p in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises if it were not free


def test_a_port_in_use_or_taken_is_passed_over(monkeypatch):
    from ehrlake import ports

    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        held.listen()
        busy = held.getsockname()[1]
        spare = free_port()
        offered = iter([busy, spare, spare, free_port()])  # in use, free, then free but taken
        monkeypatch.setattr(ports.random, "randint", lambda low, high: next(offered))
        taken: set[int] = set()
        assert free_port(taken=taken) == spare
        assert free_port(taken=taken) not in (busy, spare)
