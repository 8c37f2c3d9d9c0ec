"""The whole mesh from a fresh home on free ports: the README's examples as written, a 1,000-item batch
through the CLI, a canary through the CLI, status, and a clean `down` that leaves no process behind."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.smoke import examples, run
from services.stack.datastores import postgres_data_dir
from services.stack.ports import free_block, free_ports
from tests.support.local_stack import PORTS, running

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SERVEGRID = [sys.executable, "-m", "services.stack"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("stack-home")
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("SERVEGRID_DATABASE_URL", "SERVEGRID_REDIS_URL")},
        "SERVEGRID_STACK_HOME": str(home),
        "SERVEGRID_STACK_METRICS_PORT_BASE": str(free_block(5)),
        **{f"SERVEGRID_STACK_{name}": str(port) for name, port in ports.items()},
        "SERVEGRID_REGISTRY_ADDRESS": f"127.0.0.1:{ports['REGISTRY_PORT']}",
        "COLUMNS": "200",
    }
    up = subprocess.run([*SERVEGRID, "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "servegrid is up" in up.stderr
    env["_ENVOY"] = f"127.0.0.1:{ports['ENVOY_PORT']}"
    env["_CA"] = str(home / "certs" / "ca.crt")  # the CA `servegrid up` made and printed
    assert env["_CA"] in up.stdout.replace("\n", ""), "`servegrid up` prints where the public port's CA is"
    try:
        yield env
    finally:
        state = json.loads((home / "state.json").read_text()) if (home / "state.json").exists() else {}
        down = subprocess.run([*SERVEGRID, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(postgres_data_dir(home), ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        alive = [name for name, entry in state.items() if running(entry["pid"])]
        assert alive == [], f"still running after down: {alive}"


def test_readme_examples_run_as_written(stack: dict[str, str]) -> None:
    found = examples()
    assert len(found) >= 6, "the README keeps its curl, grpcurl, tritonclient, SDK and batch examples"
    replace = {"127.0.0.1:8080": stack["_ENVOY"], ".servegrid/certs/ca.crt": stack["_CA"]}
    failures = run(found, replace=replace, env=stack)
    assert failures == [], "\n\n".join(failures)


def test_status_reports_every_part_healthy(stack: dict[str, str]) -> None:
    status = subprocess.run([*SERVEGRID, "status"], cwd=REPO, env=stack, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    for part in ("postgres", "redis", "triton", "registry", "router", "kafka", "batch", "edge", "gateway", "envoy"):
        line = next(line for line in status.stdout.splitlines() if f" {part} " in line)
        assert "healthy" in line, line


def test_canary_through_the_cli(stack: dict[str, str]) -> None:
    def cli(*args: str) -> str:
        done = subprocess.run([*SERVEGRID, *args], cwd=REPO, env=stack, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    version = cli("models", "add-version", "digits", "--triton-model", "digits").strip()
    cli("models", "promote", "digits", version, "--stage", "staging", "--load")
    cli("models", "traffic", "digits", "--split", "1=90", "--split", f"{version}=10")
    shown = cli("models", "get", "digits")
    assert "STAGING" in shown and f"traffic: v1 90%, v{version} 10%" in shown
    bad = subprocess.run(
        [*SERVEGRID, "models", "traffic", "digits", "--split", "1=50"],
        cwd=REPO,
        env=stack,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_typescript_sdk_through_envoy(stack: dict[str, str]) -> None:
    """The TypeScript SDK, generated from the same protos, calls the gateway through Envoy."""
    sdk = REPO / "sdk" / "typescript"
    if shutil.which("node") is None or not (sdk / "node_modules").is_dir():
        pytest.skip("Node.js and `npm ci` in sdk/typescript are needed (make test runs it where npm exists)")
    subprocess.run([str(sdk / "node_modules" / ".bin" / "tsc"), "-p", str(sdk)], check=True, timeout=180)
    token = subprocess.run(
        [*SERVEGRID, "token", "--tenant", "ts"], cwd=REPO, env=stack, capture_output=True, text=True, check=True
    ).stdout.strip()
    done = subprocess.run(
        ["node", str(sdk / "dist" / "examples" / "infer.js"), stack["_ENVOY"], token, stack["_CA"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"model": "affine", "version": 1, "y": [3, 5, 7, 9]}

    # listModels({pageSize: 2}): a partial request, paged with the tokens the gateway returns.
    paged = subprocess.run(
        ["node", str(sdk / "dist" / "examples" / "models.js"), stack["_ENVOY"], token, stack["_CA"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert paged.returncode == 0, paged.stderr
    pages = [json.loads(line) for line in paged.stdout.splitlines()]
    # Three seeded models, two a page (a page may come back shorter, AIP-158): at least two pages.
    assert len(pages) >= 2 and all(len(page["models"]) <= 2 for page in pages)
    assert [page["next"] == "" for page in pages] == [False] * (len(pages) - 1) + [True]
    listed = [model for page in pages for model in page["models"]]
    assert {"affine", "digits"} <= set(listed) and len(listed) == len(set(listed)) >= 3
    assert {stage for page in pages for stages in page["stages"] for stage in stages} <= {
        "STAGE_PRODUCTION",
        "STAGE_STAGING",
    }


def test_the_public_port_refuses_plain_http_and_serves_the_local_ca_s_certificate(stack: dict[str, str]) -> None:
    """TLS is on by default: plain HTTP to the public port gets no HTTP answer; HTTPS verified with the CA does."""
    host, port = stack["_ENVOY"].rsplit(":", 1)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://{host}:{port}/openapi.json", timeout=5)
    context = ssl.create_default_context(cafile=stack["_CA"])
    with urllib.request.urlopen(f"https://{host}:{port}/openapi.json", timeout=5, context=context) as reply:
        assert reply.status == 200 and json.loads(reply.read())["openapi"]
