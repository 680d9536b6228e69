"""What the monitor and /metrics read of the bookkeeping, one named method per question.

Part of ``Store`` (its base class), apart from the write path in ``store.py``. Rows come
back as dicts for the monitor's pydantic views; nothing here writes.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from dispatcher.queries import q


class Reads:
    pool: asyncpg.Pool

    async def _rows(self, query: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.pool.fetch(q(query), *args)]

    async def _counts(self, query: str, *args: Any) -> dict[str, int]:
        return {r["status"]: r["n"] for r in await self.pool.fetch(q(query), *args)}

    async def job_attempts(self, job_id: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """A job's newest ``limit`` attempts that started (for its timeline), and how many
        started in all."""
        rows = await self._rows("job_attempts", job_id, limit)
        total = await self.pool.fetchval(q("count_job_attempts"), job_id)
        return rows, int(total)

    async def count_samples(self, task_ids: list[int], per_task: int) -> list[dict[str, Any]]:
        """The tasks' counts by state as sampled over their run (about ``per_task`` of
        each, evenly spaced), oldest first: task_id, at, counts."""
        return await self._rows("event_count_samples", task_ids, per_task)

    async def duration_counts(self, task_ids: list[int]) -> list[dict[str, Any]]:
        """The tasks' ended attempts counted by status and duration bucket."""
        return await self._rows("attempt_durations", task_ids)

    async def monitor_task(self, task_id: int) -> dict[str, Any] | None:
        """A task with its workflow's name, its events counted by state."""
        row = await self.pool.fetchrow(q("monitor_task"), task_id)
        if row is None:
            return None
        return {**dict(row), "events": await self._counts("task_event_counts", task_id)}

    async def workflow_spec(self, workflow_id: int) -> dict[str, Any] | None:
        """The submission a workflow was made from, as it was read."""
        spec: dict[str, Any] | None = await self.pool.fetchval(q("workflow_spec"), workflow_id)
        return spec

    async def workflow_exists(self, workflow_id: int) -> bool:
        return await self.pool.fetchrow(q("workflow"), workflow_id) is not None

    async def monitor_workflows(self, limit: int) -> list[dict[str, Any]]:
        """The newest workflows, each with its events counted by state."""
        return await self._rows("monitor_workflows", limit)

    async def task_parents(self, workflow_id: int) -> dict[int, list[str]]:
        """The labels of each task's parents, by task id (tasks without parents absent)."""
        parents: dict[int, list[str]] = {}
        for d in await self.pool.fetch(q("monitor_task_deps"), workflow_id):
            parents.setdefault(d["task_id"], []).append(d["parent"])
        return parents

    async def jobs_page(self, workflow_id: int, after: int, status: str | None, limit: int) -> list[dict[str, Any]]:
        """A workflow's jobs with ids above ``after``, optionally of one state."""
        return await self._rows("monitor_jobs", workflow_id, after, status, limit)

    async def monitor_job(self, job_id: int) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(q("monitor_job"), job_id)
        return dict(row) if row is not None else None

    async def job_event_counts(self, job_id: int) -> dict[str, int]:
        return await self._counts("monitor_job_counts", job_id)

    async def job_events_page(self, job_id: int, after: int, status: str | None, limit: int) -> list[dict[str, Any]]:
        """A job's events numbered above ``after``, optionally of one state."""
        return await self._rows("monitor_job_events", job_id, after, status, limit)

    async def task_events_page(self, task_id: int, after: int, status: str | None, limit: int) -> list[dict[str, Any]]:
        return await self._rows("monitor_task_events", task_id, after, status, limit)

    async def failed_events(self, workflow_id: int | None, limit: int) -> list[dict[str, Any]]:
        """Events out of attempts, of one workflow or all."""
        return await self._rows("monitor_failed_events", workflow_id, limit)

    async def monitor_workers(self) -> list[dict[str, Any]]:
        """Workers live or stopping, and those seen within the hour."""
        return await self._rows("monitor_workers")

    async def event_totals(self) -> dict[str, int]:
        """All events by state."""
        return await self._counts("metrics_events")

    async def attempt_totals(self) -> tuple[int, int]:
        """(attempts after an event's first, all attempts recorded)."""
        row = await self.pool.fetchrow(q("metrics_attempts"))
        assert row is not None  # an aggregate without GROUP BY has one row
        return int(row["retries"]), int(row["attempts"])

    async def worker_totals(self) -> dict[str, int]:
        """All workers by state."""
        return await self._counts("metrics_workers")
