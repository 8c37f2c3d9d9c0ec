"""Per-tenant and per-route request limits in fixed windows, and the Redis ledger that leases them out."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class Limit:
    """One limit a bucket draws on: `requests` per window, counted under `counter`."""

    counter: str  # the Redis key part that names what is counted: "t=acme" or "t=acme|r=infer"
    requests: int
    name: str  # shown to operators and in logs: "tenant:acme", "route:acme/infer"


class LimitPolicy:
    """The one place that maps a tenant and a route to the limits that govern them.

    Envoy's buckets are (tenant, route), route being the rate-limit name of the route (services/mesh/
    routes.py: infer, gateway, admin, kserve; and auth-token, which the edge charges itself: quota.py
    DirectCharge). A bucket always draws on the tenant's limit (its override, else the default), and
    also on a route limit when one names "tenant/route" or "route":
    hierarchical accounting, so a tenant's routes share its limit while one route can be held lower.
    """

    def __init__(self, default_limit: int, tenant_limits: Mapping[str, int], route_limits: Mapping[str, int]) -> None:
        self.default_limit = default_limit
        self.tenant_limits = dict(tenant_limits)
        self.route_limits = dict(route_limits)

    def limits_for(self, tenant: str, route: str) -> tuple[Limit, ...]:
        """The tenant's limit, then the route's when one is set; nothing for a bucket without a tenant."""
        if not tenant:
            return ()
        limits = [Limit(f"t={tenant}", self.tenant_limits.get(tenant, self.default_limit), f"tenant:{tenant}")]
        route_limit = self.route_limits.get(f"{tenant}/{route}", self.route_limits.get(route)) if route else None
        if route_limit is not None:
            limits.append(Limit(f"t={tenant}|r={route}", route_limit, f"route:{tenant}/{route}"))
        return tuple(limits)


@dataclass(frozen=True)
class Window:
    """One fixed window: [index * length_s, (index + 1) * length_s) in Unix seconds."""

    index: int
    length_s: int

    @property
    def end(self) -> float:
        return float((self.index + 1) * self.length_s)

    def seconds_left(self, now: float) -> float:
        return max(self.end - now, 0.0)


class WindowClock:
    """Which window `now` falls in. Windows start on multiples of their length since the epoch, so every
    edge replica (and Envoy, for its retry-after header) agrees on them without talking."""

    def __init__(self, length_s: int, clock: Callable[[], float] = time.time) -> None:
        self.length_s = length_s
        self.clock = clock

    def now(self) -> float:
        return self.clock()

    def current(self) -> Window:
        return Window(int(self.clock() // self.length_s), self.length_s)


# Refund, then grant, as one atomic step over every counter the bucket draws on. ARGV[1] is the refund:
# the unused part of the bucket's previous lease (negative when Envoy reported more use than it was
# leased: that use is charged now, even past the limit, because it happened). ARGV[2] is the lease
# wanted, ARGV[3] the key TTL, ARGV[3 + i] the limit of KEYS[i]. The grant is what fits under every
# limit: counters never pass a limit by a grant, so any number of edge replicas sharing the Redis never
# lease more than the limit between them.
_LEASE_SCRIPT = """
local refund = tonumber(ARGV[1])
local grant = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local used = {}
for i, key in ipairs(KEYS) do
  local count
  if refund ~= 0 then  -- (never INCRBY -0: Lua writes it as "-0", which Redis refuses as an integer)
    count = redis.call('INCRBY', key, 0 - refund)
    if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
  else
    count = tonumber(redis.call('GET', key) or '0')
  end
  used[i] = count
  local room = tonumber(ARGV[3 + i]) - count
  if room < grant then grant = room end
end
if grant < 0 then grant = 0 end
if grant > 0 then
  for i, key in ipairs(KEYS) do
    used[i] = redis.call('INCRBY', key, grant)
    if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
  end
end
return {grant, used[1]}
"""


@dataclass(frozen=True)
class Grant:
    """What the ledger leased: `tokens` (0: nothing left) and the first counter's value after it."""

    tokens: int
    used: int


class RedisQuotaLedger:
    """Fixed-window counters in Redis that count what was leased to Envoys, net of refunds.

    The window is in the key, so a new window starts from zero without a reset race, and keys expire
    after two windows (longer than one, so clock skew between replicas cannot reuse a key).
    """

    def __init__(self, redis: Any, prefix: str, domain: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.domain = domain
        # redis-py's Script: EVALSHA, reloading the script when Redis forgot it (restart, SCRIPT FLUSH).
        self._script = redis.register_script(_LEASE_SCRIPT)

    def key(self, limit: Limit, window: Window) -> str:
        return f"{self.prefix}rl:{self.domain}:{limit.counter}:{window.index}"

    async def lease(self, window: Window, limits: Sequence[Limit], *, refund: int, want: int) -> Grant:
        keys = [self.key(limit, window) for limit in limits]
        args = [refund, want, window.length_s * 2, *(limit.requests for limit in limits)]
        tokens, used = await self._script(keys=keys, args=args)
        return Grant(int(tokens), int(used))


def lease_floor(limits: Sequence[Limit], fraction: float) -> int:
    """The smallest lease worth sending: a share of the tightest limit, at least one token."""
    tightest = min((limit.requests for limit in limits), default=0)
    return max(1, math.ceil(tightest * fraction))
