"""Start and stop standalone Triton Inference Server processes for the local stack, tests and benches."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from services.stack.ports import free_port, port_open

SHM_DIR = Path("/dev/shm")  # nosec B108
# The Python backend's own default prefix; ours appends a per-instance token so cleanup can tell
# this instance's regions from every other Triton's on the host.
SHM_PREFIX = "triton_python_backend_shm_region_"
PYTHON_SHM_BYTES = 8 * 1024 * 1024  # tmpfs: pages cost memory only once touched
DEFAULT_READY_TIMEOUT_S = 120.0
DEFAULT_STOP_GRACE_S = 15.0
# Less than the stop grace, so a SIGTERM'd Triton finishes draining before we escalate to SIGKILL.
EXIT_TIMEOUT_S = 10
_ADDRESS_IN_USE = ("already in use",)
_START_ATTEMPTS = 3


class TritonStartError(RuntimeError):
    """Triton exited or never became ready; the message ends with the last lines of its log."""


@dataclass(frozen=True)
class TritonDistribution:
    """Where a tritonserver binary and its `python` backend pieces are.

    `from_pytriton()` finds them in the nvidia-pytriton wheel installed next to the running interpreter;
    a host with a real Triton install can pass its own binary and backend directory instead.
    """

    server: Path
    # Either a ready backend directory (containing python/, onnxruntime/, ...) or None to assemble one.
    backend_directory: Path | None = None
    python_backend: Path | None = None  # dir with libtriton_python.so + triton_python_backend_utils.py
    python_stub: Path | None = None  # triton_python_backend_stub built for this interpreter's Python
    library_path: Path | None = None  # shared libraries tritonserver links against
    # Put first on the stub's PATH: the stub runs the `python3` it finds there, hence that env's packages.
    python_bin: Path = field(default_factory=lambda: Path(sys.executable).parent)

    @classmethod
    def from_pytriton(cls) -> TritonDistribution:
        try:
            import pytriton
        except ImportError as error:  # pragma: no cover - depends on the install
            raise TritonStartError("nvidia-pytriton is not installed; install the project's `stack` extra") from error
        package = Path(pytriton.__file__).resolve().parent
        bundled = package / "tritonserver"
        stub_python = f"{sys.version_info.major}.{sys.version_info.minor}"
        return cls(
            server=bundled / "bin" / "tritonserver",
            python_backend=bundled / "backends" / "python",
            python_stub=bundled / "python_backend_stubs" / stub_python / "triton_python_backend_stub",
            # The wheel's auditwheel-style library folder sits beside the package in site-packages.
            library_path=package.parent / "nvidia_pytriton.libs",
        )

    def prepare_backends(self, state_dir: Path) -> Path:
        """Return a backend directory, assembling `state_dir/backends/python` from the wheel if needed."""
        if self.backend_directory is not None:
            return self.backend_directory
        if self.python_backend is None or self.python_stub is None:
            raise TritonStartError("TritonDistribution needs backend_directory or python_backend + python_stub")
        target = state_dir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        for source in (
            self.python_backend / "libtriton_python.so",
            self.python_backend / "triton_python_backend_utils.py",
            self.python_stub,
        ):
            if not source.exists():
                raise TritonStartError(f"missing Triton Python backend file {source}")
            copy = target / source.name
            shutil.copyfile(source, copy)
            copy.chmod(copy.stat().st_mode | stat.S_IXUSR | stat.S_IRUSR)
        return target.parent

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: os.environ) plus what tritonserver and the stubs need to find their libraries."""
        env = dict(os.environ if base is None else base)
        if self.library_path is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(self.library_path), env.get("LD_LIBRARY_PATH", "")) if p
            )
        # The Python backend launches each stub through `bash -c "exec ..."`: PATH must still reach bash
        # even when the caller passes a bare environment, or every model fails with "Errno = 2".
        system_path = env.get("PATH") or os.environ.get("PATH") or os.defpath
        env["PATH"] = os.pathsep.join(p for p in (str(self.python_bin), system_path) if p)
        return env


