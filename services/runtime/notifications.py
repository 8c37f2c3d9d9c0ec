"""LISTEN/NOTIFY on a connection of its own that sleeps until PostgreSQL sends something."""

# psycopg's AsyncConnection.notifies() wakes up every 0.1 s to look (its wait interval, there so that
# blocking code can see Ctrl-C); on an idle stack those wake-ups were most of what a listening service
# spent. Here only the socket wakes the loop: libpq hands each notification to a handler as it reads
# it, and the wait looks by itself once a minute (cancelling an asyncio task needs no wake-up).

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import generators, sql

_IDLE_LOOK_S = 60.0


class Listener:
    """A dedicated autocommit connection LISTENing on one channel; `notifications()` yields what arrives
    and raises psycopg.OperationalError when the connection is lost (the caller reconnects)."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], received: deque[psycopg.Notify]) -> None:
        self.conn = conn
        self._received = received

    @classmethod
    async def open(cls, conninfo: str, channel: str) -> Listener:
        """Connect and LISTEN: a change committed once this returns is never missed."""
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        received: deque[psycopg.Notify] = deque()
        conn.add_notify_handler(received.append)  # before LISTEN: nothing that arrives with it is lost
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            await conn.close()
            raise
        return cls(conn, received)

    async def notifications(self) -> AsyncIterator[psycopg.Notify]:
        while True:
            while self._received:
                yield self._received.popleft()
            async with self.conn.lock:
                # Returns once the socket had data (the handler has run for each notification in it).
                await self.conn.wait(generators.notifies(self.conn.pgconn), interval=_IDLE_LOOK_S)

    async def close(self) -> None:
        await self.conn.close()
