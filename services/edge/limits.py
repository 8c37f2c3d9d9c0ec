"""Fixed-window request limits per tenant (and optionally per route), counted atomically in Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from services.edge.resp import RespConnection, RespError, encode_evalsha

UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
TENANT_KEY = "tenant"
ROUTE_KEY = "route"


@dataclass(frozen=True)
class Limit:
    """One limit that applies to a descriptor: `requests` per window, counted under `counter`."""

    counter: str  # the Redis key suffix that identifies what is counted, e.g. "t=acme" or "t=acme|r=infer"
    requests: int
    name: str  # shown to operators (RLS current_limit.name)


@dataclass(frozen=True)
class Verdict:
    """The decision for one descriptor: None limit means nothing limits it."""

    limit: Limit | None
    used: int = 0
    reset_s: int = 0

    @property
    def over(self) -> bool:
        return self.limit is not None and self.used > self.limit.requests

    @property
    def remaining(self) -> int:
        return 0 if self.limit is None else max(self.limit.requests - self.used, 0)


class LimitPolicy:
    """Maps an Envoy descriptor to the limit that governs it.

    Descriptors Envoy sends (see envoy/render.py):
      [("tenant", T)]                  → the tenant's limit (its override, else the default)
      [("tenant", T), ("route", R)]    → "T/R" or "R" from route_limits, else unlimited
    Anything else is not ours to limit and passes.
    """

    def __init__(self, default_limit: int, tenant_limits: Mapping[str, int], route_limits: Mapping[str, int]) -> None:
        self.default_limit = default_limit
        self.tenant_limits = dict(tenant_limits)
        self.route_limits = dict(route_limits)

    def limit_for(self, entries: Sequence[tuple[str, str]]) -> Limit | None:
        keys = [k for k, _ in entries]
        values = dict(entries)
        tenant = values.get(TENANT_KEY, "")
        if keys == [TENANT_KEY] and tenant:
            requests = self.tenant_limits.get(tenant, self.default_limit)
            return Limit(f"t={tenant}", requests, f"tenant:{tenant}")
        if keys == [TENANT_KEY, ROUTE_KEY] and tenant:
            route = values[ROUTE_KEY]
            requests_or_none = self.route_limits.get(f"{tenant}/{route}", self.route_limits.get(route))
            if requests_or_none is None:
                return None
            return Limit(f"t={tenant}|r={route}", requests_or_none, f"route:{tenant}/{route}")
        return None


# INCRBY and, when the key is new, EXPIRE, as one atomic step: the count a hit gets back is exact no
# matter how many replicas share the Redis, and a key never lives without its expiry.
_HIT_SCRIPT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
if count == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return count
"""


class RedisWindowCounter:
    """Counts hits per fixed window in Redis; concurrent hits share round trips.

    Each hit is its own atomic script call (INCRBY + EXPIRE), so any number of edge replicas (and
    the Envoys in front of them) sharing one Redis count every hit exactly once; the window start
    is in the key, so a new window starts from zero without a reset race. Hits that arrive while a
    round trip is in flight wait for the next one and go together in one pipeline: under load that
    turns hundreds of Redis calls per second into a few dozen, which is what lets one Python
    process answer Envoy's per-request RLS calls.
    """

    def __init__(
        self,
        redis: Any,
        prefix: str,
        window_s: int,
        clock: Callable[[], float] = time.time,
        *,
        hot: RespConnection | None = None,
    ) -> None:
        self.redis = redis  # redis-py: loads the script
        self.hot = hot or _connection_of(redis)  # the bare connection the hits go through
        self.prefix = prefix
        self.window_s = window_s
        self.clock = clock
        self._sha: bytes | None = None
        self._pending: list[tuple[str, int, asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def hit(self, domain: str, limits: Sequence[Limit], hits: int) -> tuple[list[int], int]:
        """Add `hits` to every limit's counter; returns the counts after the hit and seconds to reset."""
        now = self.clock()
        window = int(now // self.window_s)
        reset_s = max(int((window + 1) * self.window_s - now), 1)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[int]] = []
        for limit in limits:
            future: asyncio.Future[int] = loop.create_future()
            self._pending.append((f"{self.prefix}rl:{domain}:{limit.counter}:{window}", hits, future))
            futures.append(future)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return [await f for f in futures], reset_s

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    counts = await self._send(batch)
                except Exception as error:
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (*_, future), count in zip(batch, counts, strict=True):
                    if not future.done():
                        future.set_result(int(count))
        finally:
            self._flusher = None

    async def _send(self, batch: Sequence[tuple[str, int, asyncio.Future[int]]]) -> list[int]:
        ttl = self.window_s * 2  # longer than the window, so clock skew between replicas cannot reuse a key
        replies: list[int | RespError] = [RespError("NOSCRIPT not sent yet")] * len(batch)
        # Redis forgets scripts on restart or SCRIPT FLUSH: load once, and on NOSCRIPT reload and
        # resend only the calls that got it (a NOSCRIPT call ran nothing, so each hit counts once).
        for attempt in (1, 2):
            todo = [i for i, r in enumerate(replies) if isinstance(r, RespError) and str(r).startswith("NOSCRIPT")]
            if not todo:
                break
            if attempt == 2 or self._sha is None:
                self._sha = str(await self.redis.script_load(_HIT_SCRIPT)).encode()
            sent = await self.hot.call_many([encode_evalsha(self._sha, batch[i][0], batch[i][1], ttl) for i in todo])
            for i, reply in zip(todo, sent, strict=True):
                replies[i] = reply
        counts: list[int] = []
        for reply in replies:
            if isinstance(reply, RespError):
                raise reply
            counts.append(reply)
        return counts


def _connection_of(redis: Any) -> RespConnection:
    """A bare connection to the same server, database and credentials as a redis-py client."""
    kwargs = redis.connection_pool.connection_kwargs
    host, port, db = kwargs.get("host", "127.0.0.1"), kwargs.get("port", 6379), kwargs.get("db", 0)
    user, password = kwargs.get("username"), kwargs.get("password")
    auth = f"{quote(user or '')}:{quote(password)}@" if password else ""
    return RespConnection(f"redis://{auth}{host}:{port}/{db}", kwargs.get("socket_timeout") or 1.0)
