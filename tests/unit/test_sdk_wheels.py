"""The stubs and the client install on their own, without this repository on the path."""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheels_install_and_import_without_the_repo(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_sdk.py"), "--out", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        check=True,
    )
    wheels = [Path(line) for line in built.stdout.split()]
    assert [w.name.split("-")[0] for w in wheels] == ["servegrid_api", "servegrid_sdk"]
    api_files = zipfile.ZipFile(wheels[0]).namelist()
    assert "servegrid/gateway/v1/gateway_pb2_grpc.py" in api_files
    assert "servegrid/gateway/v1/gateway_pb2.pyi" in api_files
    assert not any(name.startswith(("services/", "tests/")) for name in api_files)

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *map(str, wheels)],
        check=True,
    )
    # -S skips site.py, so the editable install of this repo (a .pth file) is not on the path: the
    # packages can only come from the wheels; third-party dependencies come from site-packages.
    code = (
        "import servegrid, servegrid_sdk, numpy as np;"
        "from servegrid.gateway.v1 import gateway_pb2_grpc;"
        f"assert str(servegrid.__file__).startswith({str(target)!r}), servegrid.__file__;"
        "t = servegrid_sdk.to_tensor('x', np.ones((1, 4), np.float32));"
        "print(t.datatype, list(t.shape))"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": f"{target}:{':'.join(site.getsitepackages())}"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "FP32 [1, 4]"
