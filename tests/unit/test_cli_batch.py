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
