"""Aggregated Discovery Service (xDS v3, state-of-the-world): the router as every Envoy's control plane."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from services.router import metrics

log = logging.getLogger(__name__)

TYPE_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
TYPE_ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPE_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
TYPE_ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Envoy's recommended order for ADS (xDS protocol, "eventual consistency considerations"): a cluster
# exists before its endpoints arrive, a listener before the route configuration it names.
SEND_ORDER = (TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_LISTENER, TYPE_ROUTE)
# CDS and LDS subscribe to everything (empty resource_names); EDS and RDS name what they want.
WILDCARD_TYPES = frozenset({TYPE_CLUSTER, TYPE_LISTENER})
SHORT_NAMES = {TYPE_CLUSTER: "clusters", TYPE_ENDPOINT: "endpoints", TYPE_LISTENER: "listeners", TYPE_ROUTE: "routes"}
_BY_SHORT_NAME = {short: type_url for type_url, short in SHORT_NAMES.items()}
# Exported at 0 from the start: an alert's increase() sees the first NACK, and a dashboard shows 0, not nothing.
for _short in SHORT_NAMES.values():
    metrics.XDS_REJECTIONS.labels(_short)


def short_name(type_url: str) -> str:
    """`clusters`, `endpoints`, … for the four main types; the message name for any other."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def resource_version(revision: int, resources: Mapping[str, Message]) -> str:
    """`{revision}.{sha256[:12]}` over the resources' deterministic serialization, in name order: every
    replica with the same table and health computes the same string, and a later revision sorts after."""
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(resources[name].SerializeToString(deterministic=True))
        digest.update(b"\0")
    return f"{revision}.{digest.hexdigest()[:12]}"


@dataclass(frozen=True)
class XdsSnapshot:
    """Everything every Envoy should hold: resources by type and name, and one version string per type."""

    revision: int  # the registry revision it was built from
    resources: Mapping[str, Mapping[str, Message]]  # type_url -> resource name -> message
    versions: Mapping[str, str]  # type_url -> version string

    def __post_init__(self) -> None:
        missing = set(self.resources) - set(self.versions)
        if missing:
            raise ValueError(f"snapshot has resources without a version: {sorted(missing)}")

    @classmethod
    def build(cls, revision: int, resources: Mapping[str, Mapping[str, Message]]) -> XdsSnapshot:
        """A snapshot whose versions are `resource_version` of each type (the four main types always present,
        so an empty type still tells Envoy to drop what it had)."""
        full = {type_url: dict(resources.get(type_url, {})) for type_url in SEND_ORDER}
        full.update({type_url: dict(named) for type_url, named in resources.items() if type_url not in full})
        return cls(revision, full, {t: resource_version(revision, named) for t, named in full.items()})

    @cached_property
    def _packed(self) -> dict[str, dict[str, any_pb2.Any]]:
        # Packed once per snapshot, shared by every stream that sends it.
        packed: dict[str, dict[str, any_pb2.Any]] = {}
        for type_url, named in self.resources.items():
            packed[type_url] = {}
            for name, message in named.items():
                item = any_pb2.Any()
                item.Pack(message)
                if item.type_url != type_url:
                    raise ValueError(f"resource {name!r} is a {item.type_url}, filed under {type_url}")
                packed[type_url][name] = item
        return packed

    def packed(self, type_url: str, names: frozenset[str] | None) -> list[any_pb2.Any]:
        """The type's resources as Any, all of them (names None: wildcard) or only those named, by name."""
        named = self._packed.get(type_url, {})
        chosen = sorted(named) if names is None else sorted(n for n in names if n in named)
        return [named[n] for n in chosen]


@dataclass(frozen=True)
class NackInfo:
    """One Envoy rejected one version of one type."""

    node_id: str
    node_cluster: str
    type_url: str
    version: str  # the version Envoy rejected
    kept_version: str  # the version Envoy keeps using (its last ACKed one; "" for none)
    code: int
    message: str
    at: float  # time.time()

    @property
    def type(self) -> str:
        return short_name(self.type_url)


@dataclass(frozen=True)
class NodeState:
    """One connected ADS stream, as nodes() reports it."""

    node_id: str
    node_cluster: str
    peer: str
    acked: Mapping[str, str]  # short type name -> version Envoy ACKed
    rejected: Mapping[str, str]  # short type name -> version Envoy NACKed last (until it ACKs a later one)
    in_sync: bool  # every type the node subscribes to is ACKed at the current snapshot's version
    connected_at: float  # time.time()


@dataclass
class _TypeState:
    """One stream's view of one type: what Envoy asked for, what we sent, what it accepted."""

    names: frozenset[str] | None = None  # None = wildcard
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    nonce: str = ""
    acked_version: str = ""
    rejected_version: str = ""
    must_answer: bool = False  # a fresh request (no nonce): answer it even at a version already sent


