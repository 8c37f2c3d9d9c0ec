"""Which mesh components may call a service: the edges of the data-flow picture, enforced on each call.

Mutual TLS proves who a caller is; this decides whether that caller may use the service at all.
The batch service, which takes the tenant as a request field, answers only the gateway; the edge
only Envoy. Health and reflection stay open to any certified caller (readiness checks use the
operator's certificate).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc

from services.runtime.errors import PermissionDenied, abort_with
from services.runtime.interceptors import WrappingInterceptor, responses
from services.runtime.tls import peer_common_name, peer_names


class PeerAllowlist(WrappingInterceptor):
    """Refuses, with PERMISSION_DENIED (reason PEER_NOT_ALLOWED), any call whose verified certificate
    names none of `allowed`."""

    def __init__(self, service: str, allowed: Collection[str]) -> None:
        super().__init__()
        self.service = service
        self.allowed = frozenset(allowed)

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        auth = context.auth_context()
        if self.allowed.isdisjoint(peer_names(auth)):
            caller = peer_common_name(auth) or "a caller without a certificate name"
            error = PermissionDenied(
                f"{caller} may not call the {self.service} service; it answers only {', '.join(sorted(self.allowed))}",
                reason="PEER_NOT_ALLOWED",
            )
            await abort_with(context, error.to_grpc_status())

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserializer, serializer = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary), deserializer, serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream), deserializer, serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary), deserializer, serializer)
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream), deserializer, serializer)

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(context)
            return await behavior(request, context)

        return call

    def _stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._check(context)
            async for item in responses(behavior(request, context)):
                yield item

        return call
