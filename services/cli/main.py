"""The `servegrid` command: run the local mesh and talk to it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.table import Table

from services.cli import access, batch, models
from services.cli.infer import infer
from services.cli.top import top
from services.stack.local import (
    StackSettings,
    dev_issuer,
    local_parts,
    operator_tls,
    public_ca_file,
    public_url,
)
from services.stack.seed import seed
from services.stack.supervisor import StackError, Supervisor, log_tail, pid_alive

app = typer.Typer(no_args_is_help=True, help="servegrid: gRPC-first inference on Triton.")
app.add_typer(models.app, name="models")
app.add_typer(access.keys_app, name="keys")
app.add_typer(batch.app, name="batch")
app.command()(access.token)
app.command()(infer)
app.command()(top)
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
        served = seed(
            f"{settings.host}:{settings.registry_port}",
            f"{settings.host}:{settings.triton_grpc_port}",
            f"{settings.host}:{settings.triton_http_port}",
            tls=operator_tls(settings),
        )
        console.print(f"[green]✓[/] seeded     models {', '.join(served)} (STAGE_PRODUCTION) on backend triton-local")
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
    host, port = settings.host, settings.envoy_port
    token = dev_issuer(settings).token(settings.dev_tenant, roles=["user", "admin"], ttl_s=12 * 3600)
    body = '{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":{"fp32":[1,2,3,4]}}]}'
    url = public_url(settings)
    if settings.public_tls:
        ca = public_ca_file(settings)
        tls_line = f"TLS on the public port; clients trust the local CA: {ca}\n\n  export CA={ca}\n"
        curl, grpcurl = "curl -s --cacert $CA", "grpcurl -cacert $CA"
        triton = f"g.InferenceServerClient('{host}:{port}', ssl=True, root_certificates=os.environ['CA'])"
    else:
        tls_line = "Plain HTTP on the public port (SERVEGRID_STACK_PUBLIC_TLS=false).\n"
        curl, grpcurl = "curl -s", "grpcurl -plaintext"
        triton = f"g.InferenceServerClient('{host}:{port}')"
    print(
        f"""
Everything goes through Envoy at {host}:{port} (REST and gRPC). {tls_line}
A dev token for tenant "{settings.dev_tenant}"
(roles user, admin; valid 12 h; mint more with `.venv/bin/servegrid token --tenant T --role R`):

  export TOKEN={token}

REST:
  {curl} -H "authorization: Bearer $TOKEN" -d '{body}' {url}/v1/models/affine:infer

API keys (`.venv/bin/servegrid keys create --tenant T`): exchange one for a 5-minute token, then use it as above
(the SDKs do this for you):
  {curl} -X POST -H "x-api-key: $API_KEY" -d '{{}}' {url}/v1/auth:token

gRPC (reflection, no proto files needed):
  .venv/bin/{grpcurl} -H "authorization: Bearer $TOKEN" -d '{{"model_id":"affine",{body[1:]}' \\
    {host}:{port} servegrid.gateway.v1.GatewayService/Infer

Any KServe v2 client (tritonclient) through Envoy:
  .venv/bin/python -c "import os, numpy as np, tritonclient.grpc as g; c={triton}; \\
i=g.InferInput('x',[1,4],'FP32'); i.set_data_from_numpy(np.ones((1,4),np.float32)); \\
print(c.infer('affine',[i],headers={{'authorization':'Bearer '+os.environ['TOKEN']}}).as_numpy('y'))"
"""
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