@dataclass(eq=False)  # identity: kept in a set
class _Stream:
    id: int
    peer: str
    connected_at: float = field(default_factory=time.time)
    node_id: str = ""
    node_cluster: str = ""
    types: dict[str, _TypeState] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def subscribed(self) -> dict[str, _TypeState]:
        """The types this stream wants something of (a named type with no names wants nothing)."""
        return {t: ts for t, ts in self.types.items() if ts.names is None or ts.names or t in WILDCARD_TYPES}

    def in_sync(self, snapshot: XdsSnapshot | None) -> bool:
        if snapshot is None:
            return False
        subscribed = self.subscribed().items()
        return all(ts.acked_version == snapshot.versions[t] for t, ts in subscribed if t in snapshot.versions)


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """SotW ADS over grpc.aio. Each stream has its own writer: set_snapshot only wakes them, so a slow
    Envoy delays nobody but itself, and a writer always sends the newest snapshot (never a backlog).

    Per stream and type it keeps the requested names, the version and nonce last sent and the version
    ACKed. A request whose nonce is not the last one sent is stale and ignored; one with `error_detail`
    is a NACK: logged and counted once, and that version is never sent to that stream again, so Envoy
    keeps its last good config until a snapshot with a different version arrives.
    """

    def __init__(
        self, *, on_nack: Callable[[NackInfo], None] | None = None, identifier: str = "servegrid-router"
    ) -> None:
        self.on_nack = on_nack
        self.identifier = identifier
        self.last_rejection: NackInfo | None = None  # the latest NACK seen, kept after it is superseded
        self._snapshot: XdsSnapshot | None = None
        self._streams: dict[int, _Stream] = {}  # streams that sent their first request (nodes())
        self._unidentified: set[_Stream] = set()  # open streams still waiting for their first request
        self._stream_ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._active_rejections: dict[str, NackInfo] = {}  # type_url -> NACK not yet superseded by an ACK
        self._nacks_seen: set[tuple[str, str, str]] = set()  # (node, type, version): log and count once
        self._revision_of: dict[tuple[str, str], int] = {}  # (type, version) -> revision, for the gauges
        self._changed = asyncio.Event()
        self._closing = False

    def register(self, server: grpc.aio.Server) -> None:
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    # -- the interface the router uses ---------------------------------------------------------------

    def set_snapshot(self, snapshot: XdsSnapshot) -> None:
        """Make `snapshot` current and wake every stream's writer (which sends only what changed)."""
        self._snapshot = snapshot
        self._revision_of.update({(t, v): snapshot.revision for t, v in snapshot.versions.items()})
        if len(self._revision_of) > 256:  # keep the versions still reported by a stream, forget the rest
            keep = {(t, ts.acked_version) for s in self._streams.values() for t, ts in s.types.items()}
            keep |= set(snapshot.versions.items())
            self._revision_of = {k: v for k, v in self._revision_of.items() if k in keep}
        self._nacks_seen = {k for k in self._nacks_seen if snapshot.versions.get(k[1]) == k[2]}
        for stream in self._streams.values():
            stream.wake.set()
        self._notify()

    @property
    def snapshot(self) -> XdsSnapshot | None:
        return self._snapshot

    def nodes(self) -> list[NodeState]:
        """One entry per connected stream that has sent its first request, oldest first."""
        out = []
        for stream in self._streams.values():
            out.append(
                NodeState(
                    node_id=stream.node_id,
                    node_cluster=stream.node_cluster,
                    peer=stream.peer,
                    acked={short_name(t): ts.acked_version for t, ts in stream.types.items() if ts.acked_version},
                    rejected={
                        short_name(t): ts.rejected_version for t, ts in stream.types.items() if ts.rejected_version
                    },
                    in_sync=stream.in_sync(self._snapshot),
                    connected_at=stream.connected_at,
                )
            )
        return out

    @property
    def rejections(self) -> list[NackInfo]:
        """NACKs no later ACK of the same type has superseded (what check() reports)."""
        return list(self._active_rejections.values())

    async def check(self) -> None:
        """Health component: raises while an Envoy's NACK of a type is not superseded by a later ACK."""
        if self._active_rejections:
            worst = max(self._active_rejections.values(), key=lambda n: n.at)
            types = ", ".join(sorted(short_name(t) for t in self._active_rejections))
            raise RuntimeError(
                f"Envoy rejected xDS config ({types}): node {worst.node_id} {worst.type} {worst.version}: "
                f"{worst.message}"
            )

    async def wait_acked(self, version_by_type: Mapping[str, str], timeout_s: float = 10.0, min_nodes: int = 1) -> None:
        """Wait until at least `min_nodes` streams are connected and every one ACKed these versions (keys
        are type URLs or short names); raises TimeoutError naming what each node holds."""
        wanted = {_BY_SHORT_NAME.get(k, k): v for k, v in version_by_type.items()}

        def done() -> bool:
            streams = list(self._streams.values())
            return len(streams) >= min_nodes and all(
                s.types.get(t, _TypeState()).acked_version == v for s in streams for t, v in wanted.items()
            )

        await self._wait(done, timeout_s, f"xDS versions {dict(version_by_type)} ACKed")

    async def wait_nodes(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until exactly `count` streams are connected (tests: an Envoy came, or went)."""
        await self._wait(lambda: len(self._streams) == count, timeout_s, f"{count} Envoys connected")

    async def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while not done():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"not {what} within {timeout_s}s: {self.nodes()}") from None

    async def close(self) -> None:
        """End every stream with OK (Envoy reconnects, to another replica if this one goes away); call before
        the gRPC server's stop() so streams end cleanly instead of being cancelled."""
        self._closing = True
        for stream in [*self._streams.values(), *self._unidentified]:
            stream.wake.set()
        with contextlib.suppress(TimeoutError):
            await self.wait_nodes(0, timeout_s=5)

    # -- the RPCs ------------------------------------------------------------------------------------

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "ADS server is shutting down")
        stream = _Stream(next(self._stream_ids), context.peer())
        self._unidentified.add(stream)
        reader = asyncio.get_running_loop().create_task(self._read(stream, request_iterator), name="ads-read")
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.closed or self._closing:
                    break
                for response in self._due_responses(stream):
                    await context.write(response)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._unidentified.discard(stream)
            self._drop(stream)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "incremental xDS is not served: use SotW ADS (GRPC)")

    # -- per-stream state ----------------------------------------------------------------------------

    async def _read(self, stream: _Stream, requests: AsyncIterator[discovery_pb2.DiscoveryRequest]) -> None:
        try:
            async for request in requests:
                self._on_request(stream, request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("ADS stream %d from %s ended: %s", stream.id, stream.peer, exc)
        except Exception:
            log.exception("ADS stream %d from %s (node %s) failed", stream.id, stream.peer, stream.node_id)
        finally:
            stream.closed = True
            stream.wake.set()

    def _on_request(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> None:
        if stream.id not in self._streams:
            self._connect(stream, request.node)
        ts = stream.types.setdefault(request.type_url, _TypeState())
        if request.response_nonce:
            if request.response_nonce != ts.nonce:
                # Stale: a reply to an older response; the newer one's ACK/NACK is still to come.
                log.debug(
                    "stale %s request from %s (nonce %s)",
                    short_name(request.type_url),
                    stream.node_id,
                    request.response_nonce,
                )
                return
            if request.HasField("error_detail"):
                self._on_nack(stream, ts, request)
            elif ts.sent_version is not None:
                self._on_ack(stream, request.type_url, ts, ts.sent_version)
        else:
            # A fresh subscription (a new stream, or Envoy starting this type): answer it even when it
            # already holds this version from an earlier stream (clusters warm until EDS answers).
            ts.must_answer = True
            if request.version_info and not ts.acked_version:
                ts.acked_version = request.version_info  # what Envoy kept from its previous stream
        ts.names = _requested_names(request.type_url, request.resource_names)
        stream.wake.set()
        self._notify()

    def _connect(self, stream: _Stream, node: base_pb2.Node) -> None:
        stream.node_id, stream.node_cluster = node.id, node.cluster
        self._unidentified.discard(stream)
        self._streams[stream.id] = stream
        metrics.XDS_CONNECTED.set(len(self._streams))
        log.info("Envoy connected: node %s (cluster %s) from %s", node.id, node.cluster or "-", stream.peer)

    def _drop(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        metrics.XDS_CONNECTED.set(len(self._streams))
        log.info(
            "Envoy disconnected: node %s from %s after %.1fs",
            stream.node_id,
            stream.peer,
            time.time() - stream.connected_at,
        )
        self._update_acked_gauges()
        self._notify()

    def _on_ack(self, stream: _Stream, type_url: str, ts: _TypeState, version: str) -> None:
        if ts.acked_version != version:
            log.debug("node %s ACKed %s %s", stream.node_id, short_name(type_url), version)
        ts.acked_version = version
        if ts.rejected_version and ts.rejected_version != version:
            ts.rejected_version = ""
        active = self._active_rejections.get(type_url)
        current = self._snapshot.versions.get(type_url) if self._snapshot else None
        if active is not None and version != active.version and version == current:
            del self._active_rejections[type_url]
            log.info(
                "xDS %s %s ACKed by node %s: the rejection of %s is cleared",
                short_name(type_url),
                version,
                stream.node_id,
                active.version,
            )
        self._update_acked_gauges()

    def _on_nack(self, stream: _Stream, ts: _TypeState, request: discovery_pb2.DiscoveryRequest) -> None:
        version = ts.sent_version or ""
        ts.rejected_version = version
        # Envoy keeps what it last accepted: version_info of a NACK is that version.
        ts.acked_version = request.version_info
        nack = NackInfo(
            node_id=stream.node_id,
            node_cluster=stream.node_cluster,
            type_url=request.type_url,
            version=version,
            kept_version=request.version_info,
            code=request.error_detail.code,
            message=request.error_detail.message,
            at=time.time(),
        )
        self.last_rejection = nack
        self._active_rejections[request.type_url] = nack
        key = (stream.node_id, request.type_url, version)
        if key in self._nacks_seen:
            return
        self._nacks_seen.add(key)
        metrics.XDS_REJECTIONS.labels(nack.type).inc()
        log.warning(
            "Envoy node %s rejected %s version %s (keeps %s): %s",
            nack.node_id,
            nack.type,
            version,
            nack.kept_version or "none",
            nack.message,
        )
        if self.on_nack is not None:
            try:
                self.on_nack(nack)
            except Exception:
                log.exception("on_nack callback failed")

    def _due_responses(self, stream: _Stream) -> list[discovery_pb2.DiscoveryResponse]:
        """What this stream is owed now, in CDS → EDS → LDS → RDS order (then any other type)."""
        snapshot = self._snapshot
        if snapshot is None:
            return []
        responses = []
        extra = sorted(t for t in stream.types if t not in SEND_ORDER)
        for type_url in (*SEND_ORDER, *extra):
            ts = stream.types.get(type_url)
            version = snapshot.versions.get(type_url)
            if ts is None or version is None:
                continue
            if ts.names is not None and not ts.names and type_url not in WILDCARD_TYPES:
                ts.must_answer = False  # subscribed to nothing (Envoy dropped its last cluster/route config)
                continue
            # A version already sent (ACKed, NACKed or in flight) is not sent again unless Envoy asks anew
            # or asks for other names: that is what stops the resend-after-NACK loop.
            if not ts.must_answer and version == ts.sent_version and ts.names == ts.sent_names:
                continue
            nonce = f"{self.identifier}-{next(self._nonces)}"
            ts.sent_version, ts.sent_names, ts.nonce, ts.must_answer = version, ts.names, nonce, False
            responses.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=version,
                    resources=snapshot.packed(type_url, ts.names),
                    type_url=type_url,
                    nonce=nonce,
                    control_plane=base_pb2.ControlPlane(identifier=self.identifier),
                )
            )
            metrics.XDS_RESPONSES.labels(short_name(type_url)).inc()
            if type_url == TYPE_CLUSTER:
                self._endpoints_follow_clusters(stream, snapshot)
        return responses

    @staticmethod
    def _endpoints_follow_clusters(stream: _Stream, snapshot: XdsSnapshot) -> None:
        # An updated EDS cluster warms until an EDS response names it, even one Envoy already has
        # (go-control-plane #245): re-send the endpoints right after the clusters, unless Envoy NACKed them.
        eds = stream.types.get(TYPE_ENDPOINT)
        if (
            eds is not None
            and eds.sent_version is not None
            and eds.rejected_version != snapshot.versions.get(TYPE_ENDPOINT)
        ):
            eds.must_answer = True

    def _update_acked_gauges(self) -> None:
        # The revision every connected Envoy subscribed to a type has ACKed (the laggard's).
        for type_url in SEND_ORDER:
            revisions = [
                self._revision_of.get((type_url, ts.acked_version), _revision_prefix(ts.acked_version))
                for s in self._streams.values()
                if (ts := s.subscribed().get(type_url)) is not None
            ]
            if revisions:
                metrics.XDS_ACKED_REVISION.labels(short_name(type_url)).set(min(revisions))

    def _notify(self) -> None:
        # Wake every wait_acked()/close() waiter; each re-checks its condition on a fresh event.
        self._changed.set()
        self._changed = asyncio.Event()


def _revision_prefix(version: str) -> int:
    # A version this process never built (Envoy kept it from another replica): `{revision}.{hash}`.
    head = version.partition(".")[0]
    return int(head) if head.isdigit() else -1


def _requested_names(type_url: str, names: Iterable[str]) -> frozenset[str] | None:
    requested = frozenset(names)
    if "*" in requested or (not requested and type_url in WILDCARD_TYPES):
        return None
    return requested
