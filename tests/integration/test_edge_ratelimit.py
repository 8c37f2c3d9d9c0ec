"""Rate limits end to end: Envoy's rate_limit_quota filter, the edge as its quota server, one Redis.

Real processes: two Envoys, their edges, gateway, a stand-in registry, Redis. Limits count per UTC day
here (SERVEGRID_EDGE_LIMIT_UNIT=day), so a test never straddles a window boundary (the module waits
out the last minutes of a day), and every test checks that its tenant's counters sit in one window.

The bounds asserted (services/edge/quota.py derives them): a tenant at limit L gets at least L and at
most L + (what passed before each Envoy's first assignment) + (what passed from a replaced lease in
the round trip before its replacement), a few requests per Envoy: L to L + 10 through two Envoys;
alone on one Envoy, serially, L - 1 to L + 1.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.edge.limits import UNIT_SECONDS
from services.stack.datastores import embedded_redis
from services.stack.ports import free_port
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, edge_stack, http
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

SUFFIX = secrets.token_hex(3)
DUO, SOLO, ROUTED, PHOENIX, LAZARUS = (f"{name}-{SUFFIX}" for name in ("duo", "solo", "routed", "phoenix", "lazarus"))
LIMITS = {DUO: 30, SOLO: 20, PHOENIX: 3, LAZARUS: 3}
ROUTE_LIMIT = 4  # ROUTED's "gateway" route (GET /v1/models); its tenant limit is the stack's 100000
DAY = UNIT_SECONDS["day"]
# Two usage reports (Envoy 1.40 reports every 5 s): long enough for any over-admission to show.
SETTLE_S = 11.0
EDGE_SETTINGS = {
    "SERVEGRID_EDGE_LIMIT_UNIT": "day",
    "SERVEGRID_EDGE_ROUTE_LIMITS": json.dumps({f"{ROUTED}/gateway": ROUTE_LIMIT}),
    "SERVEGRID_EDGE_QUOTA_ASSIGNMENT_TTL_S": "6",  # fail open soon after an edge dies
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[EdgeStack]:
    left = DAY - time.time() % DAY
    if left < 300:  # keep the whole module inside one window
        time.sleep(left + 1)
    # No Triton: these tests use the gateway's routes (GET /v1/models), which need none.
    with edge_stack(
        tmp_path_factory.mktemp("ratelimit"),
        datastores,
        "127.0.0.1:1",
        LIMITS,
        "127.0.0.1:1",
        edge_settings=EDGE_SETTINGS,
        envoy_overrides={"ratelimit_window_s": DAY},
    ) as running:
        yield running


def bearer(stack: EdgeStack, tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.issuer.token(tenant)}"}


class Load:
    """Threads sending GET requests round their target URLs (repeat one to weight it) until stopped."""

    def __init__(self, urls: list[str], headers: dict[str, str]) -> None:
        self.statuses: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(url, headers), daemon=True) for url in urls]

    def _run(self, url: str, headers: dict[str, str]) -> None:
        while not self.stop.is_set():
            status = http("GET", url, headers=headers).status
            with self.lock:
                self.statuses[status] += 1
            self.stop.wait(0.002)

    def allowed(self) -> int:
        with self.lock:
            return self.statuses[200]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def run_to_the_limit(urls: list[str], headers: dict[str, str], limit: int, timeout_s: float = 60.0) -> Counter[int]:
    """Load until `limit` requests passed, then SETTLE_S more (the load's length, not an assertion)."""
    with Load(urls, headers) as load:
        wait_for(lambda: load.allowed() >= limit, timeout_s)
        load.stop.wait(SETTLE_S)
    assert set(load.statuses) <= {200, 429}, load.statuses
    return load.statuses


def one_window(stack: EdgeStack, tenant: str) -> int:
    """The tenant's counted total; fails if its counters span two windows (the test would be void)."""
    keys = stack.counter_keys(tenant)
    windows = {key.rsplit(":", 1)[1] for key in keys}
    assert len(windows) == 1, keys
    client = redis.Redis.from_url(stack.datastores.redis_url)
    try:
        tenant_key = next(k for k in keys if "|r=" not in k)
        return int(client.get(tenant_key) or 0)
    finally:
        client.close()


def metric(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}}"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- exactness -------------------------------------------------------------------------------


