"""Start servegrid services as real subprocesses on free ports (ready_file tells the port), stop by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.support.polling import wait_started

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    """One `python -m <module>` this test session started."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 5.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def start_service(
    name: str,
    module: str,
    env_prefix: str,
    state_dir: Path,
    env: dict[str, str] | None = None,
    *,
    timeout_s: float = 30.0,
) -> ServiceProcess:
    """Run `python -m module` on free ports with text logs; wait for its ready file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = state_dir / f"{name}.log"
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen" / "python")]),
        f"{env_prefix}PORT": "0",
        f"{env_prefix}METRICS_PORT": "0",  # a free port: never collide with a running stack
        f"{env_prefix}READY_FILE": str(ready),
        f"{env_prefix}LOG_FORMAT": "text",
        f"{env_prefix}GRACE_PERIOD_S": "1",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    service = ServiceProcess(name, process, 0, log_path)
    try:
        wait_started(process, ready.exists, name=name, timeout_s=timeout_s, log_tail=service.log_tail)
    except RuntimeError:
        service.stop(grace_s=0)
        raise
    service.port = int(json.loads(ready.read_text())["port"])
    return service
