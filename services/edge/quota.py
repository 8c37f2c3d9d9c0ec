"""The rate-limit quota server (RLQS): Envoy reports usage per bucket, the edge leases it tokens.

Envoy's rate_limit_quota filter enforces, per (tenant, route) bucket, the token bucket this server
assigns, and reports each bucket's allowed and denied counts every 5 s (hard-coded in Envoy 1.40;
`reporting_interval` is not read yet) and at once for a bucket it has just created. No request waits
on the edge: a new bucket's first request passes (no_assignment_behavior ALLOW_ALL) and is reported.

Leases. An assignment is a token bucket whose max_tokens is the lease and whose refill is negligible
(one token per ~31 years), so it is a one-shot allowance. Before it is sent, the lease is charged to
the window's Redis counters (RedisQuotaLedger: grant = min(want, limit - counted), atomically, shared
by every edge replica). Envoy 1.40 keeps a bucket's token bucket when a new token-bucket assignment
arrives, even one with another max_tokens (checked: 3 tokens used, then an assignment of 5 gave none),
and builds a fresh, full one only after a blanket rule; so a new lease goes out as DENY_ALL followed by
the token bucket in one response (Envoy applies a response's actions in order and only then lets
requests see them), and an unchanged lease is re-sent alone, which only renews its TTL. A new lease
replaces the old one: the old one's unused tokens, as far as reports tell (leased - allowed since),
are refunded in the same atomic step. Leases follow demand (allowed + denied in the last report):
about two reports' worth, at least `floor`; a lease that outlives its demand is shrunk at the next
report, so an Envoy that went quiet hands its tokens back within one report. When nothing is left,
the bucket gets DENY_ALL; at each window start every bucket gets a fresh lease at once.

Exactness. Every reported allowed request is charged exactly once: the use an Envoy reports after a
lease was sent counts against that lease, even when some of it was served from the previous one, so a
refund that came too early is taken back at the next replacement. Per window, tenant and Envoy, what
can pass beyond the limit is bounded by
  (a) requests passed before the bucket's first assignment arrived (a new bucket per Envoy; about one
      round trip to the edge, one request for a serial client), and
  (b) requests an Envoy passed from a replaced lease between sending the report that replaced it and
      receiving the new lease (one round trip), for the last replacement only,
so a tenant at limit L through E Envoys gets at most L + E * (a + b) - a handful per Envoy - and alone
on one Envoy, serially, exactly L or L + 1. Leases counted in a window are never refunded to the next
one. What an Envoy reports after a window starts counts in the new window (conservative: a lease's
tail at a window's end is charged twice).

Fail open. When Redis cannot answer, buckets get ALLOW_ALL (counted, metric outcome "fail_open") and
their use is not charged; the next report after Redis recovers leases again. When the edge is gone,
Envoy's assignments expire after `assignment_ttl_s` and its buckets fall back to ALLOW_ALL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc
from envoy.service.rate_limit_quota.v3 import rlqs_pb2 as pb

from services.edge.limits import Limit, LimitPolicy, RedisQuotaLedger, Window, WindowClock, lease_floor
from services.edge.metrics import count_decision, count_quota, count_reported
from services.mesh import replies
from services.runtime.errors import ResourceExhausted

log = logging.getLogger(__name__)

TENANT_KEY = "tenant"
ROUTE_KEY = "route"
REFILL_INTERVAL_S = 10**9  # a token bucket that (practically) never refills: a lease, not a rate
Kind = Literal["lease", "keep", "deny", "allow"]


@dataclass(frozen=True)
class Usage:
    """One bucket's line of an Envoy usage report."""

    bucket: tuple[tuple[str, str], ...]  # the BucketId's (key, value) pairs, sorted
    allowed: int
    denied: int


@dataclass(frozen=True)
class Assignment:
    """What to tell Envoy about one bucket, for `ttl_s`: a new lease of `tokens`, the current one kept
    (TTL renewed, Envoy's remaining tokens untouched), DENY_ALL or ALLOW_ALL."""

    bucket: tuple[tuple[str, str], ...]
    kind: Kind
    tokens: int
    ttl_s: int


@dataclass
class BucketState:
    """One Envoy's bucket in the current window, as this edge accounts for it."""

    window: int
    limits: tuple[Limit, ...]
    lease: int = 0  # tokens of the last lease sent (0: none yet, DENY_ALL or ALLOW_ALL)
    used: int = 0  # allowed requests reported since that lease was sent
    demand: int = 0  # allowed + denied in the last report
    failing_open: bool = False  # Redis was unreachable: ALLOW_ALL sent, use not charged


