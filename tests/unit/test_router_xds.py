"""The ADS server through a real grpc.aio server and in-process ADS clients: send, ACK, NACK, nonces, order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from prometheus_client import REGISTRY

from services.router.xds import (
    TYPE_CLUSTER,
    TYPE_ENDPOINT,
    TYPE_LISTENER,
    TYPE_ROUTE,
    AdsServer,
    NackInfo,
    XdsSnapshot,
    resource_version,
)


def snapshot(
    revision: int,
    tag: str = "",
    *,
    clusters: Iterable[str] = ("a", "b"),
    endpoint_tag: str | None = None,
    listeners: Iterable[str] = ("public",),
    routes: Iterable[str] = ("public", "mesh"),
) -> XdsSnapshot:
    """A snapshot whose content (and so version) changes with `tag`; endpoints have their own tag."""
    etag = tag if endpoint_tag is None else endpoint_tag
    zone = base_pb2.Locality(zone=etag or "z")
    resources: dict[str, dict[str, Message]] = {
        TYPE_CLUSTER: {n: cluster_pb2.Cluster(name=n, alt_stat_name=f"{n}{tag}") for n in clusters},
        TYPE_ENDPOINT: {
            n: endpoint_pb2.ClusterLoadAssignment(
                cluster_name=n, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(locality=zone)]
            )
            for n in clusters
        },
        TYPE_LISTENER: {n: listener_pb2.Listener(name=n, stat_prefix=f"{n}{tag}") for n in listeners},
        TYPE_ROUTE: {n: route_pb2.RouteConfiguration(name=n, internal_only_headers=[f"x-{tag}"]) for n in routes},
    }
    return XdsSnapshot.build(revision, resources)


def names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for item in response.resources:
        message = {
            TYPE_CLUSTER: cluster_pb2.Cluster,
            TYPE_ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
            TYPE_LISTENER: listener_pb2.Listener,
            TYPE_ROUTE: route_pb2.RouteConfiguration,
        }[response.type_url]()
        item.Unpack(message)
        out.append(getattr(message, "cluster_name", "") or getattr(message, "name", ""))
    return out


def rejections(type_name: str) -> float:
    return REGISTRY.get_sample_value("servegrid_router_xds_rejections_total", {"type": type_name}) or 0.0


class AdsClient:
    """One Envoy's side of an ADS stream, driven by hand."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        self.node = base_pb2.Node(id=node_id, cluster="edge")

    async def request(
        self,
        type_url: str,
        resource_names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            resource_names=list(resource_names),
            version_info=version,
            response_nonce=nonce,
        )
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(request)

    async def ack(self, response: discovery_pb2.DiscoveryResponse, resource_names: Iterable[str] = ()) -> None:
        await self.request(response.type_url, resource_names, version=response.version_info, nonce=response.nonce)

    async def nack(self, response: discovery_pb2.DiscoveryResponse, kept_version: str, error: str) -> None:
        await self.request(response.type_url, version=kept_version, nonce=response.nonce, error=error)

    async def next(self, timeout_s: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        message = await asyncio.wait_for(self.call.read(), timeout_s)
        assert isinstance(message, discovery_pb2.DiscoveryResponse), f"stream ended: {message}"
        return message

    async def subscribe_all(
        self, endpoint_names: Iterable[str], route_names: Iterable[str]
    ) -> dict[str, discovery_pb2.DiscoveryResponse]:
        """Subscribe to the four types as Envoy does (each after the previous arrived) and ACK each."""
        got = {}
        for type_url, wanted in (
            (TYPE_CLUSTER, ()),
            (TYPE_ENDPOINT, tuple(endpoint_names)),
            (TYPE_LISTENER, ()),
            (TYPE_ROUTE, tuple(route_names)),
        ):
            await self.request(type_url, wanted)
            got[type_url] = response = await self.next()
            assert response.type_url == type_url
            await self.ack(response, wanted)
        return got


@pytest.fixture
async def ads() -> AsyncIterator[tuple[AdsServer, grpc.aio.Channel]]:
    server = grpc.aio.server()
    ads_server = AdsServer()
    ads_server.register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ads_server, channel
    await channel.close()
    await ads_server.close()
    await server.stop(0)


async def test_initial_request_gets_the_current_snapshot_and_ack_shows_in_nodes(
    ads: tuple[AdsServer, grpc.aio.Channel],
) -> None:
    server, channel = ads
    snap = snapshot(1)
    server.set_snapshot(snap)
    client = AdsClient(channel, "envoy-1")
    await client.request(TYPE_CLUSTER)
    cds = await client.next()
    assert (cds.type_url, cds.version_info, names(cds)) == (TYPE_CLUSTER, snap.versions[TYPE_CLUSTER], ["a", "b"])
    assert cds.nonce and cds.control_plane.identifier == "servegrid-router"
    [node] = server.nodes()
    assert (node.node_id, node.node_cluster, node.acked) == ("envoy-1", "edge", {})

    await client.ack(cds)
    await server.wait_acked({"clusters": snap.versions[TYPE_CLUSTER]}, timeout_s=5)
    [node] = server.nodes()
    assert node.acked == {"clusters": snap.versions[TYPE_CLUSTER]}
    assert node.in_sync  # the only type it subscribes to is at the current version
    await client.request(TYPE_ENDPOINT, ["a"], version="", nonce="")
    assert names(await client.next()) == ["a"]
    assert not server.nodes()[0].in_sync  # endpoints sent, not ACKed yet
    await server.check()


async def test_no_snapshot_yet_answers_when_one_arrives(ads: tuple[AdsServer, grpc.aio.Channel]) -> None:
    server, channel = ads
    client = AdsClient(channel, "early")
    await client.request(TYPE_LISTENER)
    await server.wait_nodes(1, timeout_s=5)
    snap = snapshot(3)
    server.set_snapshot(snap)
    lds = await client.next()
    assert (lds.type_url, lds.version_info, names(lds)) == (TYPE_LISTENER, snap.versions[TYPE_LISTENER], ["public"])


async def test_nack_is_not_resent_and_check_fails_until_a_later_snapshot_is_acked(
    ads: tuple[AdsServer, grpc.aio.Channel],
) -> None:
    server, channel = ads
    nacked = asyncio.Event()
    seen: list[NackInfo] = []

    def on_nack(info: NackInfo) -> None:
        seen.append(info)
        nacked.set()

    server.on_nack = on_nack
    good, bad, fixed = snapshot(1), snapshot(2, "bad"), snapshot(3, "fixed")
    server.set_snapshot(good)
    client = AdsClient(channel, "envoy-nack")
    await client.request(TYPE_CLUSTER)
    await client.ack(await client.next())
    await server.wait_acked({TYPE_CLUSTER: good.versions[TYPE_CLUSTER]}, timeout_s=5)
    before = rejections("clusters")

    server.set_snapshot(bad)
    cds = await client.next()
    assert cds.version_info == bad.versions[TYPE_CLUSTER]
    await client.nack(cds, good.versions[TYPE_CLUSTER], "cluster b: invalid field combination")
    await asyncio.wait_for(nacked.wait(), 5)
    [info] = seen
    assert (info.node_id, info.type, info.version, info.kept_version) == (
        "envoy-nack",
        "clusters",
        bad.versions[TYPE_CLUSTER],
        good.versions[TYPE_CLUSTER],
    )
    assert server.last_rejection == info
    assert rejections("clusters") == before + 1
    with pytest.raises(RuntimeError, match="invalid field combination"):
        await server.check()
    [node] = server.nodes()
    assert node.acked["clusters"] == good.versions[TYPE_CLUSTER]  # Envoy keeps the last good one
    assert node.rejected == {"clusters": bad.versions[TYPE_CLUSTER]}

    # A fresh LDS subscription gets its answer next: no CDS resend of the NACKed version came first.
    await client.request(TYPE_LISTENER)
    lds = await client.next()
    assert lds.type_url == TYPE_LISTENER
    await client.ack(lds)

    server.set_snapshot(fixed)
    cds = await client.next()
    assert (cds.type_url, cds.version_info) == (TYPE_CLUSTER, fixed.versions[TYPE_CLUSTER])
    await client.ack(cds)
    await server.wait_acked({TYPE_CLUSTER: fixed.versions[TYPE_CLUSTER]}, timeout_s=5)
    await server.check()
    assert server.nodes()[0].rejected == {}
    assert rejections("clusters") == before + 1


async def test_stale_nonce_is_ignored(ads: tuple[AdsServer, grpc.aio.Channel]) -> None:
    server, channel = ads
    snap = snapshot(1, clusters=("a", "b", "c"))
    server.set_snapshot(snap)
    client = AdsClient(channel, "envoy-stale")
    await client.request(TYPE_ENDPOINT, ["a"])
    eds = await client.next()
    assert names(eds) == ["a"]
    # Replies to a response the server no longer considers current: neither new names nor a NACK count.
    await client.request(TYPE_ENDPOINT, ["a", "b"], version=eds.version_info, nonce="an-old-nonce")
    await client.request(TYPE_ENDPOINT, ["a"], nonce="an-old-nonce", error="late NACK of something older")
    await client.request(TYPE_LISTENER)
    assert (await client.next()).type_url == TYPE_LISTENER  # no EDS resend before the LDS answer
    await server.check()
    assert server.last_rejection is None
    assert server.nodes()[0].acked == {}

    await client.ack(eds, ["a", "b"])  # the current nonce with new names: resent at the same version
    again = await client.next()
    assert (again.type_url, again.version_info, names(again)) == (TYPE_ENDPOINT, eds.version_info, ["a", "b"])
    assert again.nonce != eds.nonce


async def test_eds_sends_only_the_requested_names(ads: tuple[AdsServer, grpc.aio.Channel]) -> None:
    server, channel = ads
    server.set_snapshot(snapshot(1, clusters=("a", "b", "c")))
    client = AdsClient(channel, "envoy-eds")
    await client.request(TYPE_ENDPOINT, ["c", "a", "missing"])
    eds = await client.next()
    assert names(eds) == ["a", "c"]  # a name the snapshot lacks is simply not sent
    await client.ack(eds, ["b"])
    assert names(await client.next()) == ["b"]
    await client.request(TYPE_ROUTE, ["mesh"])
    assert names(await client.next()) == ["mesh"]


async def test_a_change_is_sent_cds_then_eds_then_rds_skipping_unchanged_types(
    ads: tuple[AdsServer, grpc.aio.Channel],
) -> None:
    server, channel = ads
    first = snapshot(1)
    server.set_snapshot(first)
    client = AdsClient(channel, "envoy-order")
    await client.subscribe_all(["a", "b"], ["public"])
    await server.wait_acked(first.versions, timeout_s=5)

    # Listeners keep their content and version; everything else changes.
    changed = snapshot(2, "v2")
    second = XdsSnapshot(
        2,
        {**changed.resources, TYPE_LISTENER: first.resources[TYPE_LISTENER]},
        {**changed.versions, TYPE_LISTENER: first.versions[TYPE_LISTENER]},
    )
    server.set_snapshot(second)
    order = [(await client.next()).type_url for _ in range(3)]
    assert order == [TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_ROUTE]
    assert not server.nodes()[0].in_sync


async def test_a_cluster_change_resends_endpoints_even_at_the_same_version(
    ads: tuple[AdsServer, grpc.aio.Channel],
) -> None:
    server, channel = ads
    first = snapshot(1)
    server.set_snapshot(first)
    client = AdsClient(channel, "envoy-warm")
    await client.subscribe_all(["a"], ["public"])
    # Only the clusters change: the updated cluster "a" warms until an EDS response names it.
    changed = snapshot(1, "cds-only", endpoint_tag="")
    assert changed.versions[TYPE_ENDPOINT] == first.versions[TYPE_ENDPOINT]
    second = XdsSnapshot(
        1,
        {**first.resources, TYPE_CLUSTER: changed.resources[TYPE_CLUSTER]},
        {**first.versions, TYPE_CLUSTER: changed.versions[TYPE_CLUSTER]},
    )
    server.set_snapshot(second)
    cds, eds = await client.next(), await client.next()
    assert (cds.type_url, cds.version_info) == (TYPE_CLUSTER, changed.versions[TYPE_CLUSTER])
    assert (eds.type_url, eds.version_info, names(eds)) == (TYPE_ENDPOINT, first.versions[TYPE_ENDPOINT], ["a"])
    await client.ack(cds)
    await client.ack(eds, ["a"])
    await server.wait_acked(second.versions, timeout_s=5)


async def test_every_connected_client_gets_a_new_snapshot(ads: tuple[AdsServer, grpc.aio.Channel]) -> None:
    server, channel = ads
    server.set_snapshot(snapshot(1))
    clients = [AdsClient(channel, "envoy-a"), AdsClient(channel, "envoy-b")]
    for client in clients:
        await client.request(TYPE_CLUSTER)
        await client.ack(await client.next())
    await server.wait_acked({"clusters": snapshot(1).versions[TYPE_CLUSTER]}, timeout_s=5, min_nodes=2)

    newer = snapshot(2, "new", clusters=("a", "b", "c"))
    server.set_snapshot(newer)
    for client in clients:
        cds = await client.next()
        assert (cds.version_info, names(cds)) == (newer.versions[TYPE_CLUSTER], ["a", "b", "c"])
        await client.ack(cds)
    await server.wait_acked({"clusters": newer.versions[TYPE_CLUSTER]}, timeout_s=5, min_nodes=2)
    assert sorted(n.node_id for n in server.nodes()) == ["envoy-a", "envoy-b"]
    assert all(n.in_sync for n in server.nodes())


async def test_reconnect_is_answered_even_at_the_version_envoy_already_has(
    ads: tuple[AdsServer, grpc.aio.Channel],
) -> None:
    server, channel = ads
    snap = snapshot(1)
    server.set_snapshot(snap)
    # A new stream from an Envoy that holds this version from a previous stream (envoy #34334).
    client = AdsClient(channel, "envoy-back")
    await client.request(TYPE_CLUSTER, version=snap.versions[TYPE_CLUSTER])
    assert server.snapshot is snap
    cds = await client.next()
    assert cds.version_info == snap.versions[TYPE_CLUSTER]
    await client.request(TYPE_ENDPOINT, ["a"], version=snap.versions[TYPE_ENDPOINT])
    eds = await client.next()
    assert (eds.version_info, names(eds)) == (snap.versions[TYPE_ENDPOINT], ["a"])


async def test_cancelled_streams_leave_nodes_and_close_ends_the_rest(ads: tuple[AdsServer, grpc.aio.Channel]) -> None:
    server, channel = ads
    server.set_snapshot(snapshot(1))
    leaving, staying = AdsClient(channel, "leaving"), AdsClient(channel, "staying")
    for client in (leaving, staying):
        await client.request(TYPE_CLUSTER)
        await client.next()
    await server.wait_nodes(2, timeout_s=5)
    leaving.call.cancel()
    await server.wait_nodes(1, timeout_s=5)
    assert [n.node_id for n in server.nodes()] == ["staying"]

    await server.close()
    assert await asyncio.wait_for(staying.call.read(), 5) is grpc.aio.EOF
    assert await staying.call.code() == grpc.StatusCode.OK
    assert server.nodes() == []


async def test_delta_xds_is_unimplemented(ads: tuple[AdsServer, grpc.aio.Channel]) -> None:
    _, channel = ads
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources()
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE_CLUSTER))
    assert await call.code() == grpc.StatusCode.UNIMPLEMENTED


def test_versions_are_deterministic_and_follow_the_revision() -> None:
    one, again = snapshot(7, "x"), snapshot(7, "x")
    assert one.versions == again.versions
    assert one.versions[TYPE_CLUSTER].startswith("7.")
    assert snapshot(8, "x").versions[TYPE_CLUSTER].split(".")[1] == one.versions[TYPE_CLUSTER].split(".")[1]
    assert resource_version(7, {}) == XdsSnapshot.build(7, {}).versions[TYPE_ROUTE]
    with pytest.raises(ValueError, match="without a version"):
        XdsSnapshot(1, {TYPE_CLUSTER: {}}, {})
    mislabeled = XdsSnapshot.build(1, {TYPE_ROUTE: {"a": cluster_pb2.Cluster(name="a")}})
    with pytest.raises(ValueError, match="filed under"):
        mislabeled.packed(TYPE_ROUTE, None)


async def test_wait_acked_times_out_with_what_nodes_hold(ads: tuple[AdsServer, grpc.aio.Channel]) -> None:
    server, _ = ads
    with pytest.raises(TimeoutError, match="not xDS versions"):
        await server.wait_acked({"clusters": "9.nope"}, timeout_s=0.05)
