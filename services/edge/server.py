"""Composition root of the edge service: RLS and ext_authz on Redis and PostgreSQL."""

from __future__ import annotations

from typing import Any

import grpc

from services.edge.authz import ApiKeyAuthorizer, AuthorizationServicer
from services.edge.cache import KeyCache, redis_client
from services.edge.envoy_api import external_auth_pb2, rls_pb2
from services.edge.keys import ApiKeyStore, open_pool
from services.edge.limits import UNIT_SECONDS, LimitPolicy, RedisWindowCounter
from services.edge.ratelimit import RateLimiter, RateLimitServicer
from services.edge.settings import EdgeSettings
from services.runtime import ServiceApp

RLS_SERVICE = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
AUTHZ_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name


def _generic(service: str, method: str, behavior: Any, request_type: Any) -> grpc.GenericRpcHandler:
    handler = grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=request_type.FromString, response_serializer=lambda m: m.SerializeToString()
    )
    return grpc.method_handlers_generic_handler(service, {method: handler})


def build_app(settings: EdgeSettings) -> ServiceApp:
    app = ServiceApp("edge", settings)
    redis = redis_client(settings)
    pool = open_pool(settings.database_url)
    store = ApiKeyStore(pool, settings.db_schema)
    counter = RedisWindowCounter(redis, settings.redis_prefix, UNIT_SECONDS[settings.limit_unit])
    policy = LimitPolicy(settings.default_limit, settings.tenant_limits, settings.route_limits)
    limiter = RateLimiter(settings.ratelimit_domain, policy, counter)
    authorizer = ApiKeyAuthorizer(store, KeyCache(redis, settings.redis_prefix, settings.key_cache_ttl_s))

    # Envoy calls these once per request: they skip the runtime's per-call interceptor (they map
    # their own errors with context.abort and count their own decisions), which saves a noticeable
    # share of each call's CPU.
    rls = RateLimitServicer(limiter)
    authz = AuthorizationServicer(authorizer)
    app.add_generic_handler(
        _generic(RLS_SERVICE, "ShouldRateLimit", rls.ShouldRateLimit, rls_pb2.RateLimitRequest),
        RLS_SERVICE,
        passthrough_methods=[f"/{RLS_SERVICE}/ShouldRateLimit"],
    )
    app.add_generic_handler(
        _generic(AUTHZ_SERVICE, "Check", authz.Check, external_auth_pb2.CheckRequest),
        AUTHZ_SERVICE,
        passthrough_methods=[f"/{AUTHZ_SERVICE}/Check"],
    )

    async def open_store() -> None:
        await pool.open(wait=True, timeout=10)
        await store.migrate()

    async def ping_redis() -> None:
        await redis.ping()

    async def close_redis() -> None:
        await redis.aclose()

    app.on_startup(open_store)
    app.on_shutdown(pool.close)
    app.on_shutdown(close_redis)
    app.health.add_component("database", store.ping)
    # Optional: without Redis, keys still verify (from PostgreSQL) and limits fail open.
    app.health.add_component("cache", ping_redis, required=False)
    return app
