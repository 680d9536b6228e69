"""The Postgres bookkeeping behind one small interface. All SQL lives in ``sql/``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from dispatcher import migrate
from dispatcher.leases import Leases
from dispatcher.queries import q
from dispatcher.reads import Reads
from schemas.messages import Heartbeat, JobLog, StatusUpdate
from schemas.states import EVENT_RANK
from schemas.submission import LabelPlan, SubmissionError

log = logging.getLogger(__name__)

# statuses that bring events back to the control plane, to be issued again (return_events)
RETURNS = ("returned", "stopped")
FAILURES = ("failed", "fatal")
_RANK = {**EVENT_RANK, "fatal": EVENT_RANK["failed"]}  # of what a worker reports, as far as it goes
# a task's counts are sampled at most once per SAMPLES_PER_RUN-th of its run so far (the
# monitor draws at most pictures.MAX_SAMPLES of a task's samples)
SAMPLES_PER_RUN = 500


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is: no session state is ever left on one
    (listeners have connections of their own, temporary tables drop at commit, the
    migration lock is released in a ``finally``). The default reset was a round trip
    (RESET ALL, UNLISTEN *, ...) on every release, a few per bookkeeping transaction;
    an open transaction is still rolled back by the pool."""


@dataclass(frozen=True)
class JobToPublish:
    id: int
    workflow_id: int
    task_id: int
    label: str
    payload: dict[str, Any]
    events_per_range: int
    max_attempts: int
    retry_delay: float
    published_upto: int | None = None  # a claimed job's publication reached this event


@dataclass(frozen=True)
class Refused:
    """An update the bookkeeping would not apply: it names no event, or an attempt that
    was never issued (a forged or corrupted status)."""

    job_id: int
    number: int
    attempt: int
    known: bool  # the event exists (so the attempt is what is wrong)

    def reason(self) -> str:
        if not self.known:
            return f"status for unknown event: job {self.job_id} event {self.number}"
        return f"status for an attempt never issued: job {self.job_id} event {self.number} attempt {self.attempt}"


@dataclass(frozen=True)
class Due:
    """An event waiting for the control plane: its next attempt to publish ('retrying',
    or 'queued' when it came back), or its dead letter to write ('failed')."""

    job_id: int
    workflow_id: int
    job_active: bool  # its job may still run (not cancelled or ended meanwhile)
    label: str
    number: int
    status: str
    attempt: int
    issue: int  # which publication of the event this is
    payload: str
    worker: str | None
    error: str | None
    retry_delay: float
    events_per_range: int


@dataclass(frozen=True)
class Applied:
    moved: set[int]  # jobs whose events moved
    refused: list[Refused]  # updates not applied: their messages go to es.dlq
    due: list[Due]  # next attempts and dead letters the control plane must publish


@dataclass(frozen=True)
class Finished:
    jobs: list[tuple[int, str]]  # (job id, status)
    tasks: list[tuple[int, str]]
    workflows: list[tuple[int, str]]


def newest_updates(updates: Iterable[StatusUpdate]) -> list[StatusUpdate]:
    """One update per (event, attempt): the furthest along, keeping the start time of
    an earlier 'running' of the same worker (a batch often holds both 'running' and
    'finished'; another worker's start is not this attempt's)."""
    best: dict[tuple[int, int, int], StatusUpdate] = {}
    for u in updates:
        key = (u.job_id, u.number, u.attempt)
        old = best.get(key)
        if old is None or _RANK[u.status] > _RANK[old.status]:
            if old is not None and u.started_at is None and old.started_at is not None and old.worker == u.worker:
                u = u.model_copy(update={"started_at": old.started_at})
            best[key] = u
    return list(best.values())


def _columns(updates: Sequence[StatusUpdate]) -> list[list[Any]]:
    return [
        [u.job_id for u in updates],
        [u.number for u in updates],
        [u.attempt for u in updates],
        [u.status for u in updates],
        [u.worker for u in updates],
        [u.started_at for u in updates],
        [u.ended_at for u in updates],
        [u.exit_code for u in updates],
        [u.error for u in updates],
    ]


