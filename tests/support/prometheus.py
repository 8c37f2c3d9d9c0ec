"""Run a real Prometheus (the Debian `prometheus` package's server) for a test, and ask it PromQL."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.stack.ports import free_port
from tests.support.polling import wait_started

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
MISSING = "Prometheus is not installed (Debian package `prometheus`: `make prometheus-tools` installs it; CI runs it)"


def installed(binary: str) -> bool:
    return Path(binary).is_file()


@dataclass(frozen=True)
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=30) as reply:
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector; a PromQL error fails the test with Prometheus' message."""
        try:
            data = self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as err:
            raise AssertionError(f"Prometheus refused {expr!r}: {err.read().decode(errors='replace')}") from err
        result: list[dict[str, Any]] = data["result"]
        return result

    def names(self) -> set[str]:
        """Every metric name Prometheus holds a series of (scraped or recorded)."""
        return set(self.get("/api/v1/label/__name__/values"))

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def finite_values(result: Sequence[Mapping[str, Any]]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]


def scrape_config(
    jobs: Mapping[str, tuple[str, Sequence[str]]], rule_files: Sequence[Path], interval: str = "1s"
) -> str:
    """A prometheus.yml: `jobs` maps a job name to (metrics path, targets)."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "metrics_path": path, "static_configs": [{"targets": list(targets)}]}
            for job, (path, targets) in jobs.items()
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


@contextmanager
def run_prometheus(workdir: Path, config: str, timeout_s: float = 60) -> Iterator[Prometheus]:
    """Prometheus on a free port with its own storage under `workdir`; stopped by PID afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(config)
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)

    def ready() -> bool:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as reply:
            return bool(reply.status == 200)

    try:
        wait_started(process, ready, name="prometheus", timeout_s=timeout_s, log_tail=server.log_tail)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or numbers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: regexes, label values
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?", " ", text)  # numbers, 1e6 included
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if match[0] not in _KEYWORDS and not rest.startswith("("):
            names.add(match[0])
    return names
