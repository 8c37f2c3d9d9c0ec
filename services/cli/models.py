"""`servegrid models …`: the registry admin API from the command line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from google.protobuf import field_mask_pb2
from rich.console import Console
from rich.table import Table
from servegrid.registry.v1 import registry_pb2 as pb
from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc

from services.cli.errors import exit_on_rpc_error
from services.mesh.names import SUBJECT_HEADER
from services.runtime.channels import open_sync_channel
from services.stack.local import StackSettings, operator_tls

app = typer.Typer(no_args_is_help=True, help="Models, versions, stages and traffic (registry admin).")
out = Console()

RegistryOpt = Annotated[
    str, typer.Option("--registry", envvar="SERVEGRID_REGISTRY_ADDRESS", help="Registry gRPC address.")
]
# `--stage` takes "production" or the API's own name, "STAGE_PRODUCTION" (any case); output always
# prints the API's name, as the gateway, the registry and the SDKs spell it.
STAGES = {s.removeprefix("STAGE_").lower(): v for s, v in pb.Stage.items() if v}


def stage_value(name: str) -> pb.Stage.ValueType | None:
    """The stage `name` means ("production", "STAGE_PRODUCTION", any case); None when it names none."""
    return STAGES.get(name.lower().removeprefix("stage_"))


@contextmanager
def _registry(address: str) -> Iterator[pb_grpc.RegistryServiceStub]:
    # The local stack's operator certificate when it has one (its registry speaks mutual TLS).
    tls = operator_tls(StackSettings())
    with open_sync_channel(address, tls=tls, peer="registry") as channel, exit_on_rpc_error():
        yield pb_grpc.RegistryServiceStub(channel)


def _md() -> list[tuple[str, str]]:
    # Recorded as `updated_by`; behind Envoy this header comes from the verified token instead.
    return [(SUBJECT_HEADER, os.environ.get("USER", "cli"))]


@app.command("list")
def list_models(registry: RegistryOpt = "127.0.0.1:50053") -> None:
    """List models."""
    with _registry(registry) as stub:
        table = Table("model", "task", "description", "updated")
        token = ""
        while True:
            reply = stub.ListModels(pb.ListModelsRequest(page_size=100, page_token=token), timeout=10)
            for m in reply.models:
                table.add_row(m.model_id, m.task, m.description, m.update_time.ToJsonString())
            token = reply.next_page_token
            if not token:
                break
        out.print(table)


def describe_policy(policy: pb.TrafficPolicy) -> str:
    """The traffic policy as a person reads it (the JSON is `GetTrafficPolicy` over REST)."""
    split = ", ".join(f"v{s.version} {s.weight}%" for s in policy.splits) or "100% to the PRODUCTION version"
    lines = [f"traffic: {split}"]
    if policy.HasField("shadow") and policy.shadow.version:
        lines.append(f"shadow: v{policy.shadow.version}, {policy.shadow.sample_rate:.0%} of requests mirrored")
    if policy.sticky_header:
        lines.append(f"sticky on header: {policy.sticky_header}")
    balancing = pb.LoadBalancing.Name(policy.load_balancing).removeprefix("LOAD_BALANCING_")
    lines.append(f"backends: {balancing.lower().replace('_', ' ') if policy.load_balancing else 'default'}")
    if policy.HasField("update_time"):
        lines.append(f"updated {policy.update_time.ToJsonString()} by {policy.updated_by or '?'} (etag {policy.etag})")
    return "\n".join(lines)


@app.command()
def get(model_id: str, registry: RegistryOpt = "127.0.0.1:50053") -> None:
    """Show a model, its versions and its traffic policy."""
    with _registry(registry) as stub:
        model = stub.GetModel(pb.GetModelRequest(model_id=model_id), timeout=10).model
        versions = stub.ListModelVersions(pb.ListModelVersionsRequest(model_id=model_id, page_size=100), timeout=10)
        policy = stub.GetTrafficPolicy(pb.GetTrafficPolicyRequest(model_id=model_id), timeout=10).policy
        out.print(f"[bold]{model.model_id}[/] — {model.description or '(no description)'}  task={model.task or '-'}")
        table = Table("version", "stage", "triton model", "artifact")
        for v in versions.versions:
            triton = f"{v.triton_model_name}:{v.triton_model_version or 'latest'}"
            table.add_row(str(v.version), pb.Stage.Name(v.stage), triton, v.artifact_uri)
        out.print(table)
        out.print(describe_policy(policy), markup=False, soft_wrap=True)


@app.command()
def create(
    model_id: str,
    triton_model: Annotated[str, typer.Option(help="Name in the Triton model repository (default: the id).")] = "",
    description: str = "",
    task: str = "",
    registry: RegistryOpt = "127.0.0.1:50053",
) -> None:
    """Create a model and register its first version (DRAFT)."""
    with _registry(registry) as stub:
        stub.CreateModel(
            pb.CreateModelRequest(model=pb.Model(model_id=model_id, description=description, task=task)),
            timeout=10,
            metadata=_md(),
        )
        version = stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                model_id=model_id, version=pb.ModelVersion(triton_model_name=triton_model or model_id)
            ),
            timeout=10,
            metadata=_md(),
        ).version
        out.print(f"created {model_id} with version {version.version} ({pb.Stage.Name(version.stage)})")


@app.command("add-version")
def add_version(
    model_id: str,
    triton_model: Annotated[str, typer.Option(help="Name in the Triton model repository.")],
    triton_version: Annotated[int, typer.Option(help="Version in the Triton repository; 0 for its latest.")] = 0,
    artifact_uri: str = "",
    description: str = "",
    registry: RegistryOpt = "127.0.0.1:50053",
) -> None:
    """Register a new version of a model (DRAFT); the registry numbers it."""
    with _registry(registry) as stub:
        version = stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                model_id=model_id,
                version=pb.ModelVersion(
                    triton_model_name=triton_model,
                    triton_model_version=triton_version,
                    artifact_uri=artifact_uri,
                    description=description,
                ),
            ),
            timeout=10,
            metadata=_md(),
        ).version
        Console(stderr=True).print(f"{model_id} v{version.version} registered ({pb.Stage.Name(version.stage)})")
        print(version.version)


@app.command()
def promote(
    model_id: str,
    version: int,
    stage: Annotated[
        str, typer.Option(help=f"Target stage: {', '.join(STAGES)} (or the API's name, e.g. STAGE_PRODUCTION).")
    ] = "production",
    load: Annotated[bool, typer.Option(help="Load the version on the backends first.")] = False,
    registry: RegistryOpt = "127.0.0.1:50053",
) -> None:
    """Move a version to another stage."""
    target = stage_value(stage)
    if target is None:
        raise typer.BadParameter(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    with _registry(registry) as stub:
        reply = stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(
                model_id=model_id, version=version, stage=target, load_on_backends=load
            ),
            timeout=60,
            metadata=_md(),
        )
        out.print(f"{model_id} v{version} → {pb.Stage.Name(reply.version.stage)}")
        for other in reply.also_changed:
            out.print(f"  also: v{other.version} → {pb.Stage.Name(other.stage)}")


@app.command()
def traffic(
    model_id: str,
    split: Annotated[list[str], typer.Option(help="VERSION=PERCENT, repeat for each version (e.g. 1=90 2=10).")],
    shadow: Annotated[str, typer.Option(help="VERSION=SAMPLE_RATE for shadow traffic, e.g. 3=0.1.")] = "",
    sticky_header: str = "",
    registry: RegistryOpt = "127.0.0.1:50053",
) -> None:
    """Set a model's traffic split (canary) and optional shadow."""
    try:
        splits = [pb.TrafficSplit(version=int(v), weight=int(w)) for v, w in (s.split("=", 1) for s in split)]
        policy = pb.TrafficPolicy(model_id=model_id, splits=splits, sticky_header=sticky_header)
        if shadow:
            v, rate = shadow.split("=", 1)
            policy.shadow.CopyFrom(pb.ShadowPolicy(version=int(v), sample_rate=float(rate)))
    except ValueError as err:
        raise typer.BadParameter(f"expected VERSION=NUMBER: {err}") from None
    with _registry(registry) as stub:
        stored = stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(policy=policy), timeout=10, metadata=_md()).policy
        out.print(", ".join(f"v{s.version}: {s.weight}%" for s in stored.splits) or "100% to PRODUCTION")


@app.command()
def describe(model_id: str, description: str, registry: RegistryOpt = "127.0.0.1:50053") -> None:
    """Change a model's description."""
    with _registry(registry) as stub:
        stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(model_id=model_id, description=description),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            timeout=10,
            metadata=_md(),
        )
        out.print(f"{model_id}: description updated")
