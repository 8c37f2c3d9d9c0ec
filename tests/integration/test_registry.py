"""The registry against real PostgreSQL and Redis (and Triton for promotions), through gRPC on port 0."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import psycopg
import pytest
from google.protobuf import field_mask_pb2, json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from psycopg import sql
from servegrid.registry.v1 import registry_pb2 as pb
from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc
from tritonclient.grpc.aio import InferenceServerClient

from services.registry.server import build_app
from services.registry.settings import RegistrySettings
from services.registry.store import MIGRATIONS_DIR, RegistryStore, notify_channel
from services.runtime.errors import DOMAIN, status_details
from services.runtime.migrations import load_migrations
from services.runtime.server import ServiceApp
from services.stack.ports import free_port
from services.stack.triton import TritonInstance
from tests.support.datastores import SessionDatastores
from tests.support.polling import wait_until

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:10]
SCHEMA = f"test_registry_{RUN}"
PREFIX = f"test:registry:{RUN}:"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SUBJECT = [("x-servegrid-subject", "alice@example.com")]


def registry_settings(datastores: SessionDatastores) -> RegistrySettings:
    return RegistrySettings(
        port=0,
        metrics_port=None,
        use_uvloop=False,
        database_url=datastores.database_url,
        redis_url=datastores.redis_url,
        db_schema=SCHEMA,
        redis_prefix=PREFIX,
        grace_period_s=0.5,
        health_interval_s=0.5,
        db_pool_max=4,
        listen_reconnect_s=0.2,
    )


@pytest.fixture(scope="module")
def clean_up(datastores: SessionDatastores) -> Iterator[RegistrySettings]:
    """Drops this module's schema and Redis keys at the end; touches nothing else."""
    yield registry_settings(datastores)
    datastores.drop_schema(SCHEMA)
    datastores.delete_keys(PREFIX)


async def started(settings: RegistrySettings) -> ServiceApp:
    app = build_app(settings)
    await app.start()
    return app


@pytest.fixture(scope="module")
async def app_a(clean_up: RegistrySettings) -> AsyncIterator[ServiceApp]:
    app = await started(clean_up)
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def app_b(app_a: ServiceApp, clean_up: RegistrySettings) -> AsyncIterator[ServiceApp]:
    app = await started(clean_up)  # same schema: a second replica
    yield app
    await app.stop()


@pytest.fixture
async def stub(app_a: ServiceApp) -> AsyncIterator[pb_grpc.RegistryServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app_a.port}") as channel:
        yield pb_grpc.RegistryServiceStub(channel)


@pytest.fixture
async def stub_b(app_b: ServiceApp) -> AsyncIterator[pb_grpc.RegistryServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app_b.port}") as channel:
        yield pb_grpc.RegistryServiceStub(channel)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def expect_error(call: object, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    err = caught.value
    assert err.code() == code, err.details()
    status, info = status_details(err.trailing_metadata())
    assert status is not None and info is not None
    assert (info.reason, info.domain) == (reason, DOMAIN), err.details()
    return err


async def new_model(stub: pb_grpc.RegistryServiceStub, name: str, *versions: str) -> str:
    model_id = unique(name)
    await stub.CreateModel(pb.CreateModelRequest(model=pb.Model(model_id=model_id, task="tabular")))
    for triton_name in versions:
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model_id=model_id, version=pb.ModelVersion(triton_model_name=triton_name))
        )
    return model_id


async def move(
    stub: pb_grpc.RegistryServiceStub, model_id: str, version: int, *stages: pb.Stage.ValueType, load: bool = False
) -> pb.TransitionModelVersionStageResponse:
    reply = pb.TransitionModelVersionStageResponse()
    for stage in stages:
        reply = await stub.TransitionModelVersionStage(
            pb.TransitionModelVersionStageRequest(
                model_id=model_id, version=version, stage=stage, load_on_backends=load
            ),
            metadata=SUBJECT,
        )
    return reply