def test_one_tenant_through_two_envoys_and_two_edges_stays_within_the_bound(stack: EdgeStack) -> None:
    second = stack.start_envoy("envoy-duo", stack.start_edge("edge-duo"))
    # Uneven: three of every four requests through the first Envoy.
    urls = [f"{stack.envoy.url}/v1/models"] * 3 + [f"{second.url}/v1/models"]
    statuses = run_to_the_limit(urls, bearer(stack, DUO), LIMITS[DUO])
    assert LIMITS[DUO] <= statuses[200] <= LIMITS[DUO] + 10, statuses
    assert statuses[429] > 0
    assert one_window(stack, DUO) >= LIMITS[DUO]  # every lease was charged to the one shared counter


def test_a_tenant_alone_on_one_envoy_gets_its_limit(stack: EdgeStack) -> None:
    statuses = run_to_the_limit([f"{stack.envoy.url}/v1/models"], bearer(stack, SOLO), LIMITS[SOLO])
    assert LIMITS[SOLO] - 1 <= statuses[200] <= LIMITS[SOLO] + 1, statuses
    assert one_window(stack, SOLO) in range(LIMITS[SOLO] - 1, LIMITS[SOLO] + 2)


def test_a_429_speaks_the_api_error_shape_with_retry_after(stack: EdgeStack) -> None:
    run_to_the_limit([f"{stack.envoy.url}/v1/models"], bearer(stack, PHOENIX), LIMITS[PHOENIX])
    reply = http("GET", f"{stack.envoy.url}/v1/models", headers=bearer(stack, PHOENIX))
    assert reply.status == 429
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["code"] == 8 and body["details"][0]["reason"] == "RATE_LIMITED", body
    assert body["details"][0]["domain"] == "servegrid.dev" and "retry" in body["message"]
    until_midnight = DAY - time.time() % DAY
    assert abs(int(reply.headers["retry-after"]) - until_midnight) <= 2  # the window's end
    assert reply.headers["x-ratelimit-reset"] == reply.headers["retry-after"]
    assert reply.headers["x-ratelimit-remaining"] == "0"
    # gRPC callers: RESOURCE_EXHAUSTED, a sentence, and the ErrorInfo in the details.
    with grpc.insecure_channel(stack.envoy.address) as channel, pytest.raises(grpc.RpcError) as limited:
        gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(), metadata=list(bearer(stack, PHOENIX).items()), timeout=5
        )
    error = limited.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not error.details().startswith("{")
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("RATE_LIMITED", "servegrid.dev")
    assert (
        trailers["retry-after"] == reply.headers["retry-after"]
        or abs(int(trailers["retry-after"]) - until_midnight) <= 2
    )
    # Another tenant is unaffected.
    assert http("GET", f"{stack.envoy.url}/v1/models", headers=bearer(stack, SOLO + "-other")).status == 200


def test_a_route_limit_bites_on_its_route_only(stack: EdgeStack) -> None:
    statuses = run_to_the_limit([f"{stack.envoy.url}/v1/models"], bearer(stack, ROUTED), ROUTE_LIMIT)
    assert ROUTE_LIMIT <= statuses[200] <= ROUTE_LIMIT + 2, statuses
    # The tenant's other routes are not held by the gateway route's limit (infer: no Triton behind it
    # here, so it fails further on, but not with 429).
    infer = http("POST", f"{stack.envoy.url}/v1/models/affine:infer", {"inputs": []}, bearer(stack, ROUTED))
    assert infer.status != 429, infer


# --- fail open, and recovery -----------------------------------------------------------------


def test_limits_fail_open_while_the_edge_is_down_and_count_again_after(stack: EdgeStack) -> None:
    port = free_port()
    edge = stack.start_edge("edge-phoenix", SERVEGRID_EDGE_PORT=str(port))
    envoy = stack.start_envoy("envoy-phoenix", edge)
    url, headers = f"{envoy.url}/v1/models", bearer(stack, PHOENIX)  # PHOENIX's day is already used up
    wait_for(lambda: http("GET", url, headers=headers).status == 429, 30)
    _, api_key = stack.create_key(f"keyed-{SUFFIX}", "user")

    edge.process.send_signal(signal.SIGKILL)
    edge.process.wait(10)
    # Envoy's last assignment expires (TTL 6 s) and the bucket falls back to ALLOW_ALL.
    wait_for(lambda: http("GET", url, headers=headers).status == 200, 30)
    # Envoy counts the outage: its quota stream cannot reconnect.
    wait_for(lambda: envoy.stats("cluster.edge_quota.").get("cluster.edge_quota.upstream_cx_connect_fail", 0) > 0, 30)
    # Authentication still fails closed: an API key cannot be checked without the edge.
    assert http("GET", url, headers={"x-api-key": api_key}).status in (403, 503)

    stack.start_edge("edge-phoenix-again", SERVEGRID_EDGE_PORT=str(port))
    # The stream reopens at Envoy's next report; the day's counter is still full in Redis.
    wait_for(lambda: http("GET", url, headers=headers).status == 429, 30)


