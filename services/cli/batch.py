"""`servegrid batch submit|watch|results|list|cancel`: batch jobs through Envoy, with live progress."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from servegrid.batch.v1 import batch_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.cli.gateway import ApiKeyOpt, Metadata, TargetOpt, TokenOpt, gateway

app = typer.Typer(no_args_is_help=True, help="Batch jobs: submit a JSONL file, watch it, fetch the results.")
err = Console(stderr=True)

_ENDED = {batch_pb2.BATCH_JOB_STATE_SUCCEEDED, batch_pb2.BATCH_JOB_STATE_FAILED, batch_pb2.BATCH_JOB_STATE_CANCELLED}


def _state(job: batch_pb2.BatchJob) -> str:
    return batch_pb2.BatchJobState.Name(job.state).removeprefix("BATCH_JOB_STATE_")


def _watch(stub: gateway_pb2_grpc.GatewayServiceStub, metadata: Metadata, job_id: str) -> str:
    """Show a progress bar fed by WatchBatchJob until the job ends; returns its final state."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f} items/s  eta {task.fields[eta]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )
    state = "UNKNOWN"
    with Progress(*columns, console=err) as bar:
        task = bar.add_task(job_id[:8], total=None, rate=0.0, eta="?", failed=0)
        for update in stub.WatchBatchJob(gateway_pb2.WatchBatchJobRequest(job_id=job_id), metadata=metadata):
            job = update.progress.job
            done = job.succeeded_items + job.failed_items + job.cancelled_items
            eta = f"{update.progress.eta_seconds:.0f}s" if update.progress.eta_seconds >= 0 else "?"
            bar.update(
                task,
                total=job.total_items,
                completed=done,
                rate=update.progress.items_per_second,
                eta=eta,
                failed=job.failed_items,
            )
            state = _state(job)
            if job.state in _ENDED:
                break
    return state


def _first_failure(stub: gateway_pb2_grpc.GatewayServiceStub, metadata: Metadata, job_id: str) -> str:
    """'item ID: REASON: message' for the job's first failed item, or '' when none failed."""
    request = gateway_pb2.ListBatchJobResultsRequest(
        job_id=job_id, page_size=1, state=batch_pb2.BATCH_ITEM_STATE_FAILED
    )
    page = stub.ListBatchJobResults(request, metadata=metadata, timeout=30)
    if not page.results:
        return ""
    result = page.results[0]
    # The batch service writes the item's error as "REASON: message" (BatchResult.error).
    return f"item {result.item_id or result.item_index}: {result.error.message}"


def _report_end(stub: gateway_pb2_grpc.GatewayServiceStub, metadata: Metadata, job_id: str, state: str) -> None:
    """The job's end state, and why items failed when some did (the first failure; `results` has all)."""
    err.print(f"job {job_id} {state}")
    first = _first_failure(stub, metadata, job_id) if state != "SUCCEEDED" else ""
    if first:
        err.print(f"first failure: {first}", markup=False, soft_wrap=True)
        err.print(f"every failure: servegrid batch results {job_id}", markup=False, soft_wrap=True)


@app.command()
def submit(
    file: Annotated[
        Path,
        typer.Argument(
            # \[ : rich would read "[tensor, ...]" as markup and print nothing of it.
            help='JSONL: one item per line, {"item_id": "...", "inputs": \\[tensor, ...]}.',
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="Model id.")],
    version: Annotated[int, typer.Option(help="A specific version; 0 follows the traffic policy.")] = 0,
    priority: Annotated[int, typer.Option(help="0..9, higher first.")] = 0,
    idempotency_key: Annotated[
        str, typer.Option(help="Default: a hash of the file and model, so resubmitting returns the same job.")
    ] = "",
    wait: Annotated[bool, typer.Option(help="Show live progress until the job ends.")] = True,
    target: TargetOpt = "",
    token: TokenOpt = "",
    api_key: ApiKeyOpt = "",
) -> None:
    """Submit a batch job from a JSONL file."""
    data = file.read_bytes()
    key = idempotency_key or hashlib.sha256(data + f"\0{model}\0{version}".encode()).hexdigest()[:32]
    request = gateway_pb2.CreateBatchJobRequest(
        model_id=model, version=version, priority=priority, idempotency_key=key, items_ndjson=data
    )
    with gateway(target, token, api_key) as (stub, metadata):
        reply = stub.CreateBatchJob(request, metadata=metadata, timeout=300)
        job = reply.job
        verb = "submitted" if reply.created else "already submitted (same idempotency key)"
        err.print(f"{verb}: job {job.job_id} · {job.total_items} items · model {job.model_id}")
        print(job.job_id)
        if wait:
            state = _watch(stub, metadata, job.job_id)
            _report_end(stub, metadata, job.job_id, state)
            if state != "SUCCEEDED":
                raise typer.Exit(1)


@app.command()
def watch(job_id: str, target: TargetOpt = "", token: TokenOpt = "", api_key: ApiKeyOpt = "") -> None:
    """Live progress of a job until it ends."""
    with gateway(target, token, api_key) as (stub, metadata):
        _report_end(stub, metadata, job_id, _watch(stub, metadata, job_id))


@app.command()
def results(
    job_id: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to write; - for stdout.")] = Path("-"),
    target: TargetOpt = "",
    token: TokenOpt = "",
    api_key: ApiKeyOpt = "",
) -> None:
    """Write every result of a job as JSONL, in item order."""
    with gateway(target, token, api_key) as (stub, metadata):
        sink = sys.stdout if str(output) == "-" else output.open("w")
        count = 0
        try:
            request = gateway_pb2.StreamBatchJobResultsRequest(job_id=job_id)
            for reply in stub.StreamBatchJobResults(request, metadata=metadata):
                sink.write(json.dumps(json_format.MessageToDict(reply.result)) + "\n")
                count += 1
        finally:
            if sink is not sys.stdout:
                sink.close()
        err.print(f"{count} results" + ("" if str(output) == "-" else f" written to {output}"))


@app.command("list")
def list_jobs(target: TargetOpt = "", token: TokenOpt = "", api_key: ApiKeyOpt = "") -> None:
    """The caller's jobs, newest first."""
    with gateway(target, token, api_key) as (stub, metadata):
        reply = stub.ListBatchJobs(gateway_pb2.ListBatchJobsRequest(page_size=50), metadata=metadata)
        table = Table()
        # A job id is what the other commands take: never cut or wrapped, whatever the terminal's width.
        table.add_column("job", no_wrap=True, min_width=36)
        for column in ("model", "state", "done", "failed", "total", "created"):
            table.add_column(column)
        for job in reply.jobs:
            table.add_row(
                job.job_id,
                job.model_id,
                _state(job),
                str(job.succeeded_items),
                str(job.failed_items),
                str(job.total_items),
                job.create_time.ToJsonString(),
            )
        Console().print(table)


@app.command()
def cancel(job_id: str, target: TargetOpt = "", token: TokenOpt = "", api_key: ApiKeyOpt = "") -> None:
    """Cancel a job: no new items start."""
    with gateway(target, token, api_key) as (stub, metadata):
        job = stub.CancelBatchJob(gateway_pb2.CancelBatchJobRequest(job_id=job_id), metadata=metadata).job
        err.print(f"job {job_id} {_state(job)}")
