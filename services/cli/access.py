"""`servegrid token` and `servegrid keys …`: credentials for the local mesh."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.edge.settings import EdgeSettings
from services.stack.local import StackSettings, dev_issuer, stack_endpoints

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
out = Console()
err = Console(stderr=True)


def token(
    tenant: Annotated[str, typer.Option(help="Tenant the token speaks for.")] = "dev",
    role: Annotated[list[str] | None, typer.Option(help="Role; repeat for several (user, admin).")] = None,
    subject: Annotated[str, typer.Option(help="The `sub` claim.")] = "dev-user",
    ttl_s: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Mint a dev JWT signed with the local stack's key (trusted by the local Envoy only)."""
    issuer = dev_issuer(StackSettings())
    print(issuer.token(tenant, subject=subject, roles=role or ["user"], ttl_s=ttl_s))


def _edge_settings() -> EdgeSettings:
    endpoints = stack_endpoints(StackSettings())
    if endpoints is None:
        err.print("[red]the local stack is not up; run `servegrid up` (or `make up`) first[/]")
        raise typer.Exit(1)
    return EdgeSettings(database_url=endpoints["database_url"], redis_url=endpoints["redis_url"])


@keys_app.command("create")
def create_key(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")],
    role: Annotated[list[str] | None, typer.Option(help="Role; repeat for several.")] = None,
    description: str = "",
) -> None:
    """Create an API key; the secret is printed once and never stored."""
    from services.edge.keys import KeyAdmin

    async def run() -> None:
        async with KeyAdmin.connect(_edge_settings()) as admin:
            record, key = await admin.create(tenant, role or ["user"], description)
            print(json.dumps({"key_id": record.key_id, "tenant": tenant, "roles": list(record.roles), "api_key": key}))
            err.print("the api_key is shown only once: store it now (send it as the x-api-key header)")

    asyncio.run(run())


@keys_app.command("list")
def list_keys(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None) -> None:
    """List keys (never their secrets)."""
    from services.edge.keys import KeyAdmin

    async def run() -> None:
        async with KeyAdmin.connect(_edge_settings()) as admin:
            table = Table("key id", "tenant", "roles", "created", "revoked")
            for record in await admin.list(tenant):
                table.add_row(
                    record.key_id,
                    record.tenant,
                    ",".join(record.roles),
                    record.created_at.isoformat(timespec="seconds"),
                    record.revoked_at.isoformat(timespec="seconds") if record.revoked_at else "",
                )
            out.print(table)

    asyncio.run(run())


@keys_app.command("revoke")
def revoke_key(key_id: str) -> None:
    """Revoke a key at once (PostgreSQL and the Redis cache)."""
    from services.edge.keys import KeyAdmin

    async def run() -> bool:
        async with KeyAdmin.connect(_edge_settings()) as admin:
            return await admin.revoke(key_id)

    if not asyncio.run(run()):
        err.print(f"[red]error: NOT_FOUND: no key {key_id!r}[/]")
        raise typer.Exit(1)
    out.print(f"revoked {key_id}")