@dataclass(frozen=True)
class QuotaTuning:
    """How leases are sized and how long an assignment holds without news from the edge."""

    lease_fraction: float = 0.1  # smallest lease: this share of the tightest limit
    demand_reports: int = 2  # a lease covers this many reports' worth of the last demand
    assignment_ttl_s: int = 15  # Envoy falls back to ALLOW_ALL this long after the edge went quiet


class LeaseBook:
    """The buckets of one Envoy's RLQS stream and the leases they hold. Not shared between streams.

    Transport-agnostic (the servicer converts protobuf); `on_report` and `on_new_window` must not run
    concurrently for one book (the servicer holds a lock).
    """

    def __init__(
        self, policy: LimitPolicy, ledger: RedisQuotaLedger, windows: WindowClock, tuning: QuotaTuning
    ) -> None:
        self.policy = policy
        self.ledger = ledger
        self.windows = windows
        self.tuning = tuning
        self.buckets: dict[tuple[tuple[str, str], ...], BucketState] = {}

    async def on_report(self, usages: Sequence[Usage]) -> list[Assignment]:
        window = self.windows.current()
        out = []
        for usage in usages:
            state = self._state(usage.bucket, window)
            if not state.failing_open:
                state.used += usage.allowed
            state.demand = usage.allowed + usage.denied
            count_reported(usage.allowed, usage.denied)
            out.append(await self._assign(usage.bucket, state, window))
        return out

    async def on_new_window(self) -> list[Assignment]:
        """Lease every known bucket afresh for the window that just began (no refund to the old one)."""
        window = self.windows.current()
        out = []
        for bucket, state in list(self.buckets.items()):
            if state.window != window.index:
                state = self._state(bucket, window)
                out.append(await self._assign(bucket, state, window))
        return out

    def _state(self, bucket: tuple[tuple[str, str], ...], window: Window) -> BucketState:
        state = self.buckets.get(bucket)
        if state is None or state.window != window.index:
            values = dict(bucket)
            limits = self.policy.limits_for(values.get(TENANT_KEY, ""), values.get(ROUTE_KEY, ""))
            previous = state
            state = BucketState(window.index, limits)
            if previous is not None:
                state.demand = previous.demand
            self.buckets[bucket] = state
        return state

    def _want(self, state: BucketState) -> int:
        floor = lease_floor(state.limits, self.tuning.lease_fraction)
        return max(floor, self.tuning.demand_reports * state.demand)

    async def _assign(self, bucket: tuple[tuple[str, str], ...], state: BucketState, window: Window) -> Assignment:
        ttl = self.tuning.assignment_ttl_s
        if not state.limits:  # no tenant: nothing of ours to limit
            return Assignment(bucket, "allow", 0, ttl)
        remaining = state.lease - state.used
        want = self._want(state)
        if state.lease > 0 and not state.failing_open and state.demand <= remaining <= 2 * want:
            # Enough for the next report and not hoarding: the same assignment again (Envoy keeps the
            # bucket and its tokens; only the TTL is renewed). No Redis round trip.
            count_quota("keep")
            return Assignment(bucket, "keep", state.lease, ttl)
        refund = 0 if state.failing_open else remaining
        try:
            grant = await self.ledger.lease(window, state.limits, refund=refund, want=want)
        except Exception as error:  # Redis down or slow: fail open, and say so
            if not state.failing_open:
                log.warning("rate-limit counters unavailable (%r); limits fail open", error)
            state.lease, state.used, state.failing_open = 0, 0, True
            count_quota("fail_open")
            return Assignment(bucket, "allow", 0, ttl)
        state.failing_open, state.used = False, 0
        if grant.tokens == 0:
            state.lease = 0
            count_quota("deny")
            return Assignment(bucket, "deny", 0, ttl)
        state.lease = grant.tokens
        count_quota("lease")
        return Assignment(bucket, "lease", grant.tokens, ttl)


def _bucket(bucket_id: pb.BucketId) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(bucket_id.bucket.items()))


def _action(assignment: Assignment, kind: Kind) -> pb.RateLimitQuotaResponse.BucketAction:
    action = pb.RateLimitQuotaResponse.BucketAction(bucket_id=pb.BucketId(bucket=dict(assignment.bucket)))
    quota = action.quota_assignment_action
    quota.assignment_time_to_live.seconds = assignment.ttl_s
    strategy = quota.rate_limit_strategy
    if kind in ("lease", "keep"):
        strategy.token_bucket.max_tokens = assignment.tokens
        strategy.token_bucket.tokens_per_fill.value = 1
        strategy.token_bucket.fill_interval.seconds = REFILL_INTERVAL_S
    else:
        strategy.blanket_rule = strategy.DENY_ALL if kind == "deny" else strategy.ALLOW_ALL
    return action