async def test_full_lifecycle_create_promote_canary_archive(stub: pb_grpc.RegistryServiceStub) -> None:
    backend_id = unique("cpu")
    await stub.CreateBackend(
        pb.CreateBackendRequest(backend=pb.Backend(backend_id=backend_id, address="10.9.9.9:8001"))
    )
    created = await stub.CreateModel(
        pb.CreateModelRequest(model=pb.Model(model_id=unique("digits"), task="classification", labels={"team": "ml"})),
        metadata=SUBJECT,
    )
    model = created.model
    model_id = model.model_id
    assert (model.name, model.updated_by, model.labels["team"]) == (f"models/{model_id}", "alice@example.com", "ml")
    assert model.etag and model.create_time.seconds > 0
    assert (await stub.GetModel(pb.GetModelRequest(model_id=model_id))).model == model

    for _ in range(2):
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                model_id=model_id, version=pb.ModelVersion(triton_model_name="digits", artifact_uri="s3://m/d.onnx")
            )
        )
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model_id=model_id))
    assert [(v.version, v.stage) for v in listed.versions] == [(2, pb.STAGE_DRAFT), (1, pb.STAGE_DRAFT)]
    assert listed.versions[0].name == f"models/{model_id}/versions/2"

    first = await move(stub, model_id, 1, pb.STAGE_STAGING, pb.STAGE_PRODUCTION)
    assert first.version.stage == pb.STAGE_PRODUCTION and first.version.updated_by == "alice@example.com"
    await move(stub, model_id, 2, pb.STAGE_STAGING)

    route = (await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route
    assert [(v.version, v.weight) for v in route.versions] == [(2, 0), (1, 100)]
    assert backend_id in [b.backend_id for b in route.versions[0].backends]

    policy = pb.TrafficPolicy(
        model_id=model_id,
        splits=[pb.TrafficSplit(version=1, weight=90), pb.TrafficSplit(version=2, weight=10)],
        shadow=pb.ShadowPolicy(version=2, sample_rate=0.5),
        sticky_header="x-user-id",
        load_balancing=pb.LOAD_BALANCING_ROUND_ROBIN,
    )
    stored = (await stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(policy=policy), metadata=SUBJECT)).policy
    assert stored.etag and stored.updated_by == "alice@example.com"
    assert (await stub.GetTrafficPolicy(pb.GetTrafficPolicyRequest(model_id=model_id))).policy == stored
    resolved = await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))
    assert [(v.version, v.weight) for v in resolved.route.versions] == [(2, 10), (1, 90)]
    assert resolved.route.shadow.target.version == 2 and resolved.route.sticky_header == "x-user-id"
    assert resolved.route.load_balancing == pb.LOAD_BALANCING_ROUND_ROBIN and resolved.revision > 0
    only_two = await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id, version=2))
    assert [v.version for v in only_two.route.versions] == [2]

    # Promoting the canary while the policy splits traffic keeps version 1 in PRODUCTION.
    promoted = await move(stub, model_id, 2, pb.STAGE_PRODUCTION)
    assert promoted.version.stage == pb.STAGE_PRODUCTION and not promoted.also_changed
    # Version 1 takes traffic, so it cannot be archived until the policy lets go of it.
    await expect_error(
        move(stub, model_id, 1, pb.STAGE_ARCHIVED), grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STAGE_TRANSITION"
    )
    await stub.SetTrafficPolicy(
        pb.SetTrafficPolicyRequest(policy=pb.TrafficPolicy(model_id=model_id, etag=stored.etag))
    )
    archived = await move(stub, model_id, 1, pb.STAGE_ARCHIVED)
    assert archived.version.stage == pb.STAGE_ARCHIVED
    route = (await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route
    assert [(v.version, v.stage, v.weight) for v in route.versions] == [(2, pb.STAGE_PRODUCTION, 100)]
    assert not route.HasField("shadow")

    # A third version promoted without a split archives the one it replaces.
    await stub.CreateModelVersion(
        pb.CreateModelVersionRequest(model_id=model_id, version=pb.ModelVersion(triton_model_name="digits"))
    )
    third = await move(stub, model_id, 3, pb.STAGE_STAGING, pb.STAGE_PRODUCTION)
    assert [(v.version, v.stage) for v in third.also_changed] == [(2, pb.STAGE_ARCHIVED)]
    production = await stub.ListModelVersions(pb.ListModelVersionsRequest(model_id=model_id, stage=pb.STAGE_PRODUCTION))
    assert [v.version for v in production.versions] == [3]

    # Deleting a model that serves in PRODUCTION needs force; then everything of it is gone.
    await expect_error(
        stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_IN_PRODUCTION",
    )
    await stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id, force=True))
    await expect_error(
        stub.GetModel(pb.GetModelRequest(model_id=model_id)), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )
    await expect_error(
        stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id)), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )
    await stub.DeleteBackend(pb.DeleteBackendRequest(backend_id=backend_id))


