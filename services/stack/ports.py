"""Local ports: pick free ones, and tell whether something listens on one."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports are picked below the kernel's ephemeral range: the ports it hands out by itself, to every
# outgoing connection's source and every bind to port 0, come from that range, so a port picked there
# and bound seconds later (a stack's parts start one after another) can meanwhile be taken by any
# connection on the machine (seen: a metrics port lost to the test running beside). Below 10000 sit
# the servers people run locally (PostgreSQL, Redis, 8080, Prometheus ...).
_LOWEST = 10000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_pick = random.SystemRandom()  # os.urandom: a test seeding `random` cannot make two sessions pick alike


def _below_ephemeral() -> range:
    try:
        first = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768  # Linux's default
    return range(_LOWEST, max(first, _LOWEST + 1000))


def _bound(host: str, port: int) -> socket.socket | None:
    """A socket bound to host:port, or None when the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free just now, below the ephemeral range (bound at once, then released);
    another process may still take one before it is bound again, but no connection is handed it."""
    candidates = _below_ephemeral()
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = _bound(host, _pick.choice(candidates))
            if sock is not None:
                held.append(sock)
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port free just now (see free_ports)."""
    return free_ports(1, host)[0]


def free_block(size: int, host: str = "127.0.0.1") -> int:
    """A base port whose next `size` ports (base+1 ... base+size) were all free just now: for parts that
    number their ports from one base (the services' metrics ports, SERVEGRID_STACK_METRICS_PORT_BASE)."""
    candidates = _below_ephemeral()
    while True:
        base = _pick.choice(candidates[: len(candidates) - size])
        held = [_bound(host, base + offset) for offset in range(size + 1)]
        try:
            if all(sock is not None for sock in held):
                return base
        finally:
            for sock in held:
                if sock is not None:
                    sock.close()


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """Something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        return sock.connect_ex((host, port)) == 0
