"""The quota server's lease book without Envoy or Redis: sizes, refunds, windows, fail-open, exactness."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from services.edge.limits import Grant, Limit, LimitPolicy, Window, WindowClock
from services.edge.quota import Assignment, DirectCharge, LeaseBook, QuotaService, QuotaTuning, Usage, response
from services.runtime.errors import ResourceExhausted

BUCKET = (("route", "infer"), ("tenant", "acme"))


class FakeLedger:
    """RedisQuotaLedger's contract in memory (the Lua script itself runs against Redis in
    tests/integration/test_edge_ratelimit.py): refund, then grant what fits under every limit."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.calls = 0
        self.down = False

    async def lease(self, window: Window, limits: Sequence[Limit], *, refund: int, want: int) -> Grant:
        self.calls += 1
        if self.down:
            raise ConnectionError("redis is down")
        grant = want
        for limit in limits:
            key = (limit.counter, window.index)
            self.counts[key] = self.counts.get(key, 0) - refund
            grant = min(grant, limit.requests - self.counts[key])
        grant = max(grant, 0)
        for limit in limits:
            self.counts[(limit.counter, window.index)] += grant
        return Grant(grant, self.counts[(limits[0].counter, window.index)])


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _book(
    limit: int = 100, routes: dict[str, int] | None = None, now: float = 3600.0
) -> tuple[LeaseBook, FakeLedger, Clock]:
    ledger, clock = FakeLedger(), Clock(now)
    policy = LimitPolicy(limit, {}, routes or {})
    return LeaseBook(policy, ledger, WindowClock(3600, clock), QuotaTuning()), ledger, clock  # type: ignore[arg-type]


def _only(assignments: list[Assignment]) -> Assignment:
    (assignment,) = assignments
    return assignment


def test_limit_policy_draws_a_route_bucket_on_tenant_and_route() -> None:
    policy = LimitPolicy(100, {"acme": 1000}, {"infer": 50, "acme/infer": 500})
    assert [lim.requests for lim in policy.limits_for("globex", "gateway")] == [100]
    assert [lim.requests for lim in policy.limits_for("acme", "gateway")] == [1000]
    assert [lim.requests for lim in policy.limits_for("globex", "infer")] == [100, 50]
    tenant, route = policy.limits_for("acme", "infer")
    assert (tenant.requests, route.requests) == (1000, 500) and tenant.counter != route.counter
    assert policy.limits_for("", "infer") == ()


async def test_a_new_bucket_pays_for_its_first_request_and_gets_the_floor() -> None:
    book, ledger, _ = _book(limit=100)
    first = _only(await book.on_report([Usage(BUCKET, 1, 0)]))
    assert (first.kind, first.tokens) == ("lease", 10)  # 10% of the limit; demand (1) asks for less
    assert ledger.counts[("t=acme", 1)] == 11  # the request that passed before any assignment, and the lease


async def test_a_lease_that_lasts_is_kept_without_asking_redis() -> None:
    book, ledger, _ = _book(limit=100)
    await book.on_report([Usage(BUCKET, 1, 0)])
    calls = ledger.calls
    kept = _only(await book.on_report([Usage(BUCKET, 3, 0)]))  # 7 of 10 left, demand 3: enough
    assert (kept.kind, kept.tokens, ledger.calls) == ("keep", 10, calls)


async def test_leases_follow_demand_and_refund_what_a_quiet_envoy_holds() -> None:
    book, ledger, _ = _book(limit=100)
    await book.on_report([Usage(BUCKET, 1, 0)])  # 1 + lease 10
    busy = _only(await book.on_report([Usage(BUCKET, 10, 30)]))  # used all, 30 more wanted
    assert busy.tokens == 80  # 2 reports' worth of demand (80), all still free
    assert ledger.counts[("t=acme", 1)] == 91
    quiet = _only(await book.on_report([Usage(BUCKET, 5, 0)]))  # 75 unused, demand gone
    assert quiet.tokens == 10  # shrunk to the floor; the 75 went back
    assert ledger.counts[("t=acme", 1)] == 1 + 10 + 5 + 10


