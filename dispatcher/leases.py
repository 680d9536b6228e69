"""What the PanDA pilot API (``dispatcher.pilot``) keeps in the bookkeeping: pilots as
workers under leases, and the events they were handed.

Part of ``Store`` (a base class), next to ``Reads``. A pilot holding job J is the worker
``pilot:J``. Its heartbeat is its HTTP calls; it is lost when silent for longer than its
lease (``workers.lease_seconds``), and then the watchdog charges what it held exactly as
for a native worker that stopped sending heartbeats (``mark_lost_workers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from dispatcher.queries import q


def pilot_of(job_id: int) -> str:
    """The worker name of the pilot holding a job."""
    return f"pilot:{job_id}"


@dataclass(frozen=True)
class PilotJob:
    """A job as a pilot's calls name it."""

    id: int
    task_id: int
    workflow_id: int
    status: str
    n_events: int
    label: str
    pilot_command: str | None  # what a pilot runs for it (the label's pilotCommand)
    max_attempts: int
    workflow: str

    @property
    def active(self) -> bool:
        return self.status in ("releasing", "queued", "running")


class Leases:
    pool: asyncpg.Pool

    async def pilot_job(self, job_id: int) -> PilotJob | None:
        row = await self.pool.fetchrow(q("pilot_job"), job_id)
        return None if row is None else PilotJob(**{k: row[k] for k in row.keys()})

    async def pilot_take_job(self, host: str, lease: float, cores: int) -> int | None:
        """getJob: a job with events waiting that no live pilot holds becomes the job of
        a new pilot; None when there is none."""
        job_id: int | None = await self.pool.fetchval(q("pilot_take_job"), host, lease, cores)
        return job_id

    async def pilot_seen(self, job_id: int, host: str, lease: float) -> None:
        """The pilot of a job called: its lease runs from now."""
        await self.pool.execute(q("pilot_seen"), pilot_of(job_id), host, job_id, lease)

    async def pilot_lease(self, job_id: int, events: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
        """Hand the events of a range (number, attempt, issue) to the job's pilot, before
        its message is acked; returns the (number, attempt) handed (a stale copy hands
        nothing)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                q("pilot_lease"),
                job_id,
                pilot_of(job_id),
                [e[0] for e in events],
                [e[1] for e in events],
                [e[2] for e in events],
            )
            if rows:
                await conn.execute(q("mark_jobs_running"), [job_id])
                wfs = [r["workflow_id"] for r in await conn.fetch(q("job_workflows"), [job_id])]
                await conn.execute(q("notify_progress"), wfs)
        return [(r["number"], r["attempt"]) for r in rows]

    async def pilot_more_may_come(self, job_id: int) -> bool:
        """Whether the job may still have events for its pilot other than those it holds."""
        return bool(await self.pool.fetchval(q("pilot_outstanding"), job_id, pilot_of(job_id)))

    async def pilot_holds(self, job_id: int, attempts: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        """Of these (number, attempt), those the job's pilot was handed and that are still
        the events' last attempts."""
        rows = await self.pool.fetch(
            q("pilot_holds"), job_id, pilot_of(job_id), [a[0] for a in attempts], [a[1] for a in attempts]
        )
        return {(r["number"], r["attempt"]) for r in rows}

    async def pilot_stop(self, job_id: int) -> list[tuple[int, int, int]]:
        """The job's pilot says its job ended: it is stopped (so that what it still runs is
        charged when given back), and what it still runs is returned: (number, attempt, issue)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(q("pilot_stop"), pilot_of(job_id))
            rows = await conn.fetch(q("pilot_running"), job_id, pilot_of(job_id))
        return [(r["number"], r["attempt"], r["issue"]) for r in rows]

    async def pilot_available(self, job_id: int) -> int:
        return int(await self.pool.fetchval(q("pilot_available"), job_id))

    async def task_label(self, task_id: int) -> str | None:
        label: str | None = await self.pool.fetchval(q("task_label"), task_id)
        return label

    async def task_mapping(self, task_id: int) -> dict[str, str]:
        """A task's events as a mapping file has them: number (a string) -> payload."""
        return {str(r["number"]): r["payload"] for r in await self.pool.fetch(q("task_mapping"), task_id)}
