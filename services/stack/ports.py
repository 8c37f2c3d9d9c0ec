"""Local ports: pick free ones, and tell whether something listens on one."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just reported free; another process may still take it before it is bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the OS reported free, all bound at once and then released."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_block(size: int, host: str = "127.0.0.1") -> int:
    """A base port whose next `size` ports (base+1 ... base+size) were all free just now: for parts that
    number their ports from one base (the services' metrics ports, SERVEGRID_STACK_METRICS_PORT_BASE)."""
    while True:
        base = free_port(host)
        if base + size > 65535:
            continue
        sockets: list[socket.socket] = []
        try:
            for offset in range(1, size + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, base + offset))
            return base
        except OSError:
            continue  # one of them is taken: try another base
        finally:
            for sock in sockets:
                sock.close()


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """Something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        return sock.connect_ex((host, port)) == 0
