"""Build the Python SDK wheels: `servegrid-api` (generated stubs only) and `servegrid-sdk` (the typed client)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def _pyproject(name: str, description: str, dependencies: list[str], package: str) -> str:
    deps = ",\n".join(f'    "{d}"' for d in dependencies)
    return f"""[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{_version()}"
description = "{description}"
requires-python = ">=3.10"
license = "Apache-2.0"
dependencies = [
{deps}
]

[tool.setuptools.packages.find]
include = ["{package}*"]

[tool.setuptools.package-data]
"*" = ["*.pyi", "py.typed"]
"""


DISTRIBUTIONS = {
    "servegrid-api": (
        "gRPC stubs and type hints generated from servegrid's protobuf contracts",
        ["grpcio>=1.62", "protobuf>=5.26,<7", "googleapis-common-protos>=1.63"],
        ROOT / "gen" / "python" / "servegrid",
    ),
    "servegrid-sdk": (
        "A small typed client for servegrid: numpy tensors, credentials, deadlines, safe retries",
        [f"servegrid-api=={_version()}", "numpy>=1.24"],
        ROOT / "sdk" / "python" / "servegrid_sdk",
    ),
}


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name, (description, deps, package_dir) in DISTRIBUTIONS.items():
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
            project = Path(tmp)
            shutil.copytree(package_dir, project / package_dir.name, ignore=shutil.ignore_patterns("__pycache__"))
            (project / package_dir.name / "py.typed").touch()
            (project / "pyproject.toml").write_text(_pyproject(name, description, deps, package_dir.name))
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--no-deps",
                    "--no-build-isolation",
                    "--wheel-dir",
                    str(out),
                    str(project),
                ],
                check=True,
            )
        wheels.append(next(out.glob(f"{name.replace('-', '_')}-{_version()}-*.whl")))
    return wheels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheels go")
    args = parser.parse_args()
    for wheel in build(args.out):
        print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
