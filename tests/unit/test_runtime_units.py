"""Runtime pieces that need no server: settings, error mapping, log format."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from services.runtime.errors import DOMAIN, InvalidArgument, status_details
from services.runtime.logs import JsonFormatter, request_id_scope
from services.runtime.settings import ServiceSettings


class _Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRID_UNIT_", extra="ignore", frozen=True)


def test_settings_read_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEGRID_UNIT_PORT", "6001")
    monkeypatch.setenv("SERVEGRID_OTHER_PORT", "7001")
    assert _Settings().port == 6001
    assert _Settings().grace_period_s == 10.0


def test_settings_reject_nonsense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEGRID_UNIT_PORT", "99999")
    with pytest.raises(ValidationError, match="port"):
        _Settings()


def test_error_carries_error_info_and_field_violations() -> None:
    err = InvalidArgument(
        "weights sum to 90, not 100",
        reason="INVALID_TRAFFIC_POLICY",
        metadata={"model_id": "digits"},
        field_violations=[("policy.splits", "weights must sum to 100")],
    )
    status = err.to_grpc_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    parsed, info = status_details(status.trailing_metadata)
    assert parsed is not None and parsed.message == "weights sum to 90, not 100"
    assert info is not None and (info.reason, info.domain) == ("INVALID_TRAFFIC_POLICY", DOMAIN)
    bad = error_details_pb2.BadRequest()
    assert parsed.details[1].Unpack(bad)
    assert bad.field_violations[0].field == "policy.splits"


def test_json_logs_carry_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    formatter = JsonFormatter("unit")
    with tracer.start_as_current_span("work") as span:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
        record.model_id = "digits"
        entry = json.loads(formatter.format(record))
    ctx = span.get_span_context()
    assert entry["msg"] == "hello world"
    assert entry["trace_id"] == format(ctx.trace_id, "032x")
    assert entry["span_id"] == format(ctx.span_id, "016x")
    assert entry["model_id"] == "digits" and entry["service"] == "unit"


def test_json_logs_carry_the_request_id_of_the_work_in_hand() -> None:
    formatter = JsonFormatter("unit")

    def entry() -> dict[str, object]:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", (), None)
        result: dict[str, object] = json.loads(formatter.format(record))
        return result

    with request_id_scope("rid-7"):
        assert entry()["request_id"] == "rid-7"
    assert "request_id" not in entry()


def test_a_stopped_service_runs_python_exit_handlers_and_keeps_its_exit_code(tmp_path: Path) -> None:
    # What ServiceApp.run ends with: the handlers that flush logs, spans and coverage data still run,
    # buffered output is written, and the code is the one asked for.
    marker = tmp_path / "handler-ran"
    script = (
        "import atexit, pathlib, sys\n"
        "from services.runtime.server import exit_after_python_cleanup\n"
        f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'flushed')\n"
        "sys.stdout.write('buffered, no newline')\n"
        "exit_after_python_cleanup(3)\n"
        "print('never reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "buffered, no newline"
    assert marker.read_text() == "flushed"