class Store(Reads, Leases):
    """The bookkeeping: the write paths here, the monitor's reads in ``Reads``, the PanDA
    pilots' leases in ``Leases``."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn

    @classmethod
    async def connect(cls, dsn: str, *, max_size: int = 4) -> Store:
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, init=_init_connection, reset=_keep_session
        )
        assert pool is not None
        return cls(pool, dsn)

    async def close(self) -> None:
        await self.pool.close()

    async def upgrade(self) -> list[migrate.Migration]:
        async with self.pool.acquire() as conn:
            return await migrate.upgrade(conn)

    async def schema_version(self) -> int:
        async with self.pool.acquire() as conn:
            return await migrate.current_version(conn)

    # -- submission -------------------------------------------------------------------

    async def insert_workflow(
        self,
        name: str,
        spec: dict[str, Any],
        mapping_path: str,
        plans: Sequence[LabelPlan],
        events: Callable[[dict[str, int]], Iterable[tuple[int, int, str]]],
    ) -> int:
        """Write a whole workflow in one transaction; ``events(task ids by label)`` yields
        ``(task id, number, payload)`` rows, streamed into Postgres with COPY."""
        async with self.pool.acquire() as conn, conn.transaction():
            wf = await conn.fetchval(q("insert_workflow"), name, spec, mapping_path)
            task_ids: dict[str, int] = {}
            for p in plans:
                task_ids[p.label] = await conn.fetchval(
                    q("insert_task"),
                    wf,
                    p.label,
                    p.event_service,
                    p.max_payloads_per_job,
                    p.events_per_range,
                    p.max_attempts,
                    p.request_walltime,
                    p.payload.model_dump(exclude_none=True),
                    p.retry_delay,
                    p.pilot_command,
                    p.job_walltime,
                    p.run_always,
                )
            for p in plans:
                for parent in p.parents:
                    await conn.execute(q("insert_task_dep"), task_ids[p.label], task_ids[parent])
            await conn.execute(q("create_staging"))
            await conn.copy_records_to_table(
                "staging", records=events(task_ids), columns=["task_id", "number", "payload"]
            )
            counts = {r["task_id"]: r["n"] for r in await conn.fetch(q("count_staged"))}
            empty = [label for label, tid in task_ids.items() if not counts.get(tid)]
            if empty:
                raise SubmissionError(f"no mapping entries for label(s): {', '.join(empty)}")
            await conn.execute(q("stage_jobs"))
            await conn.execute(q("insert_jobs"), wf)
            try:
                await conn.execute(q("insert_events"))
            except asyncpg.UniqueViolationError as exc:
                labels = {v: k for k, v in task_ids.items()}
                detail = exc.detail or ""
                raise SubmissionError(f"mapping file repeats an event number ({_dup(detail, labels)})") from None
            await conn.execute(q("count_task_jobs"), wf)
            await conn.execute(q("count_workflow_events"), wf)
            await conn.execute(q("notify_submitted"), wf)
            return int(wf)

    # -- releaser ---------------------------------------------------------------------

    async def release_ready_tasks(self) -> list[asyncpg.Record]:
        """Release tasks whose parents all finished; cancel those that can never run."""
        async with self.pool.acquire() as conn, conn.transaction():
            cancelled: list[asyncpg.Record] = []
            while True:  # cancellation runs down the DAG one level per round
                rows = await conn.fetch(q("cancel_blocked_tasks"))
                if not rows:
                    break
                await conn.execute(q("cancel_task_work"), [r["id"] for r in rows])
                cancelled += rows
            for r in cancelled:
                log.info(
                    "task cancelled: a parent did not finish", extra={"task": r["label"], "workflow": r["workflow_id"]}
                )
            if cancelled:  # that may have been all its workflow was waiting for
                for w in await conn.fetch(q("finish_workflows"), list({r["workflow_id"] for r in cancelled})):
                    log.info("workflow ended", extra={"workflow": w["id"], "status": w["status"]})
            released: list[asyncpg.Record] = await conn.fetch(q("release_ready_tasks"))
            return released

    async def claim_jobs(self, window: int, owner: str | None = None) -> list[int]:
        """Claim pending jobs for ``owner`` up to ``window`` active ones, counted across
        every control plane."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(q("lock_release_window"))
            active = await conn.fetchval(q("count_active_jobs"))
            if active >= window:
                return []
            return [r["id"] for r in await conn.fetch(q("claim_jobs"), window - active, owner)]

    async def reclaim_stale_releasing(self, older_than: float, owner: str | None = None) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(q("reclaim_stale_releasing"), older_than, owner)]

    async def renew_claims(self, owner: str, job_ids: Iterable[int]) -> None:
        await self.pool.execute(q("renew_claims"), owner, list(job_ids))

    async def publishing(self, job_id: int, owner: str | None, lease: float, upto: int) -> bool:
        """Record that ``owner`` publishes the job's ranges up to event ``upto``, if it
        still holds the job; False: it does not (another control plane took it over)."""
        return await self.pool.fetchval(q("publishing"), job_id, owner, lease, upto) is not None

    async def jobs_to_publish(self, job_ids: Sequence[int]) -> list[JobToPublish]:
        rows = await self.pool.fetch(q("jobs_to_publish"), list(job_ids))
        return [JobToPublish(**dict(r)) for r in rows]

    async def job_events(self, job_id: int, after: int | None = None) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(q("job_events"), job_id, after))

    async def mark_jobs_queued(self, job_ids: Sequence[int]) -> None:
        await self.pool.execute(q("mark_jobs_queued"), list(job_ids))

    # -- bookkeeper -------------------------------------------------------------------

    async def apply(
        self,
        updates: Sequence[StatusUpdate],
        logs: Sequence[JobLog] = (),
        heartbeats: Sequence[tuple[str, Heartbeat]] = (),
    ) -> set[int]:
        """Apply a batch of status updates in one transaction; returns the jobs it moved."""
        return (await self.apply_batch(updates, logs, heartbeats)).moved

    async def apply_batch(
        self,
        updates: Sequence[StatusUpdate],
        logs: Sequence[JobLog] = (),
        heartbeats: Sequence[tuple[str, Heartbeat]] = (),
    ) -> Applied:
        """``apply``, also saying which updates were refused and what the control plane
        must publish now (next attempts, dead letters), in one transaction."""
        returns = [u for u in updates if u.status in RETURNS]
        updates = newest_updates(u for u in updates if u.status not in RETURNS)
        cols = _columns(updates)
        due: list[Due] = []
        async with self.pool.acquire() as conn, conn.transaction():
            if heartbeats:
                await conn.executemany(
                    q("upsert_worker"),
                    [
                        (
                            worker,
                            hb.host,
                            hb.pid,
                            hb.slots,
                            hb.state,
                            hb.jobs,
                            hb.events_done,
                            hb.started_at,
                            hb.setting_up,
                        )
                        for worker, hb in heartbeats
                    ],
                )
            result = await conn.fetchrow(q("apply_updates"), *cols)
            moved = set(result["moved"])
            refused = [
                Refused(*r)
                for r in zip(
                    result["refused_jobs"],
                    result["refused_numbers"],
                    result["refused_attempts"],
                    result["refused_known"],
                    strict=True,
                )
            ]
            if returns:
                # the key, attempt, status and worker columns, then the issue given back
                back = await conn.fetch(q("return_events"), *_columns(returns)[:5], [u.issue for u in returns], True)
                moved |= {r["job_id"] for r in back}
            # failures and returns may leave work for the control plane (the usual batch,
            # all running and finished, needs no look)
            pending = [u for u in updates if u.status in FAILURES] + returns
            if pending:
                due = await self._due(conn, [(u.job_id, u.number) for u in pending])
            if moved:
                await conn.execute(q("mark_jobs_running"), list(moved))
            if logs:
                await conn.execute(q("set_job_logs"), [lg.job_id for lg in logs], [lg.path for lg in logs])
            touched = moved | {lg.job_id for lg in logs}
            if touched:
                wfs = [r["workflow_id"] for r in await conn.fetch(q("job_workflows"), list(touched))]
                await conn.execute(q("notify_progress"), wfs)
        return Applied(moved, refused, due)

    @staticmethod
    async def _due(conn: asyncpg.Connection, keys: Sequence[tuple[int, int]]) -> list[Due]:
        rows = await conn.fetch(q("followups"), [k[0] for k in keys], [k[1] for k in keys])
        return [Due(**dict(r)) for r in rows]

    async def published(self, copies: Sequence[tuple[Due, datetime | None]]) -> None:
        """These copies are confirmed in RabbitMQ (a retry's next attempt due then)."""
        await self.pool.execute(
            q("mark_published"),
            [d.job_id for d, _ in copies],
            [d.number for d, _ in copies],
            [d.issue for d, _ in copies],
            [due for _, due in copies],
        )

    async def setup_failed(self, job_id: int, reason: str) -> list[Due]:
        """A worker could not set the job up; returns the dead letters due if that was the
        last chance the job had (as many set-up failures as its task has attempts)."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(q("setup_failed"), job_id, reason)
            return await self._due(conn, [(r["job_id"], r["number"]) for r in rows]) if rows else []

    async def reissue_stale_jobs(self, job_ids: Sequence[int]) -> None:
        """New copies of what has not started in jobs whose queue lost its ranges."""
        await self.pool.execute(q("reissue_stale_jobs"), list(job_ids))

    async def dead_lettered(self, dead: Sequence[Due]) -> None:
        """The dead letters of these failed events are confirmed in es.dlq."""
        await self.pool.execute(q("mark_dead_lettered"), [d.job_id for d in dead], [d.number for d in dead])

    # -- workers and lost work --------------------------------------------------------

    async def mark_lost_workers(self, silent_for: float) -> list[str]:
        return [r["id"] for r in await self.pool.fetch(q("mark_lost_workers"), silent_for)]

    async def return_held(self, silent_for: float) -> list[Due]:
        """Charge the events whose range came back while their holder seemed alive, if
        it has been silent for ``silent_for`` seconds since (or is lost); returns what
        the control plane must publish (their next attempts, or dead letters)."""
        return await self._return_lost("held_returns", silent_for)

    async def return_running_under(self, workers: Sequence[str]) -> list[Due]:
        """Charge the events still running under these lost workers (nothing else would:
        their ranges may have been acked already)."""
        return await self._return_lost("running_under", list(workers)) if workers else []

    async def _return_lost(self, query: str, arg: object) -> list[Due]:
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(q(query), arg)
            if not rows:
                return []
            keys = [(r["job_id"], r["number"]) for r in rows]
            n = len(rows)
            await conn.fetch(
                q("return_events"),
                [k[0] for k in keys],
                [k[1] for k in keys],
                [r["attempt"] for r in rows],
                ["returned"] * n,
                ["control-plane"] * n,
                [r["issue"] for r in rows],
                False,  # the holder is gone
            )
            return await self._due(conn, keys)

    async def active_jobs(self) -> list[int]:
        """Jobs whose queue may hold ranges (the release window: a bounded number)."""
        return [r["id"] for r in await self.pool.fetch(q("active_jobs"))]

    async def jobs_not_being_set_up(self) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(q("jobs_not_being_set_up"))]

    async def unattended_jobs(self) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(q("unattended_jobs"))]

    async def live_workers(self) -> list[dict[str, Any]]:
        return [_jsonable(r) for r in await self.pool.fetch(q("live_workers"))]

    # -- cancel and replay ------------------------------------------------------------

    async def cancel_workflow(self, workflow_id: int) -> list[int] | None:
        """Cancel what is left of a running workflow; returns the jobs that had a queue,
        or None if the workflow is not running."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval("SELECT status FROM workflows WHERE id = $1 FOR UPDATE", workflow_id)
            if status != "running":
                return None
            return [r["id"] for r in await conn.fetch(q("cancel_workflow"), workflow_id)]

    async def dead_event(self, job_id: int, number: int) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self.pool.fetchrow(q("dead_event"), job_id, number)
        return row

    async def replay_event(self, workflow_id: int, job_id: int, number: int, attempt: int) -> asyncpg.Record | None:
        """Give an event that failed at ``attempt`` a fresh attempt; returns its new
        attempt and payload (Postgres's), or None if it was replayed already."""
        async with self.pool.acquire() as conn, conn.transaction():
            replayed: asyncpg.Record | None = await conn.fetchrow(q("replay_event"), job_id, number, attempt)
            if replayed is not None:
                await conn.execute(q("reopen_cancelled_descendants"), workflow_id)
            return replayed

    # -- finisher ---------------------------------------------------------------------

    async def finish(self, job_ids: Iterable[int]) -> Finished:
        """Finish the given jobs if all their events are terminal, then their tasks and
        workflows. Idempotent: each row moves to its end state once."""
        async with self.pool.acquire() as conn, conn.transaction():
            jobs = await conn.fetch(q("finish_jobs"), list(job_ids))
            tasks = await conn.fetch(q("finish_tasks"), list({r["task_id"] for r in jobs})) if jobs else []
            wfs = await conn.fetch(q("finish_workflows"), list({r["workflow_id"] for r in tasks})) if tasks else []
            if tasks:
                await conn.execute(q("notify_progress"), list({r["workflow_id"] for r in tasks}))
        return Finished(
            jobs=[(r["id"], r["status"]) for r in jobs],
            tasks=[(r["id"], r["status"]) for r in tasks],
            workflows=[(r["id"], r["status"]) for r in wfs],
        )

    async def finish_workflows(self, workflow_ids: Sequence[int]) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(q("finish_workflows"), list(workflow_ids))
        return [(r["id"], r["status"]) for r in rows]

    async def unfinished_jobs(self) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(q("unfinished_jobs"))]

    async def stuck_jobs(self) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(q("stuck_jobs"))]

    async def recently_ended_jobs(self, limit: int = 10_000) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(q("recently_ended_jobs"), limit)]

    async def waiting_in_queue(self, job_ids: Sequence[int], claimed_before: float = 0.0) -> dict[int, int]:
        """Events Postgres says wait in each job's queue (jobs with none are left out, and
        jobs claimed less than ``claimed_before`` seconds ago)."""
        rows = await self.pool.fetch(q("waiting_in_queue"), list(job_ids), claimed_before)
        return {r["job_id"]: r["waiting"] for r in rows}

    async def running_workflows(self) -> list[int]:
        return [r["id"] for r in await self.pool.fetch(q("running_workflows"))]

    # -- counters (the watchdog folds them) -------------------------------------------

    async def compact_event_counts(self) -> list[int]:
        """Fold the counters' delta rows (each statement on events and attempts adds
        some), and sample the counts of the tasks that changed. Returns those tasks."""
        async with self.pool.acquire() as conn, conn.transaction():
            changed = [r["task_id"] for r in await conn.fetch(q("compact_event_counts"))]
            await conn.execute(q("compact_attempt_durations"))
            if changed:
                await conn.execute(q("sample_event_counts"), changed, SAMPLES_PER_RUN)
        return changed

    # -- reading ----------------------------------------------------------------------

    async def workflow_status(self, workflow_id: int) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn:
            wf = await conn.fetchrow(q("workflow"), workflow_id)
            if wf is None:
                return None
            tasks = await conn.fetch(q("task_summary"), workflow_id)
            events = await conn.fetch(q("event_counts"), workflow_id)
            jobs = await conn.fetch(q("job_counts"), workflow_id)
        by_task: dict[int, dict[str, Any]] = {}
        for t in tasks:
            by_task[t["id"]] = {**_jsonable(t), "events": {}, "jobs": {}}
        for r in events:
            by_task[r["task_id"]]["events"][r["status"]] = r["n"]
        for r in jobs:
            by_task[r["task_id"]]["jobs"][r["status"]] = r["n"]
        return {**_jsonable(wf), "tasks": list(by_task.values())}

    # -- monitor ----------------------------------------------------------------------

    async def latest_workflows(self, limit: int = 20) -> list[dict[str, Any]]:
        return [_jsonable(r) for r in await self.pool.fetch(q("latest_workflows"), limit)]


def _jsonable(row: asyncpg.Record) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in dict(row).items()}


def _dup(detail: str, labels: dict[int, str]) -> str:
    # detail looks like: Key (task_id, number)=(12, 7) already exists.
    try:
        task_id, number = detail.split("=(", 1)[1].split(")", 1)[0].split(", ")
        return f"label {labels[int(task_id)]!r}, event {number}"
    except (IndexError, ValueError, KeyError):
        return detail
