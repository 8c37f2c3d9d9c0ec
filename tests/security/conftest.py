"""One front door (Envoy, edge, gateway, stand-in registry, PostgreSQL, Redis) for the whole adversarial suite.

Package-scoped: every module attacks the same stack, so the suite starts one Envoy (two with batch) on
CI's two cores. No Triton: the refusals happen before any model is reached."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.security.support import NO_TRITON, ROUTE_LIMITS, TENANT_A, TENANT_B, Keys
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, edge_stack


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[EdgeStack]:
    settings = {"SERVEGRID_EDGE_ROUTE_LIMITS": json.dumps(ROUTE_LIMITS)}
    state = tmp_path_factory.mktemp("security")
    with edge_stack(state, datastores, NO_TRITON, {}, NO_TRITON, edge_settings=settings) as running:
        yield running


@pytest.fixture(scope="package")
def keys(stack: EdgeStack) -> Keys:
    user_id, user = stack.create_key(TENANT_A, "user")
    _, admin = stack.create_key(TENANT_A, "user", "admin")
    revoked_id, revoked = stack.create_key(TENANT_A, "user")
    assert stack.keys_cli("revoke", revoked_id).returncode == 0
    _, other = stack.create_key(TENANT_B, "user")
    return Keys(user_id, user, admin, revoked, other)
