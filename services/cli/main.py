"""The `servegrid` command: run the local mesh and talk to it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.table import Table

from services.cli import models
from services.stack.local import StackSettings, local_parts
from services.stack.seed import seed
from services.stack.supervisor import StackError, Supervisor, log_tail, pid_alive

app = typer.Typer(no_args_is_help=True, add_completion=False, help="servegrid: gRPC-first inference on Triton.")
app.add_typer(models.app, name="models")
console = Console(stderr=True)


def _supervisor(settings: StackSettings) -> Supervisor:
    return Supervisor(settings.home)


@app.command()
def up(
    foreground: Annotated[bool, typer.Option(help="Stay attached; Ctrl-C stops the mesh.")] = False,
) -> None:
    """Start every part of the local mesh and return once all are healthy."""
    settings = StackSettings()
    sup = _supervisor(settings)
    began = time.monotonic()
    try:
        parts = local_parts(settings)
        for part in parts:
            with console.status(f"starting [bold]{part.name}[/]…") as status:

                def waiting(seconds: float, name: str = part.name) -> None:
                    status.update(f"starting [bold]{name}[/]… {seconds:4.1f}s")

                entry = sup.start(part, on_wait=waiting)
            ports = ", ".join(f"{k} {v}" for k, v in entry.ports.items())
            console.print(f"[green]✓[/] {part.name:<10} pid {entry.pid:<7} {ports}")
        served = seed(f"{settings.host}:{settings.registry_port}", f"{settings.host}:{settings.triton_grpc_port}")
        console.print(f"[green]✓[/] seeded     models {', '.join(served)} (PRODUCTION) on backend triton-local")
    except (StackError, grpc.RpcError) as err:
        console.print(f"[red]✗ {err}[/]")
        console.print("stopping what was started…")
        sup.stop_all()
        raise typer.Exit(1) from err
    console.print(f"\n[bold green]servegrid is up[/] in {time.monotonic() - began:.1f}s · logs in {sup.logs}")
    _print_examples(settings)
    if foreground:
        console.print("[dim]foreground: Ctrl-C stops everything[/]")
        try:
            while True:
                time.sleep(1)
                for name, entry in sup.load().items():
                    if not pid_alive(entry):
                        console.print(f"[red]{name} exited[/]; last lines of its log:\n{log_tail(Path(entry.log))}")
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            down()


def _print_examples(settings: StackSettings) -> None:
    # Plain print: these lines are meant to be copied, so no markup and no wrapping.
    host = settings.host
    print(
        "\nTry it — any KServe v2 client through the router (model ids come from the registry):\n"
        f"  python -c \"import numpy as np, tritonclient.grpc as g; c=g.InferenceServerClient('{host}:"
        f"{settings.router_port}'); i=g.InferInput('x',[1,4],'FP32'); "
        "i.set_data_from_numpy(np.ones((1,4),np.float32)); print(c.infer('affine',[i]).as_numpy('y'))\"\n"
        f"  .venv/bin/grpcurl -plaintext {host}:{settings.registry_port} list\n"
        "  .venv/bin/servegrid models list\n"
    )


@app.command()
def down() -> None:
    """Stop everything `servegrid up` started (by PID; nothing else is touched)."""
    settings = StackSettings()
    stopped = _supervisor(settings).stop_all()
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status() -> None:
    """Each part's health, pid, ports and log file."""
    settings = StackSettings()
    running = _supervisor(settings).load()
    table = Table("part", "state", "pid", "ports", "log")
    for part in local_parts(settings):
        entry = running.get(part.name)
        if entry is None:
            table.add_row(part.name, "[dim]not started[/]", "", "", "")
            continue
        alive = pid_alive(entry)
        try:
            healthy = alive and part.ready()
        except Exception:
            healthy = False
        state = "[green]healthy[/]" if healthy else ("[yellow]not ready[/]" if alive else "[red]exited[/]")
        ports = ", ".join(f"{k} {v}" for k, v in entry.ports.items())
        table.add_row(part.name, state, str(entry.pid), ports, entry.log)
    Console().print(table)


@app.command()
def logs(
    part: Annotated[str, typer.Argument(help="Which part, e.g. triton, registry, router.")],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines from the end.")] = 50,
) -> None:
    """Print the end of one part's log."""
    settings = StackSettings()
    path = _supervisor(settings).logs / f"{part}.log"
    if not path.exists():
        console.print(f"[red]no log for {part!r}[/] (looked in {path})")
        raise typer.Exit(1)
    print(log_tail(path, lines))


if __name__ == "__main__":
    app()