def test_limits_fail_open_while_redis_is_down_and_count_again_after(stack: EdgeStack, tmp_path: Path) -> None:
    redis_port, metrics_port = free_port(), free_port()
    # The edge's own Redis, to kill: the embedded one `make up` starts (services/stack/datastores.py).
    redis_url, own = embedded_redis(tmp_path, "127.0.0.1", redis_port)

    def start_redis() -> subprocess.Popen[bytes]:
        assert own.prepare is not None
        own.prepare()
        process = subprocess.Popen(own.argv, cwd=own.cwd, stdout=subprocess.DEVNULL)
        wait_for(own.ready, 10)
        return process

    own_redis = start_redis()
    try:
        edge = stack.start_edge(
            "edge-lazarus",
            SERVEGRID_EDGE_REDIS_URL=redis_url,
            SERVEGRID_EDGE_REDIS_TIMEOUT_S="0.3",
            SERVEGRID_EDGE_METRICS_PORT=str(metrics_port),
        )
        envoy = stack.start_envoy("envoy-lazarus", edge)
        url, headers = f"{envoy.url}/v1/models", bearer(stack, LAZARUS)
        with Load([url], headers) as load:
            wait_for(lambda: load.statuses[429] > 0 and load.allowed() >= LIMITS[LAZARUS], 30)
        assert load.allowed() <= LIMITS[LAZARUS] + 1

        own_redis.send_signal(signal.SIGKILL)
        own_redis.wait(10)
        wait_for(lambda: http("GET", url, headers=headers).status == 200, 30)  # at the next report
        assert metric(metrics_port, "servegrid_edge_quota_assignments_total", 'outcome="fail_open"') > 0

        own_redis = start_redis()  # empty: the day starts over for this tenant
        with Load([url], headers) as load:  # open until the next report finds Redis back
            wait_for(lambda: load.statuses[429] > 0, 30)
        # Counted again: what passed while Redis was away is not charged, the new leases are.
        client = redis.Redis.from_url(redis_url)
        try:
            (key,) = client.keys(f"{stack.redis_prefix}rl:*:t={LAZARUS}:*")
            assert int(client.get(key) or 0) == LIMITS[LAZARUS]
        finally:
            client.close()
    finally:
        own_redis.kill()
        own_redis.wait(10)


# --- the ledger's script, against the real Redis ----------------------------------------------


async def test_the_ledger_refunds_grants_under_every_limit_and_expires_its_keys(
    datastores: SessionDatastores,
) -> None:
    import redis.asyncio as aioredis

    from services.edge.limits import Limit, RedisQuotaLedger, Window

    prefix = f"servegrid:edgetest:{secrets.token_hex(4)}:"
    client = aioredis.from_url(datastores.redis_url)
    ledger = RedisQuotaLedger(client, prefix, "servegrid")
    window = Window(1000, 60)
    tenant, route = Limit("t=acme", 10, "tenant:acme"), Limit("t=acme|r=infer", 4, "route:acme/infer")
    try:
        first = await ledger.lease(window, [tenant], refund=0, want=3)  # a refund of 0 is "-0" in Lua
        assert (first.tokens, first.used) == (3, 3)
        charged = await ledger.lease(window, [tenant], refund=-2, want=2)  # over-use is charged
        assert (charged.tokens, charged.used) == (2, 7)
        both = await ledger.lease(window, [tenant, route], refund=0, want=9)  # the route's 4 bites first
        assert (both.tokens, both.used) == (3, 10)
        assert (await ledger.lease(window, [tenant], refund=0, want=5)).tokens == 0  # nothing left
        refunded = await ledger.lease(window, [tenant], refund=4, want=1)
        assert (refunded.tokens, refunded.used) == (1, 7)
        assert (await ledger.lease(Window(1001, 60), [tenant], refund=0, want=5)).used == 5  # new window
        ttl = await client.ttl(ledger.key(tenant, window))
        assert 0 < ttl <= 120
    finally:
        async for key in client.scan_iter(f"{prefix}*"):
            await client.delete(key)
        await client.aclose()
