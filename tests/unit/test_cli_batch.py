"""`servegrid batch watch|submit` end with why items failed, not only how many."""

from __future__ import annotations

from typing import Any

import pytest
from google.rpc import status_pb2
from servegrid.batch.v1 import batch_pb2
from servegrid.gateway.v1 import gateway_pb2

from services.cli import batch


class _Stub:
    """What _report_end asks the gateway: the first failed result, if any."""

    def __init__(self, results: list[batch_pb2.BatchResult]) -> None:
        self.results = results
        self.asked: list[gateway_pb2.ListBatchJobResultsRequest] = []

    def ListBatchJobResults(self, request: gateway_pb2.ListBatchJobResultsRequest, **_: Any) -> Any:
        self.asked.append(request)
        return gateway_pb2.ListBatchJobResultsResponse(results=self.results[: request.page_size])


def test_a_failed_job_names_its_first_failure(capsys: pytest.CaptureFixture[str]) -> None:
    failed = batch_pb2.BatchResult(
        item_id="img-137",
        state=batch_pb2.BATCH_ITEM_STATE_FAILED,
        error=status_pb2.Status(code=3, message="INVALID_ITEM: unexpected shape for input 'pixels' [1, 63]"),
    )
    stub = _Stub([failed])
    batch._report_end(stub, [], "j-1", "FAILED")  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "job j-1 FAILED" in err
    assert "first failure: item img-137: INVALID_ITEM: unexpected shape for input 'pixels' [1, 63]" in err
    assert "servegrid batch results j-1" in err
    assert stub.asked[0].state == batch_pb2.BATCH_ITEM_STATE_FAILED and stub.asked[0].page_size == 1


def test_a_succeeded_job_asks_nothing_more(capsys: pytest.CaptureFixture[str]) -> None:
    stub = _Stub([])
    batch._report_end(stub, [], "j-2", "SUCCEEDED")  # type: ignore[arg-type]
    assert "job j-2 SUCCEEDED" in capsys.readouterr().err
    assert stub.asked == []


# --- the CLI as a user sees it (typer's CliRunner, narrow and wide terminals) --------------------

WIDTHS = [60, 200]


def _run(args: list[str], width: int) -> Any:
    from typer.testing import CliRunner

    from services.cli.main import app

    return CliRunner().invoke(app, args, env={"COLUMNS": str(width), "TERM": "dumb"})


@pytest.mark.parametrize("width", WIDTHS)
def test_submit_help_shows_the_item_shape(width: int) -> None:
    result = _run(["batch", "submit", "--help"], width)
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # rich wraps at the terminal's width
    assert "[tensor, ...]" in text and "--api-key" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_a_missing_input_file_is_a_usage_error_not_a_traceback(width: int, tmp_path: Any) -> None:
    missing = str(tmp_path / "nope.jsonl")
    for args in (["batch", "submit", missing, "--model", "affine"], ["infer", "affine", "--input", missing]):
        result = _run(args, width)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "nope.jsonl" in " ".join(result.output.split())


class _ListStub:
    def ListBatchJobs(self, request: Any, **_: Any) -> Any:
        job = batch_pb2.BatchJob(
            job_id="0b6c2d1e-1111-4222-8333-944455556666",
            model_id="digits",
            state=batch_pb2.BATCH_JOB_STATE_RUNNING,
            total_items=10,
        )
        return gateway_pb2.ListBatchJobsResponse(jobs=[job])


@pytest.mark.parametrize("width", [40, 80, 200])
def test_batch_list_never_cuts_a_job_id(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    @contextlib.contextmanager
    def fake_gateway(*_: Any) -> Any:
        yield _ListStub(), []

    monkeypatch.setattr(batch, "gateway", fake_gateway)
    result = _run(["batch", "list"], width)
    assert result.exit_code == 0, result.output
    assert "0b6c2d1e-1111-4222-8333-944455556666" in result.output


def test_models_get_describes_the_traffic_policy_in_words() -> None:
    from servegrid.registry.v1 import registry_pb2 as rpb

    from services.cli.models import describe_policy

    policy = rpb.TrafficPolicy(
        model_id="digits",
        splits=[rpb.TrafficSplit(version=1, weight=90), rpb.TrafficSplit(version=2, weight=10)],
        shadow=rpb.ShadowPolicy(version=3, sample_rate=0.25),
        sticky_header="x-user-id",
        load_balancing=rpb.LOAD_BALANCING_ROUND_ROBIN,
    )
    text = describe_policy(policy)
    assert "traffic: v1 90%, v2 10%" in text
    assert "shadow: v3, 25% of requests mirrored" in text
    assert "sticky on header: x-user-id" in text and "backends: round robin" in text
    assert "{" not in text  # words, not JSON
    assert describe_policy(rpb.TrafficPolicy(model_id="m")).startswith("traffic: 100% to the PRODUCTION version")


def test_shell_completion_can_be_installed() -> None:
    result = _run(["--help"], 200)
    assert result.exit_code == 0
    assert "--install-completion" in result.output and "--show-completion" in result.output


@pytest.mark.parametrize("width", WIDTHS)
def test_infer_with_a_bare_data_list_says_where_the_values_go(width: int, tmp_path: Any) -> None:
    request = tmp_path / "request.json"
    request.write_text('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}')
    result = _run(["infer", "affine", "--input", str(request)], width)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # the words inside rich's error box
    assert "Traceback" not in text
    assert 'inputs[0].data takes its values in the list its datatype names: {"fp32": [...]}' in text, text
