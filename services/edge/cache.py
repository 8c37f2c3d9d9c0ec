"""Redis read-through cache of API-key lookups, keyed by the key's hash (never the key)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

if TYPE_CHECKING:
    from services.edge.settings import EdgeSettings

log = logging.getLogger(__name__)
# A cached "no such key" lives briefly: enough to absorb a client hammering with a bad key, short
# enough that a key created a moment later works almost at once.
_NEGATIVE_TTL_S = 5


def redis_client(settings: EdgeSettings) -> Any:
    """One client (with its own pool) for counters and the cache; short timeouts keep failures fast."""
    return aioredis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=0,
    )


class KeyCache:
    """Caches {tenant, roles, key_id, revoked} per key hash for `ttl_s` seconds.

    Cache errors never fail a check: the store is the truth, so a Redis outage only costs a
    PostgreSQL query per API-key request.
    """

    def __init__(self, redis: Any, prefix: str, ttl_s: int) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s

    @classmethod
    def connect(cls, settings: EdgeSettings) -> KeyCache:
        return cls(redis_client(settings), settings.redis_prefix, settings.key_cache_ttl_s)

    def _key(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    async def get(self, key_hash: str) -> dict[str, Any] | None:
        try:
            raw = await self.redis.get(self._key(key_hash))
        except Exception as error:
            log.warning("api-key cache read failed", extra={"error": repr(error)})
            return None
        return None if raw is None else dict(json.loads(raw))

    async def put(self, key_hash: str, value: dict[str, Any]) -> None:
        ttl = self.ttl_s if value.get("found") else _NEGATIVE_TTL_S
        try:
            await self.redis.set(self._key(key_hash), json.dumps(value), ex=ttl)
        except Exception as error:
            log.warning("api-key cache write failed", extra={"error": repr(error)})

    async def evict(self, key_hash: str) -> None:
        """Called on revocation, so the revocation takes effect now rather than after the TTL."""
        await self.redis.delete(self._key(key_hash))
