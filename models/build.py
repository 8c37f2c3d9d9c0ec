"""Build the model artifacts (cached, idempotent) and render the Triton model repository: `python -m models.build`."""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from models import digits, resnet18
from models.catalog import MODELS, Backend, Device, Kind, ModelSpec, model_spec, render_config

MODELS_DIR = Path(__file__).resolve().parent
CACHE_DIR = MODELS_DIR / ".cache"  # trained/exported artifacts; git-ignored
REPOSITORY_DIR = MODELS_DIR / "repository"  # the rendered Triton model repository; git-ignored
VERSION = "1"
ONNX_RUNNER = MODELS_DIR / "onnx_runner.py"

# Bump a recipe number when the way an artifact is made changes, so cached copies get rebuilt.
RECIPES = {"digits": 1, "resnet18": 1}
RESNET18_SEED = 0
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifacts:
    """Where the built files live: model name -> model.onnx, plus the digits held-out split."""

    onnx_files: Mapping[str, Path]
    digits_held_out: Path


def artifact_paths(cache_dir: Path = CACHE_DIR) -> Artifacts:
    return Artifacts(
        onnx_files={"digits": cache_dir / "digits.onnx", "resnet18": cache_dir / "resnet18.onnx"},
        digits_held_out=cache_dir / "digits-held-out.npz",
    )


def build_artifacts(cache_dir: Path = CACHE_DIR, *, force: bool = False, log: bool = True) -> Artifacts:
    """Train/export every ONNX model into `cache_dir`, skipping those already built with the current recipe."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = artifact_paths(cache_dir)
    manifest_path = cache_dir / MANIFEST
    manifest: dict[str, dict[str, object]] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}

    def up_to_date(name: str, *files: Path) -> bool:
        entry = manifest.get(name, {})
        return not force and entry.get("recipe") == RECIPES[name] and all(f.exists() for f in files)

    def say(message: str) -> None:
        if log:
            print(message, file=sys.stderr)

    if up_to_date("digits", paths.onnx_files["digits"], paths.digits_held_out):
        say("digits: up to date")
    else:
        trained = digits.train_digits()
        _write_atomic(paths.onnx_files["digits"], trained.model.SerializeToString())
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz", delete=False) as tmp:
            trained.held_out.save(Path(tmp.name))
        _make_readable(Path(tmp.name))
        os.replace(tmp.name, paths.digits_held_out)
        manifest["digits"] = {
            "recipe": RECIPES["digits"],
            "test_size": digits.TEST_SIZE,
            "random_state": digits.RANDOM_STATE,
            "held_out_rows": len(trained.held_out.labels),
            "sklearn_test_accuracy": round(trained.test_accuracy, 4),
        }
        say(f"digits: trained, held-out accuracy {trained.test_accuracy:.4f}")

    if up_to_date("resnet18", paths.onnx_files["resnet18"]):
        say("resnet18: up to date")
    else:
        model = resnet18.build_resnet18(seed=RESNET18_SEED)
        _write_atomic(paths.onnx_files["resnet18"], model.SerializeToString())
        manifest["resnet18"] = {
            "recipe": RECIPES["resnet18"],
            "seed": RESNET18_SEED,
            "parameters": resnet18.trainable_parameter_count(model),
            "weights": "random (seeded); outputs are meaningless",
        }
        say("resnet18: built with seeded random weights")

    _write_if_changed(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return paths


def load_digits_held_out(cache_dir: Path = CACHE_DIR) -> digits.HeldOutSplit:
    """The held-out rows the digits classifier was not trained on (builds the artifacts if needed)."""
    return digits.HeldOutSplit.load(build_artifacts(cache_dir, log=False).digits_held_out)


def render_repository(
    dest: Path,
    onnx_files: Mapping[str, Path],
    *,
    backend: Backend = Backend.PYTHON,
    device: Device = Device.CPU,
    models: Sequence[ModelSpec] = MODELS,
) -> list[Path]:
    """Write <model>/config.pbtxt and <model>/1/* for each model; returns the files that changed.

    Unchanged files are left alone (same content, same inode), so re-running is cheap and a Triton
    polling the repository sees no spurious change. Only files this function owns are ever removed.
    """
    changed: list[Path] = []
    for spec in models:
        model_dir = dest / spec.name
        version_dir = model_dir / VERSION
        version_dir.mkdir(parents=True, exist_ok=True)
        if _write_if_changed(model_dir / "config.pbtxt", render_config(spec, backend, device).encode()):
            changed.append(model_dir / "config.pbtxt")
        wanted = spec.version_files(backend)
        for filename in ("model.py", "model.onnx"):
            target = version_dir / filename
            if filename not in wanted:
                # Switching flavours: the native onnxruntime backend has no use for a model.py.
                if target.exists():
                    target.unlink()
                    changed.append(target)
                continue
            if filename == "model.py":
                source = (
                    MODELS_DIR / spec.python_source if spec.kind is Kind.PYTHON and spec.python_source else ONNX_RUNNER
                )
                if _write_if_changed(target, source.read_bytes()):
                    changed.append(target)
            elif _link_or_copy(onnx_files[spec.name], target):
                changed.append(target)
    return changed


def build_repository(
    dest: Path = REPOSITORY_DIR,
    *,
    backend: Backend = Backend.PYTHON,
    device: Device = Device.CPU,
    cache_dir: Path = CACHE_DIR,
    force: bool = False,
    log: bool = True,
) -> Path:
    """Build (or reuse) the artifacts and render a complete repository at `dest`."""
    artifacts = build_artifacts(cache_dir, force=force, log=log)
    changed = render_repository(dest, artifacts.onnx_files, backend=backend, device=device)
    if log:
        state = f"{len(changed)} file(s) updated" if changed else "up to date"
        print(f"repository {dest} ({backend}, {device}): {state}", file=sys.stderr)
    return dest


def _write_atomic(path: Path, data: bytes) -> None:
    # Write-then-rename: a Triton or a test reading concurrently never sees half a file.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    _make_readable(Path(tmp.name))
    os.replace(tmp.name, path)


def _make_readable(path: Path) -> None:
    # mkstemp creates 0600 files; a repository copied into an image may be read by another user.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    _write_atomic(path, data)
    return True


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link the cached artifact (no copy of 47 MB) or copy it across filesystems; False if already there."""
    if target.exists() and (os.path.samefile(source, target) or filecmp.cmp(source, target, shallow=False)):
        return False
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__)
    parser.add_argument(
        "--backend",
        type=Backend,
        choices=list(Backend),
        default=Backend.PYTHON,
        help="python: every model on the Python backend (works with the pytriton wheel's tritonserver); "
        "onnxruntime: ONNX models on Triton's native onnxruntime backend (production Triton image)",
    )
    parser.add_argument("--device", type=Device, choices=list(Device), default=Device.CPU)
    parser.add_argument("--output", type=Path, default=REPOSITORY_DIR, help="repository directory to render")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where built artifacts are kept")
    parser.add_argument("--force", action="store_true", help="rebuild artifacts even if cached")
    parser.add_argument(
        "--print-config", metavar="MODEL", help="print one model's config.pbtxt for --backend/--device and exit"
    )
    args = parser.parse_args(argv)
    if args.print_config:
        print(render_config(model_spec(args.print_config), args.backend, args.device), end="")
        return 0
    build_repository(args.output, backend=args.backend, device=args.device, cache_dir=args.cache_dir, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
