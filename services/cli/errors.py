"""How the CLI reports a failed call: the status code and the server's message, then a non-zero exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import typer
from rich.console import Console

from servegrid_sdk import ServegridError
from services.runtime.errors import status_details

_err = Console(stderr=True)


@contextmanager
def exit_on_rpc_error() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as err:
        call: grpc.Call = err
        _, info = status_details(call.trailing_metadata())
        reason = f" ({info.reason})" if info and info.reason else ""
        _err.print(f"[red]error: {call.code().name}{reason}: {call.details()}[/]")
        raise typer.Exit(1) from None
    except ServegridError as err:  # the SDK's form of the same (the API-key exchange)
        reason = f" ({err.reason})" if err.reason else ""
        _err.print(f"[red]error: {err.code.name}{reason}: {err.message}[/]")
        raise typer.Exit(1) from None
