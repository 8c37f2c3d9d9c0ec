"""Composition root of the edge service: the rate-limit quota server and ext_authz on Redis and PostgreSQL."""

from __future__ import annotations

from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.rate_limit_quota.v3 import rlqs_pb2

from services.edge.authz import ApiKeyAuthorizer, AuthorizationServicer
from services.edge.cache import KeyCache, redis_client
from services.edge.keys import ApiKeyStore, open_pool
from services.edge.limits import UNIT_SECONDS, LimitPolicy, RedisQuotaLedger, WindowClock
from services.edge.quota import DirectCharge, QuotaService, QuotaTuning, RateLimitQuotaServicer
from services.edge.settings import EdgeSettings
from services.edge.tokens import add_token_exchange
from services.mesh import names
from services.runtime import ServiceApp

RLQS_SERVICE = rlqs_pb2.DESCRIPTOR.services_by_name["RateLimitQuotaService"].full_name
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
    quota = QuotaService(
        settings.ratelimit_domain,
        LimitPolicy(settings.default_limit, settings.tenant_limits, settings.route_limits),
        RedisQuotaLedger(redis, settings.redis_prefix, settings.ratelimit_domain),
        WindowClock(UNIT_SECONDS[settings.limit_unit]),
        QuotaTuning(settings.quota_lease_fraction, settings.quota_demand_reports, settings.quota_assignment_ttl_s),
    )
    authorizer = ApiKeyAuthorizer(store, KeyCache(redis, settings.redis_prefix, settings.key_cache_ttl_s))

    # Rate limits cost no call per request: each Envoy holds one quota stream (usage reports every few
    # seconds, leases back). Envoy calls ext_authz once per API-key request: it skips the runtime's
    # per-call interceptor (it maps its own errors with context.abort and counts its own decisions),
    # which saves a noticeable share of each call's CPU; so does the long-lived quota stream, which
    # the interceptor would otherwise hold open as one endless call.
    rlqs = RateLimitQuotaServicer(quota)
    stream = grpc.stream_stream_rpc_method_handler(
        rlqs.StreamRateLimitQuotas,
        request_deserializer=rlqs_pb2.RateLimitQuotaUsageReports.FromString,
        response_serializer=lambda m: m.SerializeToString(),
    )
    app.add_generic_handler(
        grpc.method_handlers_generic_handler(RLQS_SERVICE, {"StreamRateLimitQuotas": stream}),
        RLQS_SERVICE,
        passthrough_methods=[f"/{RLQS_SERVICE}/StreamRateLimitQuotas"],
    )
    authz = AuthorizationServicer(authorizer)
    app.add_generic_handler(
        _generic(AUTHZ_SERVICE, "Check", authz.Check, external_auth_pb2.CheckRequest),
        AUTHZ_SERVICE,
        passthrough_methods=[f"/{AUTHZ_SERVICE}/Check"],
    )

    # API key → short-lived JWT, which Envoy then verifies itself (services/edge/tokens.py); each
    # exchange counts against the key's tenant like any request (Envoy cannot: no tenant yet).
    add_token_exchange(app, settings, store, DirectCharge(quota, names.EXCHANGE_ROUTE))

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
