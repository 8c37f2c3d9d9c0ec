"""The TypeScript SDK's own tests (`npm test`: tsc, then node's test runner against an in-process gateway),
run here so `make test` runs them wherever Node.js and the package's npm dependencies are installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SDK = Path(__file__).resolve().parents[2] / "sdk" / "typescript"


def test_the_typescript_sdk_passes_its_own_tests() -> None:
    if shutil.which("node") is None or not (SDK / "node_modules" / ".bin" / "tsc").exists():
        pytest.skip("Node.js and `npm ci` in sdk/typescript are needed (make test runs it where npm exists)")
    subprocess.run([str(SDK / "node_modules" / ".bin" / "tsc"), "-p", str(SDK)], check=True, timeout=300)
    done = subprocess.run(
        ["node", "--test", str(SDK / "dist" / "test")], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# pass 0" not in done.stdout
