"""Redis read-through cache for models and routes that can never fail a request nor serve a stale write."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from services.registry.metrics import CACHE_REQUESTS

log = logging.getLogger(__name__)

# Values are "<revision>|<payload>"; an empty payload is a tombstone left by an invalidation.
# A write only lands if no newer revision is stored, so a reader that read PostgreSQL before a
# write committed cannot put its stale answer back after the write's invalidation: the
# tombstone carries the write's revision and outranks it (deleting the key would leave that race
# open). KEYS[2] is the kind's floor: a change that touches every entry of a kind (a backend
# change alters every route) raises the floor instead of finding every key, and entries older
# than the floor are neither stored nor served.
_PUT_IF_NEWER = """
local revision = tonumber(ARGV[1])
for i = 2, 1, -1 do
  local current = redis.call('GET', KEYS[i])
  if current then
    local stored = tonumber(string.match(current, '^(%d+)|'))
    if stored and stored > revision then return 0 end
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
"""


class RegistryCache:
    """Keys `<prefix>model:<id>` and `<prefix>route:<id>` hold a JSON payload with its revision;
    `<prefix>floor:<kind>` holds the revision below which no entry of that kind is valid.

    Redis is only ever an accelerator: every error is logged and counted, then the caller falls
    back to PostgreSQL. After an error the cache is skipped for `retry_after_s`, so a hung Redis
    costs one short timeout, not one per request. When Redis answers again, every key under the
    prefix is dropped first: invalidations sent while it was away may have been lost.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        ttl_s: float = 60.0,
        timeout_s: float = 0.1,
        retry_after_s: float = 2.0,
    ) -> None:
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.retry_after_s = retry_after_s
        self.redis: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._put = self.redis.register_script(_PUT_IF_NEWER)
        self._down_until = 0.0
        self._needs_flush = False
        self._flush_lock = asyncio.Lock()

    def key(self, kind: str, ident: str) -> str:
        return f"{self.prefix}{kind}:{ident}"

    def floor_key(self, kind: str) -> str:
        return f"{self.prefix}floor:{kind}"

    async def ping(self) -> None:
        """Health check: raises when Redis does not answer (regardless of the skip window)."""
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    async def get(self, kind: str, ident: str) -> tuple[int, str] | None:
        """(revision, payload) on a hit; None on a miss, a tombstone or any Redis trouble."""
        if not await self._usable():
            CACHE_REQUESTS.labels(kind, "skipped").inc()
            return None
        try:
            raw, floor = await self.redis.mget([self.key(kind, ident), self.floor_key(kind)])
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("get", exc)
            CACHE_REQUESTS.labels(kind, "error").inc()
            return None
        if raw is None:
            CACHE_REQUESTS.labels(kind, "miss").inc()
            return None
        revision, _, payload = _text(raw).partition("|")
        if not payload or (floor is not None and int(_text(floor).split("|")[0]) > int(revision)):
            CACHE_REQUESTS.labels(kind, "miss").inc()
            return None
        CACHE_REQUESTS.labels(kind, "hit").inc()
        return int(revision), payload

    async def put(self, kind: str, ident: str, revision: int, payload: str) -> None:
        """Store what was read from PostgreSQL at `revision`, unless something newer is already there."""
        if not await self._usable():
            return
        try:
            await self._put(keys=[self.key(kind, ident), self.floor_key(kind)], args=[revision, payload, self.ttl_ms])
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("put", exc)

    async def invalidate(self, entries: Iterable[tuple[str, str]], revision: int) -> None:
        """After a commit at `revision`: tombstone the entries it changed so no older read can refill them."""
        pairs = list(entries)
        if not pairs or not await self._usable():
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for kind, ident in pairs:
                    keys = [self.key(kind, ident), self.floor_key(kind)]
                    await self._put(keys=keys, args=[revision, "", self.ttl_ms], client=pipe)
                await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("invalidate", exc)

    async def invalidate_all(self, kind: str, revision: int) -> None:
        """After a commit at `revision` that may change every entry of `kind`: raise the kind's floor."""
        if not await self._usable():
            return
        floor = self.floor_key(kind)
        try:
            await self._put(keys=[floor, floor], args=[revision, "", self.ttl_ms])
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed("invalidate_all", exc)

    async def clear(self) -> None:
        """Drop every key under the prefix (tests and recovery)."""
        await self._delete_matching(f"{self.prefix}*")

    async def _delete_matching(self, pattern: str) -> None:
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            await self.redis.unlink(*batch)

    async def _usable(self) -> bool:
        if time.monotonic() < self._down_until:
            return False
        if self._needs_flush:
            async with self._flush_lock:
                if self._needs_flush:
                    try:
                        await self.clear()
                    except (TimeoutError, RedisError, OSError) as exc:
                        self._failed("flush", exc)
                        return False
                    self._needs_flush = False
                    log.info("cache is back; dropped entries that may have missed invalidations")
        return True

    def _failed(self, operation: str, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "cache unavailable; serving from the database",
                extra={"operation": operation, "error": f"{type(exc).__name__}: {exc}"},
            )
        self._down_until = time.monotonic() + self.retry_after_s
        self._needs_flush = True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
