"""The edge's rate limiter against a real Redis: exact under concurrency, honest when Redis is gone."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from services.edge.envoy_api import rls_pb2 as pb
from services.edge.limits import LimitPolicy, RedisWindowCounter
from services.edge.ratelimit import RateLimiter, RateLimitServicer

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"servegrid:edgetest:{secrets.token_hex(4)}:"
    yield value
    client = aioredis.from_url(REDIS_URL)
    async for key in client.scan_iter(f"{value}*"):
        await client.delete(key)
    await client.aclose()


def _request(tenant: str, route: str | None = None) -> pb.RateLimitRequest:
    descriptors = [pb.RateLimitDescriptor(entries=[pb.RateLimitDescriptor.Entry(key="tenant", value=tenant)])]
    if route:
        descriptors.append(
            pb.RateLimitDescriptor(
                entries=[
                    pb.RateLimitDescriptor.Entry(key="tenant", value=tenant),
                    pb.RateLimitDescriptor.Entry(key="route", value=route),
                ]
            )
        )
    return pb.RateLimitRequest(domain="servegrid", descriptors=descriptors)


class _Context:
    """Just enough of grpc.aio.ServicerContext for abort()."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise grpc.RpcError(code, details)


def _servicer(
    client: Any, prefix: str, limits: dict[str, int], routes: dict[str, int] | None = None
) -> RateLimitServicer:
    counter = RedisWindowCounter(client, prefix, 60)
    return RateLimitServicer(RateLimiter("servegrid", LimitPolicy(100, limits, routes or {}), counter))


async def test_two_replicas_hammering_one_redis_allow_exactly_the_limit(prefix: str) -> None:
    # Two clients stand for two edge replicas (each behind its own Envoy) sharing one Redis.
    clients = [aioredis.from_url(REDIS_URL), aioredis.from_url(REDIS_URL)]
    servicers = [_servicer(c, prefix, {"acme": 50}) for c in clients]
    if 60 - time.time() % 60 < 3:  # keep the burst inside one window
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    replies = await asyncio.gather(
        *(servicers[i % 2].ShouldRateLimit(_request("acme"), _Context()) for i in range(200))
    )
    for client in clients:
        await client.aclose()
    ok = [r for r in replies if r.overall_code == pb.RateLimitResponse.OK]
    assert len(ok) == 50
    remaining = sorted(r.statuses[0].limit_remaining for r in ok)
    assert remaining == list(range(50))  # every hit counted once: 49 down to 0
    over = [r for r in replies if r.overall_code == pb.RateLimitResponse.OVER_LIMIT]
    assert len(over) == 150 and all(r.statuses[0].current_limit.requests_per_unit == 50 for r in over)


async def test_a_route_limit_bites_before_the_tenant_limit(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    servicer = _servicer(client, prefix, {"acme": 100}, {"acme/infer": 2})
    codes = [(await servicer.ShouldRateLimit(_request("acme", "infer"), _Context())).overall_code for _ in range(3)]
    other_route = await servicer.ShouldRateLimit(_request("acme", "models"), _Context())
    await client.aclose()
    assert codes == [pb.RateLimitResponse.OK, pb.RateLimitResponse.OK, pb.RateLimitResponse.OVER_LIMIT]
    assert other_route.overall_code == pb.RateLimitResponse.OK
    assert len(other_route.statuses) == 2 and not other_route.statuses[1].HasField("current_limit")


async def test_a_new_window_starts_from_zero(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    now = [1_000_000.0]
    counter = RedisWindowCounter(client, prefix, 60, clock=lambda: now[0])
    limiter = RateLimiter("servegrid", LimitPolicy(1, {}, {}), counter)
    first = await limiter.decide([[("tenant", "acme")]], 1)
    second = await limiter.decide([[("tenant", "acme")]], 1)
    now[0] += 60
    third = await limiter.decide([[("tenant", "acme")]], 1)
    await client.aclose()
    assert [v.over for v in (first[0], second[0], third[0])] == [False, True, False]
    assert first[0].reset_s == 20  # 1_000_000 is 40 s into its minute


async def test_dead_redis_is_an_error_answered_fast_not_a_guess() -> None:
    # Nothing listens on port 1. The RLS answers UNAVAILABLE within the short Redis timeout, and
    # Envoy's ratelimit filter (failure_mode_deny false) lets the request through: fail open.
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    servicer = _servicer(client, "servegrid:edgetest:dead:", {})
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        await servicer.ShouldRateLimit(_request("acme"), _Context())
    await client.aclose()
    assert error.value.args[0] == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2


async def test_unknown_domain_is_refused(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    request = _request("acme")
    request.domain = "someone-else"
    with pytest.raises(grpc.RpcError) as error:
        await _servicer(client, prefix, {}).ShouldRateLimit(request, _Context())
    await client.aclose()
    assert error.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_forgotten_script_is_reloaded_and_each_hit_counts_once(prefix: str) -> None:
    # What a Redis restart or SCRIPT FLUSH looks like to the counter (without flushing a shared Redis).
    client = aioredis.from_url(REDIS_URL)
    counter = RedisWindowCounter(client, prefix, 60)
    limiter = RateLimiter("servegrid", LimitPolicy(10, {}, {}), counter)
    await limiter.decide([[("tenant", "acme")]], 1)
    counter._sha = b"0" * 40  # a script Redis does not know
    verdicts = await asyncio.gather(*(limiter.decide([[("tenant", "acme")]], 1) for _ in range(3)))
    await counter.hot.close()
    await client.aclose()
    assert sorted(v[0].used for v in verdicts) == [2, 3, 4]
