"""One leader among the control planes: it alone runs the watchdog (lost workers, jobs
taken over, reconciliation, held returns); every control plane releases and bookkeeps.

Leadership is a Postgres advisory lock held in an open transaction on a connection of
its own, with ``idle_in_transaction_session_timeout``: a leader that dies loses its
connection, and one that stalls (SIGSTOP, a frozen VM) stops renewing and has its
session ended by Postgres, so the lock passes to another within LEADER_TIMEOUT seconds.
A leader that wakes up finds its connection gone at its next renewal and steps down;
each watchdog round asks ``is_leader`` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from dispatcher.queries import q
from transport.outage import is_outage

log = logging.getLogger(__name__)

# a leader silent this long loses its lock (its session is ended by Postgres)
LEADER_TIMEOUT = 6.0
RENEW_SECONDS = LEADER_TIMEOUT / 4


class Leadership:
    def __init__(self, dsn: str, owner: str) -> None:
        self.dsn = dsn
        self.owner = owner
        self._conn: asyncpg.Connection | None = None
        self._leading = False

    @property
    def is_leader(self) -> bool:
        return self._leading and self._conn is not None and not self._conn.is_closed()

    async def run(self) -> None:
        """Try for the lock, hold it while we can, try again when it is lost."""
        try:
            while True:
                await self.step()
                await asyncio.sleep(RENEW_SECONDS)
        finally:
            await self.close()

    async def step(self) -> None:
        """One round: connect if need be; renew the lock if held, else try for it."""
        try:
            await self._step()
        except Exception as exc:
            if not is_outage(exc) and not isinstance(exc, asyncpg.PostgresError):
                raise
            self._lost(repr(exc))

    async def _step(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self._lost("the connection that held the lock is gone")  # and the lock with it
            self._conn = await asyncpg.connect(self.dsn)
            timeout_ms = int(LEADER_TIMEOUT * 1000)
            await self._conn.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
        if self._leading:
            await self._conn.execute("SELECT 1")  # the transaction is not idle: we are alive
            return
        await self._conn.execute("BEGIN")
        if await self._conn.fetchval(q("try_lead")):
            self._leading = True
            log.info("leading the control planes", extra={"owner": self.owner})
        else:
            await self._conn.execute("ROLLBACK")

    def _lost(self, why: str) -> None:
        if self._leading:
            log.warning("no longer leading the control planes", extra={"owner": self.owner, "error": why})
            self._leading = False
        if self._conn is not None and not self._conn.is_closed():
            self._conn.terminate()
        self._conn = None

    async def close(self) -> None:
        self._leading = False
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None
