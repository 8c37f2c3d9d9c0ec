"""Seeds the local registry with the demo backend and models, so a fresh `servegrid up` serves at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from servegrid.registry.v1 import registry_pb2 as pb
from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc

from services.mesh.names import SUBJECT_HEADER
from services.runtime.channels import open_sync_channel
from services.runtime.tls import CertFiles

# (model id, Triton model name, task, description)
DEMO_MODELS = [
    (
        "digits",
        "digits",
        "image-classification",
        "8x8 handwritten digits (scikit-learn), returns label + probabilities",
    ),
    ("resnet18", "resnet18", "image-classification", "ResNet18 architecture, seeded random weights (for load)"),
    ("affine", "affine_batched", "arithmetic", "y = 2x + 1 on FP32[4], dynamic batching; for protocol and load tests"),
]
_SUBJECT = [(SUBJECT_HEADER, "servegrid-up")]


@contextmanager
def _exists_ok() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def seed(
    registry_address: str, triton_address: str, triton_http_address: str = "", tls: CertFiles | None = None
) -> list[str]:
    """Create what is missing (idempotent); returns the model ids that are served. `tls`: the operator's
    certificate, when the registry speaks mutual TLS."""
    with open_sync_channel(registry_address, tls=tls, peer="registry") as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        backend = pb.Backend(
            backend_id="triton-local",
            address=triton_address,
            http_address=triton_http_address,
            labels={"stack": "local"},
            weight=1,
        )
        with _exists_ok():
            stub.CreateBackend(pb.CreateBackendRequest(backend=backend), metadata=_SUBJECT)
        for model_id, triton_name, task, description in DEMO_MODELS:
            model = pb.Model(model_id=model_id, task=task, description=description)
            with _exists_ok():
                stub.CreateModel(pb.CreateModelRequest(model=model), metadata=_SUBJECT)
            versions = stub.ListModelVersions(pb.ListModelVersionsRequest(model_id=model_id)).versions
            if not versions:
                created = stub.CreateModelVersion(
                    pb.CreateModelVersionRequest(
                        model_id=model_id,
                        version=pb.ModelVersion(triton_model_name=triton_name, description="seeded by servegrid up"),
                    ),
                    metadata=_SUBJECT,
                ).version
                versions = [created]
            if not any(v.stage == pb.STAGE_PRODUCTION for v in versions):
                first = versions[-1]
                for stage in (pb.STAGE_STAGING, pb.STAGE_PRODUCTION):
                    stub.TransitionModelVersionStage(
                        pb.TransitionModelVersionStageRequest(model_id=model_id, version=first.version, stage=stage),
                        metadata=_SUBJECT,
                    )
        return [m[0] for m in DEMO_MODELS]
