"""CPU time of whole process trees from /proc: what a benchmark charges each part of the mesh per request."""

# utime + stime of a process and every descendant (Triton's Python-backend stubs are children of
# tritonserver), read before and after a run. On a shared 2-core box this is steadier than
# throughput: another tenant's load slows a request but does not add CPU to our processes.

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text.rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (reaped children are not counted)."""
    total = 0.0
    stack = [pid]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        fields = _stat_fields(current)
        if fields is None:
            continue
        # Fields 14 and 15 of /proc/PID/stat (utime, stime), counted from 1 before the split point.
        total += (int(fields[11]) + int(fields[12])) / _TICKS
        stack += _children(current)
    return total


class CpuMeter:
    """CPU seconds each named process tree used between start() and stop()."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, float] = {}
        self.used_s: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: tree_cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used_s = {name: tree_cpu_s(pid) - self._start.get(name, 0.0) for name, pid in self.pids.items()}
        return self.used_s

    def per_request_us(self, requests: int) -> dict[str, float]:
        if requests <= 0:
            return {name: float("nan") for name in self.used_s}
        return {name: 1e6 * used / requests for name, used in self.used_s.items()}
