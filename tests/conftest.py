"""Fixtures every suite shares: the session's PostgreSQL and Redis (tests/support/datastores.py)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.datastores import SessionDatastores, session_datastores

_USED = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def datastores(request: pytest.FixtureRequest) -> Iterator[SessionDatastores]:
    """PostgreSQL and Redis for the whole session: given, local or embedded (started here only when a
    test asks, and stopped by PID at the end). Each test module keeps to its own schema and key prefix."""
    with session_datastores() as stores:
        request.config.stash[_USED] = (
            f"datastores: PostgreSQL {stores.database_origin} at {_address(stores.database_url)}, "
            f"Redis {stores.redis_origin} at {_address(stores.redis_url)}"
        )
        yield stores


def _address(url: str) -> str:
    parts = urlsplit(url)  # host and port only: a given URL may carry a password
    return f"{parts.hostname}:{parts.port}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if _USED in config.stash:
        terminalreporter.write_line(config.stash[_USED])
