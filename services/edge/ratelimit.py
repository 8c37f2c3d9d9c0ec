"""Envoy's Rate Limit Service (envoy.service.ratelimit.v3) on Redis fixed-window counters."""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2

from services.edge.envoy_api import rls_pb2 as pb
from services.edge.envoy_api import rls_pb2_grpc as pb_grpc
from services.edge.limits import TENANT_KEY, Limit, LimitPolicy, RedisWindowCounter, Verdict
from services.edge.metrics import count_decision

log = logging.getLogger(__name__)

# Plain ints, looked up once: enum attribute access on generated classes is slow on a hot path.
OK = pb.RateLimitResponse.OK
OVER_LIMIT = pb.RateLimitResponse.OVER_LIMIT
_Unit = pb.RateLimitResponse.RateLimit
_UNITS = {1: _Unit.SECOND, 60: _Unit.MINUTE, 3600: _Unit.HOUR, 86400: _Unit.DAY}
_OK_STATUS = pb.RateLimitResponse.DescriptorStatus(code=OK)


class RateLimiter:
    """Applies the policy to a request's descriptors and counts them in one Redis round trip."""

    def __init__(self, domain: str, policy: LimitPolicy, counter: RedisWindowCounter) -> None:
        self.domain = domain
        self.policy = policy
        self.counter = counter

    async def decide(self, descriptors: list[list[tuple[str, str]]], hits: int) -> list[Verdict]:
        limits = [self.policy.limit_for(entries) for entries in descriptors]
        counted = [limit for limit in limits if limit is not None]
        counts, reset_s = await self.counter.hit(self.domain, counted, hits) if counted else ([], 0)
        by_limit: dict[int, int] = {id(limit): count for limit, count in zip(counted, counts, strict=True)}
        return [Verdict(limit, by_limit[id(limit)], reset_s) if limit else Verdict(None) for limit in limits]


def _status(verdict: Verdict, window_s: int) -> pb.RateLimitResponse.DescriptorStatus:
    if verdict.limit is None:
        return _OK_STATUS
    limit: Limit = verdict.limit
    return pb.RateLimitResponse.DescriptorStatus(
        code=OVER_LIMIT if verdict.over else OK,
        current_limit=pb.RateLimitResponse.RateLimit(
            name=limit.name, requests_per_unit=limit.requests, unit=_UNITS.get(window_s, _Unit.UNKNOWN)
        ),
        limit_remaining=verdict.remaining,
        duration_until_reset=duration_pb2.Duration(seconds=verdict.reset_s),
    )


class RateLimitServicer(pb_grpc.RateLimitServiceServicer):
    """envoy.service.ratelimit.v3.RateLimitService."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def ShouldRateLimit(
        self, request: pb.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> pb.RateLimitResponse:
        if request.domain != self.limiter.domain:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown rate limit domain {request.domain!r}; this service serves {self.limiter.domain!r}",
            )
        descriptors = [[(e.key, e.value) for e in d.entries] for d in request.descriptors]
        tenant = next((v for entries in descriptors for k, v in entries if k == TENANT_KEY), "")
        try:
            verdicts = await self.limiter.decide(descriptors, request.hits_addend or 1)
        except Exception as error:
            # Redis is down or slow. The edge reports an error rather than guessing; Envoy's
            # ratelimit filter then applies its failure mode, fail-open by default (envoy/render.py),
            # so an outage of the counter store degrades limits, never the API.
            log.warning("rate limit counters unavailable", extra={"error": repr(error)})
            count_decision("ratelimit", tenant, "error")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate limit counters unavailable")
            raise  # unreachable: abort raises
        over = any(v.over for v in verdicts)
        count_decision("ratelimit", tenant, "over_limit" if over else "ok")
        return pb.RateLimitResponse(
            overall_code=OVER_LIMIT if over else OK,
            statuses=[_status(v, self.limiter.counter.window_s) for v in verdicts],
        )
