"""Starts the local mesh's processes detached, waits until each is ready, and stops exactly those by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.stack.ports import port_open

ReadyCheck = Callable[[], bool]


class StackError(RuntimeError):
    """A part failed to start; the message says which and ends with its last log lines."""


@dataclass
class Part:
    """One process of the mesh and how to tell it is ready."""

    name: str
    argv: list[str]
    ready: ReadyCheck
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ready_timeout_s: float = 60.0
    # Files the process may leave behind when killed hard (Triton's shared-memory regions).
    leftovers_glob: str | None = None
    # Work to do just before starting (copy files, make folders); never done by `status`.
    prepare: Callable[[], object] | None = None
    # Run as this user (servers that refuse root, such as PostgreSQL).
    user: str | None = None


@dataclass
class Running:
    """What the state file remembers of a started part: enough to find, check and stop it."""

    name: str
    pid: int
    exe: str
    ports: dict[str, int]
    log: str
    started_at: float
    leftovers_glob: str | None = None


def _exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def pid_alive(entry: Running) -> bool:
    """Alive and still the program we started (a reused PID belongs to someone else)."""
    exe = _exe_of(entry.pid)
    return exe is not None and Path(exe).name == Path(entry.exe).name


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Supervisor:
    """Keeps `home/state.json` (what runs) and `home/logs/<part>.log` (what each printed)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.logs = home / "logs"
        self.state_file = home / "state.json"

    def load(self) -> dict[str, Running]:
        try:
            raw = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return {name: Running(**entry) for name, entry in raw.items()}

    def _save(self, state: dict[str, Running]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: asdict(entry) for name, entry in state.items()}, indent=2))
        tmp.replace(self.state_file)

    def start(self, part: Part, on_wait: Callable[[float], None] | None = None) -> Running:
        """Start `part` detached (its own session, so it outlives this command) and wait until ready."""
        state = self.load()
        current = state.get(part.name)
        if current and pid_alive(current):
            return current
        for port_name, port in part.ports.items():
            if port and port_open(port, timeout_s=0.2):
                raise StackError(
                    f"{part.name}: port {port} ({port_name}) is already in use by another process; "
                    "stop it or choose another port (see `servegrid up --help`)"
                )
        if part.prepare:
            part.prepare()
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{part.name}.log"
        with log_path.open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {part.name}\n".encode())
            log.flush()
            process = subprocess.Popen(
                part.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **part.env},
                cwd=part.cwd,
                start_new_session=True,
                user=part.user,
            )
        # Popen returns after exec, so /proc names the real program (a venv's python resolves to its base).
        exe = _exe_of(process.pid) or part.argv[0]
        entry = Running(part.name, process.pid, exe, part.ports, str(log_path), time.time(), part.leftovers_glob)
        state[part.name] = entry
        self._save(state)
        started = time.monotonic()
        while True:
            if process.poll() is not None:
                self._forget(part.name)
                raise StackError(
                    f"{part.name} exited with code {process.returncode} while starting; last lines of "
                    f"{log_path}:\n{log_tail(log_path)}"
                )
            if _safe(part.ready):
                return entry
            waited = time.monotonic() - started
            if waited > part.ready_timeout_s:
                self.stop(part.name)
                raise StackError(
                    f"{part.name} was not ready after {part.ready_timeout_s:.0f}s; last lines of "
                    f"{log_path}:\n{log_tail(log_path)}"
                )
            if on_wait:
                on_wait(waited)
            time.sleep(0.2)

    def stop(self, name: str, grace_s: float = 15.0) -> bool:
        """SIGTERM the part's process group, SIGKILL after `grace_s`; True when something was stopped."""
        state = self.load()
        entry = state.get(name)
        if entry is None:
            return False
        stopped = False
        if pid_alive(entry):
            stopped = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while pid_alive(entry) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry.pid, signal.SIGKILL)
            while pid_alive(entry) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
        if entry.leftovers_glob:
            for leftover in Path("/").glob(entry.leftovers_glob.lstrip("/")):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        self._forget(name)
        return stopped

    def _forget(self, name: str) -> None:
        state = self.load()
        state.pop(name, None)
        self._save(state)

    def stop_all(self, order: Sequence[str] | None = None) -> list[str]:
        """Stop every recorded part, newest first unless an order is given."""
        state = self.load()
        names = list(order) if order else sorted(state, key=lambda n: state[n].started_at, reverse=True)
        return [name for name in names if name in state and self.stop(name)]


def _safe(check: ReadyCheck) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
