"""The whole local mesh (`servegrid up`) from a fresh home on free ports, stopped by `servegrid down`, for tests
that need every part at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.stack.datastores import postgres_data_dir
from services.stack.local import PORT_SETTINGS
from services.stack.ports import free_block, free_ports
from tests.support.processes import REPO

SERVEGRID = [sys.executable, "-m", "services.stack"]
PORTS = PORT_SETTINGS
# The services' metrics ports are base+1 … base+5, in this order (services/stack/local.py).
METRICS_SERVICES = ("gateway", "router", "registry", "batch", "edge")


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped by whoever inherited it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class LocalStack:
    """A running local mesh: its environment (for the CLI and clients) and its ports."""

    env: dict[str, str]
    ports: dict[str, int]
    metrics_port_base: int
    home: Path

    @property
    def envoy(self) -> str:
        return f"127.0.0.1:{self.ports['ENVOY_PORT']}"

    @property
    def envoy_admin(self) -> str:
        return f"127.0.0.1:{self.ports['ENVOY_ADMIN_PORT']}"

    @property
    def ca_file(self) -> Path:
        """The local CA `servegrid up` made; the public port's certificate chains to it."""
        return self.home / "certs" / "ca.crt"

    def metrics_address(self, service: str) -> str:
        return f"127.0.0.1:{self.metrics_port_base + 1 + METRICS_SERVICES.index(service)}"

    def cli(self, *args: str, timeout_s: float = 120) -> str:
        """`servegrid ARGS` against this stack; fails the test with its output when it fails."""
        done = subprocess.run(
            [*SERVEGRID, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if done.returncode != 0:
            raise AssertionError(f"servegrid {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout


@contextmanager
def local_stack(home: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[LocalStack]:
    """`servegrid up` in `home` on free ports; `servegrid down` afterwards, checking nothing is left running."""
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    base = free_block(len(METRICS_SERVICES))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("SERVEGRID_DATABASE_URL", "SERVEGRID_REDIS_URL")},
        "SERVEGRID_STACK_HOME": str(home),
        "SERVEGRID_STACK_METRICS_PORT_BASE": str(base),
        **{f"SERVEGRID_STACK_{name}": str(port) for name, port in ports.items()},
        "SERVEGRID_REGISTRY_ADDRESS": f"127.0.0.1:{ports['REGISTRY_PORT']}",
        "COLUMNS": "200",
        **(extra_env or {}),
    }
    up = subprocess.run([*SERVEGRID, "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield LocalStack(env, ports, base, home)
    finally:
        state = json.loads((home / "state.json").read_text()) if (home / "state.json").exists() else {}
        down = subprocess.run([*SERVEGRID, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(postgres_data_dir(home), ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        alive = [name for name, entry in state.items() if running(entry["pid"])]
        assert alive == [], f"still running after down: {alive}"
