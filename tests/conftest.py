"""Fixtures every suite shares: the session's PostgreSQL and Redis (tests/support/datastores.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.datastores import SessionDatastores, session_datastores

_USED = pytest.StashKey[str]()
_WORKERS_USED = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def datastores(request: pytest.FixtureRequest) -> Iterator[SessionDatastores]:
    """PostgreSQL and Redis for the whole session: given, local or embedded (started here only when a
    test asks, and stopped by PID at the end). Each test module keeps to its own schema and key prefix."""
    with session_datastores() as stores:
        used = (
            f"datastores: PostgreSQL {stores.database_origin} at {_address(stores.database_url)}, "
            f"Redis {stores.redis_origin} at {_address(stores.redis_url)}"
        )
        request.config.stash[_USED] = used
        workeroutput = getattr(request.config, "workeroutput", None)  # a pytest-xdist worker's report home
        if workeroutput is not None:
            workeroutput["datastores"] = used
        yield stores


def _address(url: str) -> str:
    parts = urlsplit(url)  # host and port only: a given URL may carry a password
    return f"{parts.hostname}:{parts.port}"


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """Under pytest-xdist each worker has its own datastores: gather what each used for the summary."""
    used = getattr(node, "workeroutput", {}).get("datastores")
    if used:
        node.config.stash.setdefault(_WORKERS_USED, []).append(f"{used} (worker {node.gateway.id})")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = [config.stash[_USED]] if _USED in config.stash else []
    workers: list[str] = config.stash.get(_WORKERS_USED, [])
    for line in lines + sorted(workers):
        terminalreporter.write_line(line)
