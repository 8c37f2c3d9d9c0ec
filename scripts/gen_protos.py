"""Regenerate gen/ (Python stubs, .pyi, the Envoy descriptor set and the OpenAPI document) from proto/, or check
it is fresh."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api
import grpc_tools
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: `scripts` is importable from the checkout
    sys.path.insert(0, str(ROOT))

from scripts import gen_openapi  # noqa: E402

# The OpenAPI document ships inside the generated `servegrid` package, so the router reads it as package
# data (services/mesh/api_docs.py) wherever servegrid is installed, not from a checkout's path.
OPENAPI_PACKAGE = Path("python") / "servegrid" / "openapi"
# Package data of the generated `servegrid` package, so a wheel carries it (services/mesh/params.py).
DESCRIPTORS = Path("python") / "servegrid" / "descriptors.binpb"
OPENAPI_FILE = "servegrid.openapi.json"

# The google protos the contracts import, taken from the installed googleapis-common-protos.
GOOGLE_PROTOS = [
    "google/api/annotations.proto",
    "google/api/field_behavior.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
]


def stage_protodeps(root: Path) -> Path:
    """Copy the google/api and google/rpc protos out of site-packages, where buf and protoc find them."""
    site = Path(google.api.__path__[0]).parent.parent
    deps = root / ".build" / "protodeps"
    for rel in GOOGLE_PROTOS:
        dest = deps / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / rel, dest)
    return deps


def proto_files(proto_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto"))


def protoc_command(root: Path) -> tuple[list[str], list[str]]:
    """protoc's command with the include paths, and the proto files to compile."""
    proto_dir = root / "proto"
    deps = stage_protodeps(root)
    wkt = Path(grpc_tools.__path__[0]) / "_proto"
    return [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"-I{deps}", f"-I{wkt}"], proto_files(
        proto_dir
    )


def generate(root: Path, out: Path) -> None:
    """Write the whole of gen/ for the protos under `root`/proto into `out`."""
    python_out = out / "python"
    python_out.mkdir(parents=True, exist_ok=True)
    base, files = protoc_command(root)
    bindir = Path(sys.executable).parent
    subprocess.run(
        [
            *base,
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={python_out}",
            f"--grpc_python_out={python_out}",
            f"--mypy_out=quiet:{python_out}",
            f"--mypy_grpc_out=quiet:{python_out}",
            *files,
        ],
        check=True,
    )
    # Envoy's grpc_json_transcoder needs every imported file in the set.
    subprocess.run(
        [*base, "--include_imports", f"--descriptor_set_out={out / DESCRIPTORS}", *files],
        check=True,
    )
    generate_openapi(root, out / OPENAPI_PACKAGE / OPENAPI_FILE)
    for pkg_dir in [python_out / "servegrid", *(p for p in (python_out / "servegrid").rglob("*") if p.is_dir())]:
        (pkg_dir / "__init__.py").touch()


def described_set(root: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every proto with its imports and comments (source info): the OpenAPI document's input.

    Not the servegrid package's descriptors.binpb: Envoy's copy stays without comments, which would only
    enlarge its config."""
    base, files = protoc_command(root)
    with tempfile.TemporaryDirectory(prefix="servegrid-described-") as tmp:
        out = Path(tmp) / "described.binpb"
        subprocess.run(
            [*base, "--include_imports", "--include_source_info", f"--descriptor_set_out={out}", *files], check=True
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def generate_openapi(root: Path, dest: Path) -> None:
    """The REST API's OpenAPI 3.1 document (scripts/gen_openapi.py) at `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(gen_openapi.to_json(gen_openapi.render(described_set(root))), encoding="utf-8")


def generate_typescript(root: Path, ts_out: Path) -> bool:
    """The TypeScript SDK's generated sources (they live inside that npm package); False without npm deps."""
    plugin = ts_plugin(root)
    if plugin is None:
        return False
    base, files = protoc_command(root)
    ts_out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            *base,
            f"--plugin=protoc-gen-ts_proto={plugin}",
            f"--ts_proto_out={ts_out}",
            f"--ts_proto_opt={TS_PROTO_OPTIONS}",
            *files,
        ],
        check=True,
    )
    return True


# Inside the npm package, so its imports resolve against the package's own node_modules.
TS_GEN = "sdk/typescript/src/gen"
# ts-proto: grpc-js clients, plain numbers for 64-bit ints (ids and counts stay far below 2^53).
TS_PROTO_OPTIONS = "outputServices=grpc-js,esModuleInterop=true,env=node,forceLong=number"


def ts_plugin(root: Path) -> Path | None:
    """ts-proto's protoc plugin, once `npm ci` ran in sdk/typescript (the Makefile does); else None."""
    plugin = root / "sdk" / "typescript" / "node_modules" / ".bin" / "protoc-gen-ts_proto"
    return plugin if plugin.exists() else None


def diff_trees(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two trees (missing on either side, or different bytes)."""

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    fa, fb = files(a), files(b)
    changed = sorted(fa ^ fb)
    changed += sorted(f for f in fa & fb if not filecmp.cmp(a / f, b / f, shallow=False))
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when gen/ differs from what proto/ produces")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args()
    root: Path = args.root.resolve()
    gen_dir = root / "gen"
    if not args.check:
        tmp = Path(tempfile.mkdtemp(prefix="servegrid-gen-"))
        try:
            generate(root, tmp)
            shutil.rmtree(gen_dir, ignore_errors=True)
            shutil.copytree(tmp, gen_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"generated {len(proto_files(root / 'proto'))} protos into gen/")
        with tempfile.TemporaryDirectory(prefix="servegrid-gen-ts-") as fresh:
            if generate_typescript(root, Path(fresh)):
                shutil.rmtree(root / TS_GEN, ignore_errors=True)
                shutil.copytree(fresh, root / TS_GEN)
                print(f"generated the TypeScript SDK sources into {TS_GEN}/")
            else:
                print("skipped the TypeScript SDK sources: run `npm ci` in sdk/typescript (needs Node.js and npm)")
        return 0
    ts_dir = root / TS_GEN
    with tempfile.TemporaryDirectory(prefix="servegrid-gen-") as fresh:
        generate(root, Path(fresh) / "gen")
        stale = [f"gen/{path}" for path in diff_trees(Path(fresh) / "gen", gen_dir)]
        if generate_typescript(root, Path(fresh) / "ts"):
            stale += [f"{TS_GEN}/{path}" for path in diff_trees(Path(fresh) / "ts", ts_dir)]
        else:
            print("note: TypeScript SDK sources not checked (sdk/typescript needs `npm ci`: Node.js and npm)")
    if stale:
        print("gen/ is stale; run `make gen` and commit the result. Differences:", file=sys.stderr)
        for path in stale:
            print(f"  {path}", file=sys.stderr)
        return 1
    print("gen/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
