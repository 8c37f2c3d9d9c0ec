"""Free ports for the local stack and the tests: below the ephemeral range, free when picked."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from services.stack import ports


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_picked_ports_are_distinct_free_and_never_ones_the_kernel_hands_out() -> None:
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = ports.free_ports(40)
    assert len(set(picked)) == 40
    assert all(10000 <= port < first_ephemeral for port in picked), picked
    assert all(_bindable(port) for port in picked)
    # What a connection or a bind to port 0 gets is from the ephemeral range: never one of ours.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert sock.getsockname()[1] >= first_ephemeral


def test_a_port_in_use_is_not_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    taken, free = ports.free_ports(2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", taken))
        held.listen()
        # Two candidates, one of them listened on: only the other ever comes back.
        monkeypatch.setattr(ports, "_below_ephemeral", lambda: [taken, free])
        assert {ports.free_port() for _ in range(20)} == {free}


def test_a_block_is_free_from_its_base_to_its_last_port() -> None:
    base = ports.free_block(6)
    assert all(_bindable(base + offset) for offset in range(7))