async def test_backend_http_address_reaches_routes_and_follows_the_update_mask(
    stub: pb_grpc.RegistryServiceStub,
) -> None:
    backend_id = unique("rest")
    created = await stub.CreateBackend(
        pb.CreateBackendRequest(
            backend=pb.Backend(backend_id=backend_id, address="10.9.9.8:8001", http_address="10.9.9.8:8000")
        )
    )
    assert created.backend.http_address == "10.9.9.8:8000"
    model_id = await new_model(stub, "rest", "affine")
    await move(stub, model_id, 1, pb.STAGE_STAGING, pb.STAGE_PRODUCTION)

    def http_of(route: pb.Route) -> str:
        return next(b.http_address for b in route.versions[0].backends if b.backend_id == backend_id)

    assert http_of((await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route) == "10.9.9.8:8000"
    moved = await stub.UpdateBackend(
        pb.UpdateBackendRequest(
            backend=pb.Backend(backend_id=backend_id, address="ignored:1", http_address="10.9.9.8:9000"),
            update_mask=field_mask_pb2.FieldMask(paths=["http_address"]),
        )
    )
    assert (moved.backend.address, moved.backend.http_address) == ("10.9.9.8:8001", "10.9.9.8:9000")
    assert http_of((await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route) == "10.9.9.8:9000"
    await expect_error(
        stub.UpdateBackend(
            pb.UpdateBackendRequest(
                backend=pb.Backend(backend_id=backend_id, http_address="no-port"),
                update_mask=field_mask_pb2.FieldMask(paths=["http_address"]),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    cleared = await stub.UpdateBackend(
        pb.UpdateBackendRequest(
            backend=pb.Backend(backend_id=backend_id), update_mask=field_mask_pb2.FieldMask(paths=["http_address"])
        )
    )
    assert cleared.backend.http_address == ""  # gRPC only
    await stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id, force=True))
    await stub.DeleteBackend(pb.DeleteBackendRequest(backend_id=backend_id))


async def test_a_drained_backend_is_drained_in_every_route_and_watch_and_only_the_mask_drains(
    stub: pb_grpc.RegistryServiceStub, stub_b: pb_grpc.RegistryServiceStub
) -> None:
    backend_id = unique("drain")
    await stub.CreateBackend(
        pb.CreateBackendRequest(backend=pb.Backend(backend_id=backend_id, address="10.9.9.7:8001"))
    )
    model_id = await new_model(stub, "drain", "affine")
    await move(stub, model_id, 1, pb.STAGE_STAGING, pb.STAGE_PRODUCTION)
    watch = stub_b.WatchRoutes(pb.WatchRoutesRequest(watcher="drain-test"))
    first = await watch.read()
    assert isinstance(first, pb.WatchRoutesResponse) and first.reset

    def drained_in(route: pb.Route) -> bool:
        return next(b.drained for b in route.versions[0].backends if b.backend_id == backend_id)

    # Only the `drained` path changes it: a Backend written with drained=true under another mask does not.
    untouched = await stub.UpdateBackend(
        pb.UpdateBackendRequest(
            backend=pb.Backend(backend_id=backend_id, address="10.9.9.7:8002", drained=True),
            update_mask=field_mask_pb2.FieldMask(paths=["address"]),
        )
    )
    assert not untouched.backend.drained
    drained = await stub.UpdateBackend(
        pb.UpdateBackendRequest(
            backend=pb.Backend(backend_id=backend_id, drained=True),
            update_mask=field_mask_pb2.FieldMask(paths=["drained"]),
        )
    )
    assert drained.backend.drained and drained.backend.address == "10.9.9.7:8002"
    assert (await stub.GetBackend(pb.GetBackendRequest(backend_id=backend_id))).backend.drained
    assert drained_in((await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route)
    assert drained_in((await stub_b.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route)

    async def watched_drained(wanted: bool) -> None:
        while True:  # the other replica's watch carries the change (and the address change before it)
            change = await asyncio.wait_for(watch.read(), 5)
            assert isinstance(change, pb.WatchRoutesResponse)
            mine = [r for r in change.routes if r.model_id == model_id]
            if mine and drained_in(mine[0]) == wanted:
                return

    await watched_drained(True)
    await stub.UpdateBackend(
        pb.UpdateBackendRequest(
            backend=pb.Backend(backend_id=backend_id), update_mask=field_mask_pb2.FieldMask(paths=["drained"])
        )
    )
    await watched_drained(False)
    watch.cancel()
    await stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id, force=True))
    await stub.DeleteBackend(pb.DeleteBackendRequest(backend_id=backend_id))


async def test_envoy_style_json_round_trips(stub: pb_grpc.RegistryServiceStub) -> None:
    model_id = unique("json")
    # What Envoy's transcoder hands over for POST /v1/admin/models: lowerCamelCase, enums by name.
    body = f'{{"modelId": "{model_id}", "description": "from REST", "labels": {{"tier": "gold"}}}}'
    request = pb.CreateModelRequest(model=json_format.Parse(body, pb.Model()))
    model = (await stub.CreateModel(request)).model
    assert model.description == "from REST" and model.labels["tier"] == "gold"
    version = (
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(
                model_id=model_id,
                version=json_format.Parse(
                    '{"tritonModelName": "affine", "tritonModelVersion": "3"}', pb.ModelVersion()
                ),
            )
        )
    ).version
    as_json = json_format.MessageToDict(version)
    assert as_json["stage"] == "STAGE_DRAFT" and as_json["version"] == "1" and as_json["tritonModelVersion"] == "3"
    assert as_json["name"] == f"models/{model_id}/versions/1" and as_json["createTime"].endswith("Z")
    for message in (model, version):
        text = json_format.MessageToJson(message)
        assert json_format.Parse(text, type(message)()) == message
    policy_json = '{"modelId": "%s", "splits": [], "loadBalancing": "LOAD_BALANCING_P2C", "stickyHeader": "x-a"}'
    policy = json_format.Parse(policy_json % model_id, pb.TrafficPolicy())
    stored = (await stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(policy=policy))).policy
    assert json_format.MessageToDict(stored)["loadBalancing"] == "LOAD_BALANCING_P2C"
    assert json_format.Parse(json_format.MessageToJson(stored), pb.TrafficPolicy()) == stored


async def test_bad_input_errors_carry_reasons(stub: pb_grpc.RegistryServiceStub) -> None:
    model_id = await new_model(stub, "bad", "affine", "affine")
    await expect_error(
        stub.CreateModel(pb.CreateModelRequest(model=pb.Model(model_id=model_id))),
        grpc.StatusCode.ALREADY_EXISTS,
        "MODEL_ALREADY_EXISTS",
    )
    await expect_error(
        stub.GetModel(pb.GetModelRequest(model_id="no-such-model")), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )
    await expect_error(
        stub.GetModelVersion(pb.GetModelVersionRequest(model_id=model_id, version=9)),
        grpc.StatusCode.NOT_FOUND,
        "VERSION_NOT_FOUND",
    )
    await expect_error(
        move(stub, model_id, 1, pb.STAGE_PRODUCTION), grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STAGE_TRANSITION"
    )
    await move(stub, model_id, 1, pb.STAGE_STAGING)
    await move(stub, model_id, 2, pb.STAGE_STAGING)
    splits = [pb.TrafficSplit(version=1, weight=80), pb.TrafficSplit(version=2, weight=10)]
    err = await expect_error(
        stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(policy=pb.TrafficPolicy(model_id=model_id, splits=splits))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_TRAFFIC_POLICY",
    )
    assert "90" in (err.details() or "")
    assert (await stub.GetTrafficPolicy(pb.GetTrafficPolicyRequest(model_id=model_id))).policy.splits == []

    bad_id = await expect_error(
        stub.CreateModel(pb.CreateModelRequest(model=pb.Model(model_id="Bad Id"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    status, _ = status_details(bad_id.trailing_metadata())
    assert status is not None and any(b"model.model_id" in d.value for d in status.details)
    await expect_error(
        stub.ListModels(pb.ListModelsRequest(page_size=-1)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    await expect_error(
        stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(model_id=model_id), update_mask=field_mask_pb2.FieldMask(paths=["model_id"])
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )

    # SQL-looking text is data, nothing more.
    evil = "'); DROP TABLE models;--"
    first = (await stub.GetModel(pb.GetModelRequest(model_id=model_id))).model
    updated = (
        await stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(model_id=model_id, description=evil, labels={"k'": evil}, etag=first.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["description", "labels"]),
            )
        )
    ).model
    assert updated.description == evil and updated.labels["k'"] == evil and updated.etag != first.etag
    assert (await stub.GetModel(pb.GetModelRequest(model_id=model_id))).model.description == evil
    assert (await stub.ListModels(pb.ListModelsRequest(page_size=1000))).models

    # The first etag is stale now.
    await expect_error(
        stub.UpdateModel(
            pb.UpdateModelRequest(
                model=pb.Model(model_id=model_id, description="lost update", etag=first.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            )
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    assert (await stub.GetModel(pb.GetModelRequest(model_id=model_id))).model.description == evil
    await expect_error(
        stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id, etag=first.etag)),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    await expect_error(
        stub.CreateBackend(pb.CreateBackendRequest(backend=pb.Backend(backend_id="b1", address="no-port"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_pagination_is_complete_and_tokens_are_checked(stub: pb_grpc.RegistryServiceStub) -> None:
    model_id = await new_model(stub, "paged", *["affine"] * 5)
    seen: list[int] = []
    token = ""
    while True:
        page = await stub.ListModelVersions(
            pb.ListModelVersionsRequest(model_id=model_id, page_size=2, page_token=token)
        )
        assert len(page.versions) <= 2
        seen += [v.version for v in page.versions]
        token = page.next_page_token
        if not token:
            break
    assert seen == [5, 4, 3, 2, 1]
    first = await stub.ListModelVersions(pb.ListModelVersionsRequest(model_id=model_id, page_size=2))
    await expect_error(
        stub.ListModelVersions(
            pb.ListModelVersionsRequest(model_id=model_id, page_token=first.next_page_token, stage=pb.STAGE_DRAFT)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    await expect_error(
        stub.ListModels(pb.ListModelsRequest(page_token="garbage")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    ids: list[str] = []
    token = ""
    while True:
        models = await stub.ListModels(pb.ListModelsRequest(page_size=3, page_token=token))
        ids += [m.model_id for m in models.models]
        token = models.next_page_token
        if not token:
            break
    assert ids == sorted(ids) and model_id in ids and len(ids) == len(set(ids))


async def next_update(
    call: grpc.aio.UnaryStreamCall,
    predicate: Callable[[pb.WatchRoutesResponse], bool],
    timeout_s: float = 10.0,
) -> pb.WatchRoutesResponse:
    async def read() -> pb.WatchRoutesResponse:
        while True:
            update = await call.read()
            assert isinstance(update, pb.WatchRoutesResponse), "the stream ended"
            if predicate(update):
                return update

    return await asyncio.wait_for(read(), timeout_s)


async def test_write_on_one_replica_reaches_watch_on_the_other_within_a_second(
    stub: pb_grpc.RegistryServiceStub, stub_b: pb_grpc.RegistryServiceStub
) -> None:
    model_id = await new_model(stub, "watched", "affine")
    await move(stub, model_id, 1, pb.STAGE_STAGING, pb.STAGE_PRODUCTION)
    call = stub_b.WatchRoutes(pb.WatchRoutesRequest(watcher="test-router"))
    try:
        reset = await next_update(call, lambda u: True)
        assert reset.reset and reset.revision > 0
        route = next(r for r in reset.routes if r.model_id == model_id)
        assert [(v.version, v.weight) for v in route.versions] == [(1, 100)]

        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model_id=model_id, version=pb.ModelVersion(triton_model_name="affine"))
        )
        started = time.perf_counter()  # the write that changes the route, through replica A
        await move(stub, model_id, 2, pb.STAGE_STAGING)
        update = await next_update(
            call, lambda u: any(r.model_id == model_id and len(r.versions) == 2 for r in u.routes)
        )
        elapsed = time.perf_counter() - started
        assert not update.reset and update.revision > reset.revision
        assert elapsed < 1.0, f"change took {elapsed:.3f}s to reach the other replica"

        # ResolveRoute on B (cached there) sees A's write at once: invalidation after commit.
        await stub_b.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))
        await stub.SetTrafficPolicy(
            pb.SetTrafficPolicyRequest(
                policy=pb.TrafficPolicy(
                    model_id=model_id,
                    splits=[pb.TrafficSplit(version=1, weight=90), pb.TrafficSplit(version=2, weight=10)],
                )
            )
        )
        route = (await stub_b.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route
        assert [(v.version, v.weight) for v in route.versions] == [(2, 10), (1, 90)]

        # A new backend changes every route; a deleted model is announced as removed.
        backend_id = unique("late")
        await stub.CreateBackend(pb.CreateBackendRequest(backend=pb.Backend(backend_id=backend_id, address="h:1")))
        update = await next_update(
            call,
            lambda u: any(
                r.model_id == model_id and backend_id in [b.backend_id for b in r.versions[0].backends]
                for r in u.routes
            ),
        )
        route = (await stub_b.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route
        assert backend_id in [b.backend_id for b in route.versions[0].backends]
        await stub.DeleteBackend(pb.DeleteBackendRequest(backend_id=backend_id))
        await stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id, force=True))
        update = await next_update(call, lambda u: model_id in u.removed_model_ids)
        assert update.revision > reset.revision
    finally:
        call.cancel()


async def test_reads_survive_a_dead_redis_and_health_says_so(
    stub: pb_grpc.RegistryServiceStub, clean_up: RegistrySettings
) -> None:
    model_id = await new_model(stub, "nocache", "affine")
    assert not (await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route.versions  # now cached
    dead = await started(clean_up.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{dead.port}") as channel:
            registry = pb_grpc.RegistryServiceStub(channel)
            for _ in range(3):
                model = (await registry.GetModel(pb.GetModelRequest(model_id=model_id))).model
                assert model.model_id == model_id
            await move(registry, model_id, 1, pb.STAGE_STAGING)
            route = (await registry.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route
            assert [v.version for v in route.versions] == [1]
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest(service="cache"))).status == NOT_SERVING
            assert (await health.Check(health_pb2.HealthCheckRequest(service="database"))).status == SERVING
            assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == SERVING
    finally:
        await dead.stop()

    # The write made by a replica that could not reach Redis still invalidates the shared cache:
    # every replica's hub tombstones what each notified change touched.
    async def fresh() -> bool:
        route = (await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route
        return [v.stage for v in route.versions] == [pb.STAGE_STAGING]

    await wait_until(fresh, timeout_s=10, poll_s=0.05, detail="(the healthy replica kept serving a stale route)")


def cache_count(kind: str, result: str) -> float:
    return REGISTRY.get_sample_value("servegrid_registry_cache_requests_total", {"kind": kind, "result": result}) or 0.0


async def test_reads_are_served_from_the_cache_and_invalidated_on_write(stub: pb_grpc.RegistryServiceStub) -> None:
    model_id = await new_model(stub, "cached")
    await stub.GetModel(pb.GetModelRequest(model_id=model_id))
    hits = cache_count("model", "hit")
    for _ in range(3):
        await stub.GetModel(pb.GetModelRequest(model_id=model_id))
    assert cache_count("model", "hit") >= hits + 3
    await stub.UpdateModel(
        pb.UpdateModelRequest(
            model=pb.Model(model_id=model_id, task="changed"), update_mask=field_mask_pb2.FieldMask(paths=["task"])
        )
    )
    assert (await stub.GetModel(pb.GetModelRequest(model_id=model_id))).model.task == "changed"


async def test_promotion_loads_on_triton_and_a_refused_load_leaves_the_stage(
    stub: pb_grpc.RegistryServiceStub, triton: TritonInstance
) -> None:
    backend_id = unique("triton")
    await stub.CreateBackend(
        pb.CreateBackendRequest(backend=pb.Backend(backend_id=backend_id, address=triton.grpc_address))
    )
    client = InferenceServerClient(triton.grpc_address)
    try:
        # Promote with loading: the model is loaded (it was unloaded first to prove the load happened).
        model_id = await new_model(stub, "served", "affine_batched")
        await client.unload_model("affine_batched")
        assert not await client.is_model_ready("affine_batched")
        staged = await move(stub, model_id, 1, pb.STAGE_STAGING, load=True)
        assert staged.version.stage == pb.STAGE_STAGING
        assert await client.is_model_ready("affine_batched")
        await move(stub, model_id, 1, pb.STAGE_PRODUCTION, load=True)

        # A version naming a model Triton does not have: refused, the stage stays, the error names the backend.
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model_id=model_id, version=pb.ModelVersion(triton_model_name="no_such_model"))
        )
        await move(stub, model_id, 2, pb.STAGE_STAGING)
        err = await expect_error(
            move(stub, model_id, 2, pb.STAGE_PRODUCTION, load=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            "BACKEND_LOAD_FAILED",
        )
        assert backend_id in (err.details() or "")
        _, info = status_details(err.trailing_metadata())
        assert info is not None and info.metadata["backend_id"] == backend_id
        version = (await stub.GetModelVersion(pb.GetModelVersionRequest(model_id=model_id, version=2))).version
        assert version.stage == pb.STAGE_STAGING
        route = (await stub.ResolveRoute(pb.ResolveRouteRequest(model_id=model_id))).route
        assert [(v.version, v.stage, v.weight) for v in route.versions] == [
            (2, pb.STAGE_STAGING, 0),
            (1, pb.STAGE_PRODUCTION, 100),
        ]

        # An unreachable backend is UNAVAILABLE (retryable), and named too.
        dead_id = unique("dead")
        await stub.CreateBackend(
            pb.CreateBackendRequest(
                backend=pb.Backend(backend_id=dead_id, address=f"127.0.0.1:{free_port()}", triton_models=["lonely"])
            )
        )
        await stub.UpdateBackend(
            pb.UpdateBackendRequest(
                backend=pb.Backend(backend_id=backend_id, triton_models=["affine_batched", "no_such_model"]),
                update_mask=field_mask_pb2.FieldMask(paths=["triton_models"]),
            )
        )
        await stub.CreateModelVersion(
            pb.CreateModelVersionRequest(model_id=model_id, version=pb.ModelVersion(triton_model_name="lonely"))
        )
        err = await expect_error(
            move(stub, model_id, 3, pb.STAGE_STAGING, load=True), grpc.StatusCode.UNAVAILABLE, "BACKEND_LOAD_FAILED"
        )
        assert dead_id in (err.details() or "")
        await stub.DeleteBackend(pb.DeleteBackendRequest(backend_id=dead_id))

        # Archiving with load_on_backends unloads a Triton model nothing else serves.
        await move(stub, model_id, 2, pb.STAGE_ARCHIVED)
        await move(stub, model_id, 1, pb.STAGE_ARCHIVED, load=True)
        assert not await client.is_model_ready("affine_batched")
    finally:
        await client.load_model("affine_batched")  # the session's Triton is shared: leave it as found
        await client.close()
        await stub.DeleteBackend(pb.DeleteBackendRequest(backend_id=backend_id))


async def test_replicas_migrating_at_once_apply_each_migration_once(
    clean_up: RegistrySettings, datastores: SessionDatastores
) -> None:
    schema = f"{SCHEMA}_race"
    stores = [RegistryStore(clean_up.database_url, schema, max_size=1) for _ in range(3)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        async with await psycopg.AsyncConnection.connect(clean_up.database_url, autocommit=True) as conn:
            query = sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema))
            rows = await (await conn.execute(query)).fetchall()
        assert sorted(r[0] for r in rows) == [m.version for m in load_migrations(MIGRATIONS_DIR)]
        await stores[0].ping()
    finally:
        for store in stores:
            await store.close()
        datastores.drop_schema(schema)


async def test_watchers_get_the_whole_table_again_after_the_listen_connection_drops(
    stub: pb_grpc.RegistryServiceStub, stub_b: pb_grpc.RegistryServiceStub, clean_up: RegistrySettings
) -> None:
    call = stub_b.WatchRoutes(pb.WatchRoutesRequest(watcher="test-reconnect"))
    try:
        assert (await next_update(call, lambda u: True)).reset
        async with await psycopg.AsyncConnection.connect(clean_up.database_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                (f'LISTEN "{notify_channel(SCHEMA)}"',),
            )
            assert len(await cur.fetchall()) >= 1
        assert (await next_update(call, lambda u: u.reset)).reset
        model_id = await new_model(stub, "after-drop")
        await next_update(call, lambda u: any(r.model_id == model_id for r in u.routes))
    finally:
        call.cancel()
