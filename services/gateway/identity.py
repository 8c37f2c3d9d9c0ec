"""The caller's identity as Envoy asserted it in request headers after verifying a JWT or an API key."""

# Envoy removes every x-servegrid-* and x-jwt-* header a client sends before jwt_authn and ext_authz
# run (services/mesh/auth.py), then sets these from verified claims or from the API key's record. The
# gateway never parses a token itself: with mutual TLS it believes these headers only on a connection
# whose verified certificate names Envoy (IdentityPolicy); anyone else's are ignored, as if absent.

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from services.mesh.names import ROLES_HEADER, SUBJECT_HEADER, TENANT_HEADER
from services.runtime.tls import peer_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Identity:
    """Who is calling: a tenant, a subject within it and the subject's roles."""

    tenant: str
    subject: str
    roles: frozenset[str]

    @property
    def anonymous(self) -> bool:
        return not self.tenant


ANONYMOUS = Identity("", "", frozenset())


def identity_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Identity:
    """Read the identity headers; ANONYMOUS when Envoy set none (a direct, unproxied call)."""
    values: dict[str, str] = {}
    for key, value in metadata or ():
        if key in (TENANT_HEADER, SUBJECT_HEADER, ROLES_HEADER) and isinstance(value, str):
            values[key] = value
    roles = frozenset(r.strip() for r in values.get(ROLES_HEADER, "").replace(" ", ",").split(",") if r.strip())
    return Identity(values.get(TENANT_HEADER, ""), values.get(SUBJECT_HEADER, ""), roles)


@dataclass(frozen=True)
class IdentityPolicy:
    """Whose identity headers the gateway believes.

    With mutual TLS (`mtls`), only a peer whose verified certificate names one of `trusted_peers`
    (Envoy) may assert an identity: a direct caller, even another component with a valid
    certificate, is anonymous. Without TLS every caller is believed (today's tests and simple
    deployments, where the network alone keeps callers out): `warn_if_open` says so in the log.
    """

    mtls: bool
    trusted_peers: frozenset[str] = frozenset({"envoy"})

    def warn_if_open(self) -> None:
        if not self.mtls:
            log.warning(
                "mutual TLS is off: identity headers (x-servegrid-tenant, -subject, -roles) are trusted from any "
                "caller that can reach this port; set the TLS certificate, key and CA to accept them from Envoy only"
            )

    def trusts(self, context: grpc.aio.ServicerContext) -> bool:
        return not self.mtls or not self.trusted_peers.isdisjoint(peer_names(context.auth_context()))

    def identity(
        self, context: grpc.aio.ServicerContext, metadata: Iterable[tuple[str, str | bytes]] | None = None
    ) -> Identity:
        """The caller's identity, or ANONYMOUS when the headers came from a peer that may not set them.
        `metadata`: the call's, when the caller already read it (the hot path reads it once)."""
        if not self.trusts(context):
            return ANONYMOUS
        return identity_from_metadata(context.invocation_metadata() if metadata is None else metadata)


OPEN_POLICY = IdentityPolicy(mtls=False)