async def test_a_new_lease_resets_envoys_bucket_and_a_kept_one_does_not() -> None:
    # Envoy 1.40 keeps a token bucket across token-bucket assignments (even of another size) and builds
    # a fresh one only after a blanket rule: a new lease is DENY_ALL then the bucket, in one response.
    book, _, _ = _book(limit=5)
    lease = _only(await book.on_report([Usage(BUCKET, 1, 0)]))
    kinds = [
        a.quota_assignment_action.rate_limit_strategy.WhichOneof("strategy") for a in response([lease]).bucket_action
    ]
    assert kinds == ["blanket_rule", "token_bucket"]
    kept = _only(await book.on_report([Usage(BUCKET, 0, 0)]))
    assert kept.kind == "keep" and len(response([kept]).bucket_action) == 1


async def _drain(book: LeaseBook, first: Assignment, reports: int) -> Assignment:
    """An Envoy that uses every token it is leased and is denied 5 more each report."""
    last = first
    for _ in range(reports):
        used = last.tokens if last.kind in ("lease", "keep") else 0
        last = _only(await book.on_report([Usage(BUCKET, used, 5)]))
    return last


async def test_exhausted_is_deny_all_until_the_next_window() -> None:
    book, ledger, clock = _book(limit=5)
    last = await _drain(book, _only(await book.on_report([Usage(BUCKET, 1, 0)])), 6)
    assert last.kind == "deny"
    assert ledger.counts[("t=acme", 1)] == 5
    assert await book.on_new_window() == []  # still the same window: nothing to push
    clock.now += 3600
    fresh = _only(await book.on_new_window())
    assert fresh.kind == "lease" and fresh.tokens > 0
    assert ledger.counts[("t=acme", 2)] == fresh.tokens  # the old window's leases stay in the old window


async def test_route_limits_bite_before_the_tenants() -> None:
    book, ledger, _ = _book(limit=100, routes={"acme/infer": 3})
    last = await _drain(book, _only(await book.on_report([Usage(BUCKET, 1, 0)])), 6)
    assert last.kind == "deny"
    assert ledger.counts[("t=acme|r=infer", 1)] == 3 and ledger.counts[("t=acme", 1)] == 3


async def test_limits_fail_open_while_redis_is_down_and_count_again_after() -> None:
    book, ledger, _ = _book(limit=5)
    await book.on_report([Usage(BUCKET, 1, 0)])
    ledger.down = True
    assert _only(await book.on_report([Usage(BUCKET, 1, 9)])).kind == "allow"  # the lease ran out: ask Redis
    assert _only(await book.on_report([Usage(BUCKET, 50, 0)])).kind == "allow"  # not charged later
    ledger.down = False
    back = _only(await book.on_report([Usage(BUCKET, 7, 0)]))
    assert back.kind == "lease"
    assert ledger.counts[("t=acme", 1)] == 1 + 2 + back.tokens  # before the outage (1 + lease 2), the new lease


def test_assignments_become_token_buckets_and_blanket_rules() -> None:
    message = response(
        [Assignment(BUCKET, "lease", 7, 15), Assignment(BUCKET, "deny", 0, 15), Assignment(BUCKET, "allow", 0, 15)]
    )
    reset, lease, deny, allow = message.bucket_action
    assert reset.quota_assignment_action.rate_limit_strategy.blanket_rule == 1  # then a fresh, full bucket
    assert dict(lease.bucket_id.bucket) == dict(BUCKET)
    bucket = lease.quota_assignment_action.rate_limit_strategy.token_bucket
    assert bucket.max_tokens == 7 and bucket.fill_interval.seconds >= 10**9  # a lease, practically no refill
    assert lease.quota_assignment_action.assignment_time_to_live.seconds == 15
    assert deny.quota_assignment_action.rate_limit_strategy.blanket_rule == 1  # DENY_ALL
    assert allow.quota_assignment_action.rate_limit_strategy.blanket_rule == 0  # ALLOW_ALL


@dataclass
class SimEnvoy:
    """Envoy 1.40's rate_limit_quota bucket as observed: ALLOW_ALL before the first assignment; a token
    bucket survives token-bucket assignments and starts full after a blanket rule; counts reset at
    each report."""

    book: LeaseBook
    tokens: int | None = None  # None: no token bucket
    deny_all: bool = False
    allowed: int = 0
    denied: int = 0
    total_allowed: int = 0
    inbox: list[Assignment] = field(default_factory=list)
    reported: bool = False

    def request(self) -> None:
        ok = not self.deny_all and (self.tokens is None or self.tokens > 0)
        if ok and self.tokens is not None:
            self.tokens -= 1
        self.allowed += ok
        self.denied += not ok
        self.total_allowed += ok

    def apply(self) -> None:
        for message in self.inbox:
            for action in response([message]).bucket_action:
                strategy = action.quota_assignment_action.rate_limit_strategy
                if strategy.HasField("token_bucket"):
                    if self.tokens is None or self.deny_all:
                        self.tokens = strategy.token_bucket.max_tokens
                    self.deny_all = False
                else:
                    self.deny_all, self.tokens = strategy.blanket_rule == 1, None
        self.inbox = []

    async def report(self) -> None:
        usage = Usage(BUCKET, self.allowed, self.denied)
        self.allowed = self.denied = 0
        self.inbox += await self.book.on_report([usage])


