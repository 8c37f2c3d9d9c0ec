"""The ADS server against a real Envoy: config applies, a NACKed snapshot leaves the old one serving,
and Envoy keeps serving through a control-plane restart, then reconnects at the version it holds."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

# Imported for their descriptors: ParseDict resolves the typed_config Any types through them.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from google.protobuf import json_format
from prometheus_client import REGISTRY

from services.router.xds import (
    TYPE_CLUSTER,
    TYPE_ENDPOINT,
    TYPE_LISTENER,
    TYPE_ROUTE,
    AdsServer,
    NackInfo,
    XdsSnapshot,
    short_name,
)
from services.stack.ports import free_port
from tests.support.polling import wait_until

pytestmark = pytest.mark.integration

ENVOY = Path(sys.executable).parent / "envoy"
ADS_SOURCE = {"ads": {}, "resource_api_version": "V3"}


def snapshot(revision: int, body: str, listen_port: int, *, path_regex: str | None = None) -> XdsSnapshot:
    """One listener (HCM over RDS "local"), its route config answering `body`, one EDS cluster."""
    listener = {
        "name": "http",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "http",
                            "rds": {"route_config_name": "local", "config_source": ADS_SOURCE},
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }
    match: dict[str, Any] = {"prefix": "/"} if path_regex is None else {"safe_regex": {"regex": path_regex}}
    route = {
        "name": "local",
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": match, "direct_response": {"status": 200, "body": {"inline_string": body}}}],
            }
        ],
    }
    cluster = {
        "name": "backend",
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": ADS_SOURCE},
    }
    endpoints = {
        "cluster_name": "backend",
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}
        ],
    }
    return XdsSnapshot.build(
        revision,
        {
            TYPE_CLUSTER: {"backend": json_format.ParseDict(cluster, cluster_pb2.Cluster())},
            TYPE_ENDPOINT: {"backend": json_format.ParseDict(endpoints, endpoint_pb2.ClusterLoadAssignment())},
            TYPE_LISTENER: {"http": json_format.ParseDict(listener, listener_pb2.Listener())},
            TYPE_ROUTE: {"local": json_format.ParseDict(route, route_pb2.RouteConfiguration())},
        },
    )


def bootstrap(ads_port: int, admin_port: int) -> dict[str, Any]:
    ads_address = {"socket_address": {"address": "127.0.0.1", "port_value": ads_port}}
    return {
        "node": {"id": "it-envoy", "cluster": "it"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": "xds",
                            # Reconnect fast after the control plane restarts (default base is 500 ms).
                            "retry_policy": {"retry_back_off": {"base_interval": "0.05s", "max_interval": "0.2s"}},
                        }
                    }
                ],
            },
            "cds_config": ADS_SOURCE,
            "lds_config": ADS_SOURCE,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": ads_address}}]}],
                    },
                }
            ]
        },
    }


class Control:
    """One ADS server on a fixed port; restartable on that port."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.ads = AdsServer()
        self.server = grpc.aio.server()

    async def start(self) -> Control:
        self.ads.register(self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()
        return self

    async def kill(self) -> None:
        # Abrupt, as a crashed router: streams are cancelled, not ended with OK.
        await self.server.stop(0)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def rejections() -> float:
    return REGISTRY.get_sample_value("servegrid_router_xds_rejections_total", {"type": "routes"}) or 0.0


class Envoy:
    """One real Envoy bootstrapped to take everything over ADS from 127.0.0.1:ads_port."""

    def __init__(self, state: Path, ads_port: int) -> None:
        self.listen_port, self.admin_port = free_port(), free_port()
        self.log_path = state / "envoy.log"
        config = state / "envoy.json"
        config.write_text(json.dumps(bootstrap(ads_port, self.admin_port)))
        command = [str(ENVOY), "-c", str(config), "--use-dynamic-base-id", "--disable-hot-restart"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, "--concurrency", "1", "-l", "warning"], stdout=log, stderr=subprocess.STDOUT
            )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def get(self, path: str = "/", *, admin: bool = False) -> tuple[int, str]:
        # urllib blocks: run it off the event loop, which also serves the ADS stream.
        port = self.admin_port if admin else self.listen_port
        return await asyncio.to_thread(get, f"http://127.0.0.1:{port}{path}")

    async def serves(self, body: str, timeout_s: float = 10.0) -> None:
        """Poll the listener (another process) until it answers `body`: listeners warm asynchronously."""
        got: tuple[int, str] = (0, "")

        async def answers() -> bool:
            nonlocal got
            got = await self.get("/anything")
            return got == (200, body)

        await wait_until(answers, timeout_s, poll_s=0.05, detail=lambda: f"for {body!r}: last {got}\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
async def control() -> AsyncIterator[list[Control]]:
    """The control planes a test starts (a restart appends one); all stopped at the end."""
    planes: list[Control] = []
    yield planes
    for plane in planes:
        await plane.ads.close()
        await plane.server.stop(0)


@pytest.fixture
def envoys(tmp_path: Path) -> Iterator[list[Envoy]]:
    started: list[Envoy] = []
    yield started
    for envoy in started:
        envoy.stop()


async def test_envoy_applies_rejects_and_survives_a_control_plane_restart(
    control: list[Control], envoys: list[Envoy], tmp_path: Path
) -> None:
    plane = await Control().start()
    control.append(plane)
    envoy = Envoy(tmp_path, plane.port)
    envoys.append(envoy)

    # 1. Envoy connects, then a snapshot is pushed: every type is ACKed and the route answers.
    try:
        await plane.ads.wait_nodes(1, timeout_s=15)
    except TimeoutError:
        raise AssertionError(envoy.log_tail()) from None
    first = snapshot(1, "ok", envoy.listen_port)
    plane.ads.set_snapshot(first)
    await plane.ads.wait_acked(first.versions, timeout_s=15)
    await envoy.serves("ok")
    assert "backend::127.0.0.1:9::" in (await envoy.get("/clusters", admin=True))[1]
    [node] = plane.ads.nodes()
    assert (node.node_id, node.node_cluster, node.in_sync) == ("it-envoy", "it", True)
    assert node.acked == {short_name(t): v for t, v in first.versions.items()}
    assert set(node.acked) == {"clusters", "endpoints", "listeners", "routes"}
    await plane.ads.check()

    # 2. A route config Envoy cannot compile (RE2 rejects the regex): NACKed, the old route keeps serving.
    nacked = asyncio.Event()
    seen: list[NackInfo] = []

    def on_nack(info: NackInfo) -> None:
        seen.append(info)
        nacked.set()

    plane.ads.on_nack = on_nack
    before = rejections()
    bad = snapshot(2, "bad", envoy.listen_port, path_regex="(unclosed")
    plane.ads.set_snapshot(bad)
    await asyncio.wait_for(nacked.wait(), 10)
    [info] = seen
    assert (info.type, info.version, info.kept_version) == (
        "routes",
        bad.versions[TYPE_ROUTE],
        first.versions[TYPE_ROUTE],
    )
    assert "unclosed" in info.message or "regex" in info.message.lower(), info.message
    with pytest.raises(RuntimeError, match="rejected"):
        await plane.ads.check()
    assert rejections() == before + 1
    await plane.ads.wait_acked({k: v for k, v in bad.versions.items() if k != TYPE_ROUTE}, timeout_s=10)
    assert await envoy.get() == (200, "ok")
    assert plane.ads.nodes()[0].acked["routes"] == first.versions[TYPE_ROUTE]

    # 3. A valid snapshot after it applies and clears the health failure.
    fixed = snapshot(3, "ok2", envoy.listen_port)
    plane.ads.set_snapshot(fixed)
    await plane.ads.wait_acked(fixed.versions, timeout_s=10)
    await envoy.serves("ok2")
    await plane.ads.check()
    assert rejections() == before + 1  # no resend loop: the bad version was NACKed once

    # 4. The control plane dies: Envoy keeps serving its last config.
    await plane.kill()
    await plane.ads.wait_nodes(0, timeout_s=5)  # its streams were cancelled: they leave nodes()
    assert await envoy.get() == (200, "ok2")

    # 5. A new control plane on the same port with the same snapshot: Envoy reconnects and stays at it.
    restarted = Control(plane.port)
    control.append(restarted)
    restarted.ads.set_snapshot(fixed)
    await restarted.start()
    try:
        await restarted.ads.wait_acked(fixed.versions, timeout_s=10)
    except TimeoutError:
        raise AssertionError(envoy.log_tail()) from None
    [node] = restarted.ads.nodes()
    assert node.in_sync and node.rejected == {}
    status, text = await envoy.get("/config_dump?resource=dynamic_route_configs", admin=True)
    assert status == 200, text
    dump = json.loads(text)
    assert [c["version_info"] for c in dump["configs"]] == [fixed.versions[TYPE_ROUTE]]
    assert await envoy.get() == (200, "ok2")
    assert envoy.process.poll() is None, envoy.log_tail()