TRACE_SERVICE_NAME = "servegrid-triton"  # `service.name` of Triton's spans


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector given as OTEL_EXPORTER_OTLP_ENDPOINT-style `endpoint`
    (http://host:4318, host:4318, or already ending in /v1/traces)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def opentelemetry_trace_config(url: str, *, rate: int = 1, service_name: str = TRACE_SERVICE_NAME) -> list[str]:
    """`--trace-config` values that make Triton export OTLP/HTTP spans to `url` (host:4318/v1/traces, with
    or without http://): every request (`rate` 1), with its queue and compute timestamps as span events.

    Checked on this build (2.51): Triton continues a request's W3C traceparent, so its InferRequest span
    is the child of the caller's span, and it posts OTLP/HTTP JSON (not protobuf) every 5 s. Over gRPC it
    loses the caller's traceparent now and then (6 of 60 requests here, 0 of 60 over HTTP) and starts a
    trace of its own: its spans still carry the request's id (`triton.request_id`)."""
    return [
        "mode=opentelemetry",
        f"opentelemetry,url={url}",
        f"opentelemetry,resource=service.name={service_name}",
        f"rate={rate}",
        "level=TIMESTAMPS",
    ]


def triton_command(
    server: Path,
    *,
    model_repository: Path,
    backend_directory: Path,
    host: str,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    load_models: Sequence[str] | None,
    shm_prefix: str,
    trace_config: Sequence[str] = (),
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The tritonserver argv: explicit model control so the registry can load and unload models later."""
    command = [
        str(server),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_directory}",
        "--model-control-mode=explicit",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        # The stub's default 1 MiB region would be regrown step by step for a batch of 600 KB images.
        f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_BYTES}",
    ]
    # None: every model in the repository; an empty list: start with nothing loaded.
    command += [f"--load-model={name}" for name in (["*"] if load_models is None else load_models)]
    command += [f"--trace-config={value}" for value in trace_config]
    command += list(extra_args)
    return command


@dataclass
class TritonInstance:
    """One running tritonserver process that this process started and will stop."""

    process: subprocess.Popen[bytes]
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    log_path: Path
    state_dir: Path
    model_repository: Path
    shm_prefix: str
    owns_state_dir: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def grpc_address(self) -> str:
        """host:port for tritonclient.grpc / any KServe v2 gRPC client."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The log's error lines (model load failures scroll out of the tail on shutdown) and its last lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line for line in text if line.startswith("E") or "UNAVAILABLE:" in line or "error:" in line]
        return "\n".join([*errors[-10:], "...", *text[-lines:]])

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL; reap the stubs and remove this instance's shm files."""
        if self._stopped:
            return self.process.returncode
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Triton runs in its own process group (start_new_session), so the group id is its PID and the
        # group holds exactly the Python backend stubs it spawned. A stub outlives a killed Triton for a
        # few seconds; end those now rather than leave them holding shm.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        _wait_group_gone(self.process.pid, timeout_s=5.0)
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(FileNotFoundError):
                region.unlink()
        if self.owns_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonInstance:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _wait_group_gone(process_group: int, timeout_s: float) -> None:
    """Wait until no live (non-zombie) process is left in the group, so its shm is no longer in use."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(process_group):
        time.sleep(0.05)


def _group_alive(process_group: int) -> bool:
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: nothing to inspect, SIGKILL has been sent
        return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state, ppid, pgrp, ...; a zombie only waits to be reaped and holds no mappings.
        if fields[0] != "Z" and int(fields[2]) == process_group:
            return True
    return False


def start_triton(
    model_repository: Path | str,
    *,
    grpc_port: int = 0,
    http_port: int = 0,
    metrics_port: int = 0,
    host: str = "127.0.0.1",
    load_models: Sequence[str] | None = None,
    state_dir: Path | str | None = None,
    trace_config: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    distribution: TritonDistribution | None = None,
) -> TritonInstance:
    """Start tritonserver and return once it is ready (server live, requested models loaded).

    Ports left at 0 are picked free. `load_models=None` loads every model in the repository. The log
    goes to `state_dir/triton.log`; without a `state_dir` a temporary one is used and removed on stop.
    Raises TritonStartError, carrying the log's last lines, if Triton exits or is not ready in time.
    """
    repository = Path(model_repository).resolve()
    if not repository.is_dir():
        raise TritonStartError(f"model repository {repository} does not exist; run `python -m models.build`")
    distribution = distribution or TritonDistribution.from_pytriton()
    owns_state_dir = state_dir is None
    state = Path(tempfile.mkdtemp(prefix="servegrid-triton-")) if state_dir is None else Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    backend_directory = distribution.prepare_backends(state)
    picked_ports = 0 in (grpc_port, http_port, metrics_port)
    command = functools.partial(  # the ports and shared-memory prefix are each attempt's own
        triton_command,
        distribution.server,
        model_repository=repository,
        backend_directory=backend_directory,
        host=host,
        load_models=load_models,
        trace_config=trace_config,
        extra_args=extra_args,
    )
    for attempt in range(1, _START_ATTEMPTS + 1):
        ports = tuple(
            port or free_port(host if host not in ("0.0.0.0", "") else "127.0.0.1")
            for port in (grpc_port, http_port, metrics_port)
        )
        instance = _launch(command, distribution, host, ports, state, repository)
        try:
            _wait_ready(instance, ready_timeout_s)
        except TritonStartError as error:
            tail = instance.log_tail()
            instance.stop()
            port_clash = any(marker in tail.lower() for marker in _ADDRESS_IN_USE)
            if picked_ports and port_clash and attempt < _START_ATTEMPTS:
                continue  # another process took a port between free_port() and Triton's bind
            if owns_state_dir:
                shutil.rmtree(state, ignore_errors=True)
            raise TritonStartError(f"{error}\n--- last lines of {instance.log_path} ---\n{tail}") from None
        except BaseException:
            # Ctrl-C or a test timeout while waiting: never leave an orphaned Triton behind.
            instance.owns_state_dir = owns_state_dir
            instance.stop()
            raise
        instance.owns_state_dir = owns_state_dir
        return instance
    raise AssertionError("unreachable")  # pragma: no cover


def _launch(
    command: Callable[..., list[str]],
    distribution: TritonDistribution,
    host: str,
    ports: tuple[int, ...],
    state: Path,
    repository: Path,
) -> TritonInstance:
    """One tritonserver process on `ports` (gRPC, HTTP, metrics) in its own process group, logging to
    `state/triton.log`, with shared-memory regions of its own; not yet ready."""
    grpc_port, http_port, metrics_port = ports
    shm_prefix = f"{SHM_PREFIX}sg{secrets.token_hex(4)}_"
    log_path = state / "triton.log"
    argv = command(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, shm_prefix=shm_prefix)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=distribution.environment(),
            cwd=state,
            # Own process group: stop() can reap the backend stubs without touching anyone else's.
            start_new_session=True,
        )
    return TritonInstance(
        process=process,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_path=log_path,
        state_dir=state,
        model_repository=repository,
        shm_prefix=shm_prefix,
    )


def _wait_ready(instance: TritonInstance, timeout_s: float) -> None:
    # HTTP /v2/health/ready is 200 only once every model named by --load-model is READY (strict readiness).
    url = f"http://{instance.http_address}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if instance.process.poll() is not None:
            raise TritonStartError(f"tritonserver exited with status {instance.process.returncode} during startup")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=1.0) as response,
        ):
            if response.status == 200 and port_open(instance.grpc_port, instance._client_host, timeout_s=1.0):
                return
        time.sleep(0.2)
    raise TritonStartError(f"tritonserver was not ready within {timeout_s:.0f}s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.stack.triton", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("models/repository"))
    parser.add_argument("--host", default="127.0.0.1", help="address Triton binds (0.0.0.0 for all)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument(
        "--load-model",
        action="append",
        dest="load_models",
        metavar="NAME",
        help="model to load at start (repeatable); default: every model in the repository",
    )
    parser.add_argument("--no-models", action="store_true", help="start with no model loaded")
    parser.add_argument("--state-dir", type=Path, help="backend copy and triton.log (default: a temp dir)")
    parser.add_argument(
        "--trace-config",
        action="append",
        default=[],
        metavar="VALUE",
        help="passed to tritonserver --trace-config (repeatable)",
    )
    parser.add_argument(
        "--otlp-url", help="shortcut: export OpenTelemetry traces to this OTLP/HTTP collector (http://host:4318)"
    )
    args = parser.parse_args(argv)

    otlp = opentelemetry_trace_config(otlp_traces_url(args.otlp_url)) if args.otlp_url else []
    trace = list(args.trace_config) + otlp
    # During startup SIGTERM behaves like Ctrl-C, so start_triton's cleanup runs and no Triton is orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        instance = start_triton(
            args.model_repository,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            host=args.host,
            load_models=[] if args.no_models else args.load_models,
            state_dir=args.state_dir,
            trace_config=trace,
        )
    except TritonStartError as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(
        f"triton ready pid={instance.pid} grpc={instance.grpc_address} http={instance.http_address} "
        f"metrics={instance.metrics_url} log={instance.log_path}",
        flush=True,
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with instance:
        while not stop.wait(1.0):
            if not instance.is_running():
                print(f"tritonserver exited ({instance.process.returncode}); see {instance.log_path}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