def _actions(assignment: Assignment) -> list[pb.RateLimitQuotaResponse.BucketAction]:
    if assignment.kind == "lease":  # a blanket rule first, or Envoy would keep the old token bucket
        return [_action(assignment, "deny"), _action(assignment, "lease")]
    return [_action(assignment, assignment.kind)]


def response(assignments: Sequence[Assignment]) -> pb.RateLimitQuotaResponse:
    return pb.RateLimitQuotaResponse(bucket_action=[a for assignment in assignments for a in _actions(assignment)])


@dataclass
class QuotaService:
    """What every stream shares: the policy, the ledger, the windows and the tuning."""

    domain: str
    policy: LimitPolicy
    ledger: RedisQuotaLedger
    windows: WindowClock
    tuning: QuotaTuning = field(default_factory=QuotaTuning)

    def book(self) -> LeaseBook:
        return LeaseBook(self.policy, self.ledger, self.windows, self.tuning)


class DirectCharge:
    """One request charged straight to its tenant's counters, for a route Envoy's quota filter cannot
    count: the token exchange, whose tenant is known only once the edge has checked the key. It draws
    on the same counters as Envoy's buckets (the tenant's limit, and `route`'s when one is set), and
    fails open when Redis does, as the leases do. A refusal counts as the exchange's decision
    (`servegrid_edge_decisions_total{kind="token", outcome="limited"}`), not as a bucket assignment."""

    def __init__(self, service: QuotaService, route: str) -> None:
        self.service = service
        self.route = route

    async def __call__(self, tenant: str) -> None:
        limits = self.service.policy.limits_for(tenant, self.route)
        if not limits:
            return
        window = self.service.windows.current()
        try:
            grant = await self.service.ledger.lease(window, limits, refund=0, want=1)
        except Exception as error:  # Redis down or slow: fail open, and say so
            log.warning("rate-limit counters unavailable (%r); the %s route fails open", error, self.route)
            return
        if grant.tokens == 0:
            count_decision("token", "limited")
            retry_after = max(1, math.ceil(window.seconds_left(self.service.windows.now())))
            raise ResourceExhausted(
                f"the tenant's request limit for this window is used up; retry in {retry_after} s",
                reason=replies.RATE_LIMITED.reason,
                metadata={"retry_after_s": str(retry_after)},
            )


class RateLimitQuotaServicer:
    """envoy.service.rate_limit_quota.v3.RateLimitQuotaService: one bidirectional stream per Envoy."""

    def __init__(self, service: QuotaService) -> None:
        self.service = service

    async def StreamRateLimitQuotas(
        self, requests: AsyncIterator[pb.RateLimitQuotaUsageReports], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RateLimitQuotaResponse]:
        book = self.service.book()
        lock = asyncio.Lock()
        outbox: asyncio.Queue[pb.RateLimitQuotaResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(requests, book, lock, outbox, context))
        roller = asyncio.create_task(self._roll_windows(book, lock, outbox))
        try:
            while (message := await outbox.get()) is not None:
                yield message
        finally:
            for task in (reader, roller):
                task.cancel()
            for task in (reader, roller):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _read(
        self,
        requests: AsyncIterator[pb.RateLimitQuotaUsageReports],
        book: LeaseBook,
        lock: asyncio.Lock,
        outbox: asyncio.Queue[pb.RateLimitQuotaResponse | None],
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            async for reports in requests:
                if reports.domain and reports.domain != self.service.domain:
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"unknown rate limit domain {reports.domain!r}; this edge serves {self.service.domain!r}",
                    )
                usages = [
                    Usage(_bucket(u.bucket_id), u.num_requests_allowed, u.num_requests_denied)
                    for u in reports.bucket_quota_usages
                ]
                async with lock:
                    assignments = await book.on_report(usages)
                if assignments:
                    outbox.put_nowait(response(assignments))
        finally:
            outbox.put_nowait(None)  # Envoy closed its side (or went away): end the stream

    async def _roll_windows(
        self, book: LeaseBook, lock: asyncio.Lock, outbox: asyncio.Queue[pb.RateLimitQuotaResponse | None]
    ) -> None:
        """At each window start, push fresh leases unasked (Envoy applies any response at any time), so
        a DENY_ALL bucket does not wait up to a report interval into the new window."""
        windows = self.service.windows
        while True:
            await asyncio.sleep(windows.current().seconds_left(windows.now()) + 0.01)
            async with lock:
                assignments = await book.on_new_window()
            if assignments:
                outbox.put_nowait(response(assignments))
