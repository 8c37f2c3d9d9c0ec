"""The caller's identity as Envoy asserted it in request headers after verifying a JWT or an API key."""

# Envoy removes every x-servegrid-* and x-jwt-* header a client sends before jwt_authn and ext_authz
# run (envoy/render.py), then sets these from verified claims or from the API key's record. The
# gateway is reachable only through Envoy, so these headers are the verified identity; it never
# parses a token itself.

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TENANT_HEADER = "x-servegrid-tenant"
SUBJECT_HEADER = "x-servegrid-subject"
ROLES_HEADER = "x-servegrid-roles"


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