@pytest.mark.parametrize("seed", range(20))
async def test_two_envoys_share_a_limit_within_the_stated_bound(seed: int) -> None:
    # Uneven traffic through two Envoys of one tenant, assignments arriving one "round trip" late (a
    # request or two slips through an old lease in between): allowed stays within [L, L + 2 per Envoy].
    rng = random.Random(seed)
    ledger, clock = FakeLedger(), Clock(3600.0)
    policy = LimitPolicy(100, {}, {})
    envoys = [SimEnvoy(LeaseBook(policy, ledger, WindowClock(3600, clock), QuotaTuning())) for _ in range(2)]  # type: ignore[arg-type]
    share = rng.uniform(0.2, 0.8)
    for tick in range(2000):
        envoy = envoys[0] if rng.random() < share else envoys[1]
        envoy.request()
        if envoy.total_allowed == 1 and not envoy.reported:  # a new bucket reports at once
            envoy.reported = True
            await envoy.report()
        for e in envoys:
            if e.inbox and rng.random() < 0.5:  # the answer comes back a request or two later
                e.apply()
        if tick % 50 == 49:  # the 5 s report
            for e in envoys:
                await e.report()
    allowed = sum(e.total_allowed for e in envoys)
    assert 100 <= allowed <= 100 + 2 * len(envoys), allowed


async def test_one_envoy_alone_gets_exactly_its_limit() -> None:
    ledger, clock = FakeLedger(), Clock(3600.0)
    envoy = SimEnvoy(LeaseBook(LimitPolicy(20, {}, {}), ledger, WindowClock(3600, clock), QuotaTuning()))  # type: ignore[arg-type]
    for tick in range(500):
        envoy.request()
        if tick == 0:
            await envoy.report()
        envoy.apply()
        if tick % 25 == 24:
            await envoy.report()
    assert envoy.total_allowed in (19, 20, 21)


# --- the token exchange, charged by the edge itself -------------------------------------------------


def _charge(limit: int, routes: dict[str, int], clock: Clock) -> tuple[DirectCharge, FakeLedger]:
    ledger = FakeLedger()
    service = QuotaService("servegrid", LimitPolicy(limit, {}, routes), ledger, WindowClock(3600, clock))  # type: ignore[arg-type]
    return DirectCharge(service, "auth-token"), ledger


async def test_an_exchange_spends_its_tenants_limit_and_is_refused_with_the_wait_when_none_is_left() -> None:
    clock = Clock(3600.0 * 5 + 3000)  # 600 s before the window ends
    charge, ledger = _charge(100, {"acme/auth-token": 2}, clock)
    await charge("acme")
    await charge("acme")
    limited = {"kind": "token", "outcome": "limited"}
    before = REGISTRY.get_sample_value("servegrid_edge_decisions_total", limited)
    with pytest.raises(ResourceExhausted) as refused:
        await charge("acme")
    assert REGISTRY.get_sample_value("servegrid_edge_decisions_total", limited) == (before or 0) + 1
    assert refused.value.reason == "RATE_LIMITED"
    assert refused.value.metadata == {"retry_after_s": "600"}
    assert "retry in 600 s" in refused.value.message
    # The same counters as Envoy's buckets: the tenant's limit was drawn on twice.
    assert ledger.counts[("t=acme", 5)] == 2
    await charge("globex")  # another tenant has its own
    clock.now += 600  # the next window
    await charge("acme")


async def test_an_exchange_fails_open_while_redis_is_down() -> None:
    charge, ledger = _charge(1, {}, Clock(3600.0))
    ledger.down = True
    for _ in range(3):
        await charge("acme")
    ledger.down = False
    await charge("acme")
    with pytest.raises(ResourceExhausted):
        await charge("acme")
