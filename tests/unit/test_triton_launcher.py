"""Pure parts of the Triton launcher: the command line and locating the pytriton wheel's pieces."""

from __future__ import annotations

import os
from pathlib import Path

from services.stack.triton import TritonDistribution, opentelemetry_trace_config, triton_command


def _command(load_models: list[str] | None, trace: list[str] | None = None) -> list[str]:
    return triton_command(
        Path("tritonserver"),
        model_repository=Path("repo"),
        backend_directory=Path("backends"),
        host="127.0.0.1",
        grpc_port=1,
        http_port=2,
        metrics_port=3,
        load_models=load_models,
        shm_prefix="triton_python_backend_shm_region_sgabc_",
        trace_config=trace or [],
    )


def test_command_uses_explicit_model_control_and_loads_what_was_asked() -> None:
    assert "--model-control-mode=explicit" in _command(None)
    assert [a for a in _command(None) if a.startswith("--load-model")] == ["--load-model=*"]
    assert [a for a in _command(["digits", "affine"]) if a.startswith("--load-model")] == [
        "--load-model=digits",
        "--load-model=affine",
    ]
    assert not [a for a in _command([]) if a.startswith("--load-model")]


def test_command_sets_every_port_and_a_private_shm_prefix() -> None:
    command = _command(None)
    assert {"--grpc-port=1", "--http-port=2", "--metrics-port=3"} <= set(command)
    assert "--backend-config=python,shm-region-prefix-name=triton_python_backend_shm_region_sgabc_" in command


def test_opentelemetry_trace_config_is_passed_through() -> None:
    command = _command(None, opentelemetry_trace_config("127.0.0.1:4318/v1/traces"))
    assert "--trace-config=mode=opentelemetry" in command
    assert "--trace-config=opentelemetry,url=127.0.0.1:4318/v1/traces" in command


def test_distribution_is_found_beside_the_running_interpreter_and_assembles_the_backend(tmp_path: Path) -> None:
    distribution = TritonDistribution.from_pytriton()
    assert distribution.server.is_file() and distribution.library_path and distribution.library_path.is_dir()
    backends = distribution.prepare_backends(tmp_path)
    python = backends / "python"
    assert sorted(p.name for p in python.iterdir()) == [
        "libtriton_python.so",
        "triton_python_backend_stub",
        "triton_python_backend_utils.py",
    ]
    assert os.access(python / "triton_python_backend_stub", os.X_OK)
    env = distribution.environment({"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(distribution.python_bin)
    assert env["LD_LIBRARY_PATH"] == str(distribution.library_path)
    # A bare environment must still let the backend find `bash`, which launches each stub.
    bare = distribution.environment({})["PATH"].split(os.pathsep)
    assert bare[0] == str(distribution.python_bin) and len(bare) > 1
