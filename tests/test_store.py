"""Submission writing and the bookkeeping state machine, against a real Postgres."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import Heartbeat, StatusUpdate
from tests.conftest import EXAMPLES

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def job_sizes(store: Store, label: str) -> list[int]:
    rows = await store.pool.fetch(
        "SELECT j.n_events FROM jobs j JOIN tasks t ON t.id = j.task_id WHERE t.label = $1 ORDER BY j.seq", label
    )
    return [r["n_events"] for r in rows]


async def test_rubin_example_is_split_into_balanced_jobs_of_at_most_36(store: Store) -> None:
    wf = await submit(store, EXAMPLES / "rubin-isr.yaml")
    # ceil(1000 / 36) = 28 jobs, no short last one: sizes differ by one at most
    sizes = await job_sizes(store, "isr")
    assert sorted(sizes) == [35] * 8 + [36] * 20
    assert sizes[-1] == 35 and sizes[:3] == [36, 36, 36]
    assert await job_sizes(store, "pipeinit") == [1]
    assert await store.pool.fetchval("SELECT count(*) FROM events WHERE status = 'ready'") == 1002
    st = await store.workflow_status(wf)
    assert st is not None and st["n_events"] == 1002
    assert [(t["label"], t["status"], t["n_jobs"]) for t in st["tasks"]] == [
        ("pipeinit", "waiting", 1),
        ("isr", "waiting", 28),
        ("final", "waiting", 1),
    ]
    # each job covers consecutive sorted numbers and records its walltime (600 s x payloads)
    row = await store.pool.fetchrow(
        "SELECT first_number, last_number, walltime FROM jobs j JOIN tasks t ON t.id = j.task_id "
        "WHERE t.label = 'isr' AND j.seq = 1"
    )
    assert (row["first_number"], row["last_number"], row["walltime"]) == (36, 71, 600.0 * 36)


async def test_without_request_walltime_jobs_hold_10(store: Store, tmp_path: Path) -> None:
    data = yaml.safe_load((EXAMPLES / "rubin-isr.yaml").read_text())
    del data["pipetask"]["isr"]["requestWalltime"]
    data["mapping"] = str(EXAMPLES / "rubin-isr-mapping.json")
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(data))
    await submit(store, tmp_path / "wf.yaml")
    assert await job_sizes(store, "isr") == [10] * 100


async def test_gaps_in_event_numbers_are_split_over_sorted_numbers(store: Store, tmp_path: Path) -> None:
    numbers = [100, 3, 7, 50, 51, 2, 9999]
    (tmp_path / "m.json").write_text(json.dumps({"t": {str(n): f"p{n}" for n in numbers}}))
    (tmp_path / "wf.yaml").write_text(
        yaml.safe_dump(
            {
                "mapping": "m.json",
                "enableEventService": "t",
                "maxEventsPerJob": 3,
                "pipetask": {"t": {"payloadCommand": "echo {payload}"}},
            }
        )
    )
    await submit(store, tmp_path / "wf.yaml")
    rows = await store.pool.fetch(
        "SELECT j.seq, array_agg(e.number ORDER BY e.number) AS numbers "
        "FROM events e JOIN jobs j ON j.id = e.job_id GROUP BY j.seq ORDER BY j.seq"
    )
    assert [list(r["numbers"]) for r in rows] == [[2, 3, 7], [50, 51], [100, 9999]]


async def queued_event(store: Store, *, events: int = 1) -> tuple[int, int]:
    """Submit the example and pretend its first job (of at least ``events``) was published."""
    await submit(store, EXAMPLES / "rubin-isr.yaml")
    job_id = await store.pool.fetchval("SELECT min(id) FROM jobs WHERE n_events >= $1", events)
    await store.pool.execute("UPDATE jobs SET status = 'releasing' WHERE id = $1", job_id)
    await store.mark_jobs_queued([job_id])
    number = await store.pool.fetchval("SELECT number FROM events WHERE job_id = $1", job_id)
    return job_id, number


def update(job: int, number: int, attempt: int, status: str, **kw: Any) -> StatusUpdate:
    return StatusUpdate(job_id=job, number=number, attempt=attempt, status=status, worker="w1", **kw)  # type: ignore[arg-type]


async def snapshot(store: Store) -> list[tuple[object, ...]]:
    events = await store.pool.fetch("SELECT * FROM events ORDER BY job_id, number")
    attempts = await store.pool.fetch("SELECT * FROM attempts ORDER BY job_id, number, attempt")
    jobs = await store.pool.fetch("SELECT id, status, log_path FROM jobs ORDER BY id")
    return [tuple(r) for r in [*events, *attempts, *jobs]]


async def state(store: Store, job: int, n: int) -> tuple[str, int]:
    row = await store.pool.fetchrow("SELECT status, attempt FROM events WHERE job_id=$1 AND number=$2", job, n)
    return row["status"], row["attempt"]


async def test_state_machine_moves_forward_only(store: Store) -> None:
    job, n = await queued_event(store)
    assert await state(store, job, n) == ("queued", 1)
    assert await store.apply([update(job, n, 1, "running", started_at=T0)]) == {job}
    assert await state(store, job, n) == ("running", 1)
    assert await store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job) == "running"
    # a failed attempt with attempts left: retrying, and the next attempt is issued
    await store.apply([update(job, n, 1, "failed", started_at=T0, ended_at=T0, exit_code=1)])
    assert await state(store, job, n) == ("retrying", 1)
    await store.apply([update(job, n, 2, "running", started_at=T0)])  # the next attempt wins
    assert await state(store, job, n) == ("running", 2)
    assert await store.apply([update(job, n, 1, "finished", ended_at=T0)]) == set()  # stale attempt
    assert await state(store, job, n) == ("running", 2)
    await store.apply([update(job, n, 2, "finished", started_at=T0, ended_at=T0 + timedelta(seconds=1), exit_code=0)])
    assert await state(store, job, n) == ("finished", 2)
    assert await store.apply([update(job, n, 2, "running")]) == set()  # finished never moves
    assert await state(store, job, n) == ("finished", 2)
    attempts = await store.pool.fetch("SELECT attempt, status FROM attempts ORDER BY attempt")
    assert [tuple(r) for r in attempts] == [(1, "failed"), (2, "finished")]


async def test_applying_the_same_batch_twice_changes_nothing(store: Store) -> None:
    job, n = await queued_event(store)
    batch = [
        update(job, n, 1, "running", started_at=T0),
        update(job, n, 1, "finished", started_at=T0, ended_at=T0 + timedelta(seconds=2), exit_code=0),
        update(job, n + 1, 1, "failed", started_at=T0, ended_at=T0, exit_code=3, error="boom"),
    ]
    await store.apply(batch)
    first = await snapshot(store)
    await store.apply(batch)
    await store.apply(list(reversed(batch)))
    assert await snapshot(store) == first
    row = await store.pool.fetchrow(
        "SELECT status, started_at, exit_code FROM events WHERE job_id=$1 AND number=$2", job, n
    )
    assert (row["status"], row["started_at"], row["exit_code"]) == ("finished", T0, 0)


async def test_older_attempt_after_newer_changes_nothing(store: Store) -> None:
    job, n = await queued_event(store)
    await store.apply([update(job, n, 1, "failed", started_at=T0, ended_at=T0, exit_code=1)])
    await store.apply([update(job, n, 2, "finished", started_at=T0, ended_at=T0, exit_code=0)])
    before = await snapshot(store)
    await store.apply([update(job, n, 1, "running", started_at=T0)])
    await store.apply([update(job, n, 1, "failed", started_at=T0, ended_at=T0, exit_code=1)])
    assert await snapshot(store) == before
    assert await state(store, job, n) == ("finished", 2)


async def test_statuses_for_unknown_events_or_attempts_never_issued_are_refused(store: Store) -> None:
    job, n = await queued_event(store)
    before = await snapshot(store)
    assert await store.apply([update(job + 999, n, 1, "finished"), update(job, 10**9, 1, "running")]) == set()
    assert await snapshot(store) == before
    # a forged 'running' at a future attempt would strand the event running: refused
    applied = await store.apply_batch(
        [update(job, n, 1, "running"), update(job + 999, n, 1, "finished"), update(job, n, 7, "running")]
    )
    assert applied.moved == {job}
    assert sorted((r.job_id, r.number, r.attempt, r.known) for r in applied.refused) == [
        (job, n, 7, True),
        (job + 999, n, 1, False),
    ]
    assert "never issued" in next(r for r in applied.refused if r.known).reason()
    assert await state(store, job, n) == ("running", 1)
    applied = await store.apply_batch([update(job, n, 1, "running")])  # a duplicate: applied, not refused
    assert (applied.moved, applied.refused) == (set(), [])


async def test_a_failed_attempt_with_attempts_left_is_due_for_a_retry_then_a_dead_letter(store: Store) -> None:
    job, n = await queued_event(store)
    await store.pool.execute("UPDATE tasks SET max_attempts = 2")
    applied = await store.apply_batch([update(job, n, 1, "failed", started_at=T0, ended_at=T0, exit_code=3)])
    assert [(d.status, d.attempt, d.number) for d in applied.due] == [("retrying", 1, n)]
    # a status message delivered again (a crash before the retry was published): due again
    again = await store.apply_batch([update(job, n, 1, "failed", started_at=T0, ended_at=T0, exit_code=3)])
    assert [(d.status, d.attempt) for d in again.due] == [("retrying", 1)]
    await store.published([(d, T0) for d in again.due])
    assert await state(store, job, n) == ("retrying", 1)  # its next attempt waits in a delay queue
    assert (await store.apply_batch([update(job, n, 1, "failed", ended_at=T0)])).due == []
    await store.apply([update(job, n, 2, "running", started_at=T0)])
    last = await store.apply_batch([update(job, n, 2, "failed", started_at=T0, ended_at=T0, error="x")])
    assert [(d.status, d.attempt, d.error) for d in last.due] == [("failed", 2, "x")]
    await store.dead_lettered(last.due)
    assert (await store.apply_batch([update(job, n, 2, "failed", ended_at=T0)])).due == []


async def test_returned_events_are_charged_only_if_postgres_saw_them_running(store: Store) -> None:
    job, n = await queued_event(store, events=2)
    n = await store.pool.fetchval("SELECT min(number) FROM events WHERE job_id = $1", job)
    await store.apply([update(job, n, 1, "running", started_at=T0)])
    # n ran under w1, n + 1 never started (a broker failover, or w1's prefetch)
    returned = [
        StatusUpdate(job_id=job, number=k, attempt=1, status="returned", worker="w2", issue=0) for k in (n, n + 1)
    ]
    applied = await store.apply_batch(returned)
    assert sorted((d.number, d.status, d.attempt) for d in applied.due) == [(n, "queued", 2), (n + 1, "queued", 1)]
    assert await state(store, job, n) == ("queued", 2)
    assert await state(store, job, n + 1) == ("queued", 1)
    lost = await store.pool.fetchrow("SELECT * FROM attempts WHERE job_id = $1 AND number = $2", job, n)
    # the history names who lost it, and when it had started
    assert (lost["status"], lost["worker"], lost["started_at"]) == ("failed", "w1", T0)
    assert "lost with its worker w1" in lost["error"]
    assert [d.issue for d in applied.due] == [1, 1]  # new issues: the returned range is stale
    # the same message again (a crash before the new issues were published): still due,
    # nothing charged twice, no third issue
    again = await store.apply_batch(returned)
    assert sorted((d.number, d.attempt, d.issue) for d in again.due) == [(n, 2, 1), (n + 1, 1, 1)]
    assert await store.pool.fetchval("SELECT count(*) FROM attempts") == 1
    # once published, the stale range returned again (by a worker that died before its
    # ack) reissues nothing: one range returned twice is not run twice
    await store.published([(d, None) for d in again.due])
    assert (await store.apply_batch(returned)).due == []
    # a worker that stops an event it runs gives it back at the same attempt
    await store.apply([update(job, n, 2, "running", started_at=T0)])
    stopped = StatusUpdate(job_id=job, number=n, attempt=2, status="stopped", worker="w1", issue=1)
    assert [(d.status, d.attempt) for d in (await store.apply_batch([stopped])).due] == [("queued", 2)]


async def test_deleting_a_workflow_deletes_its_jobs_events_and_attempts(store: Store) -> None:
    # no foreign keys on events and attempts (migration 0005): statement triggers cascade
    job, n = await queued_event(store)
    await store.apply([update(job, n, 1, "finished", started_at=T0, ended_at=T0, exit_code=0)])
    await submit(store, EXAMPLES / "rubin-isr.yaml")  # another workflow, kept whole
    wf = await store.pool.fetchval("SELECT workflow_id FROM jobs WHERE id = $1", job)
    assert await store.pool.fetchval("SELECT count(*) FROM attempts") == 1
    await store.pool.execute("DELETE FROM workflows WHERE id = $1", wf)
    assert await store.pool.fetchval("SELECT count(*) FROM jobs WHERE workflow_id = $1", wf) == 0
    assert await store.pool.fetchval("SELECT count(*) FROM attempts") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM events") == 1002
    orphans = "SELECT count(*) FROM events e LEFT JOIN jobs j ON j.id = e.job_id WHERE j.id IS NULL"
    assert await store.pool.fetchval(orphans) == 0


async def test_finish_is_idempotent_and_releases_children(store: Store) -> None:
    await submit(store, EXAMPLES / "rubin-isr.yaml")
    released = await store.release_ready_tasks()
    assert [r["label"] for r in released] == ["pipeinit"]
    assert await store.release_ready_tasks() == []
    [job] = await store.claim_jobs(window=10)
    await store.mark_jobs_queued([job])
    [n] = [r["number"] for r in await store.job_events(job)]
    assert (await store.finish([job])).jobs == []  # not done yet
    await store.apply([update(job, n, 1, "finished", started_at=T0, ended_at=T0)])
    done = await store.finish([job])
    assert done.jobs == [(job, "finished")] and [s for _, s in done.tasks] == ["finished"]
    assert (await store.finish([job])).jobs == []  # once only
    assert [r["label"] for r in await store.release_ready_tasks()] == ["isr"]


async def test_failed_task_cancels_its_descendants(store: Store) -> None:
    wf = await submit(store, EXAMPLES / "rubin-isr.yaml")
    await store.release_ready_tasks()
    [job] = await store.claim_jobs(window=10)
    await store.mark_jobs_queued([job])
    [n] = [r["number"] for r in await store.job_events(job)]
    await store.pool.execute("UPDATE tasks SET max_attempts = 1")
    await store.apply([update(job, n, 1, "failed", started_at=T0, ended_at=T0, exit_code=1, error="x")])
    done = await store.finish([job])
    assert done.tasks and done.tasks[0][1] == "failed"
    assert await store.release_ready_tasks() == []
    st = await store.workflow_status(wf)
    assert st is not None
    assert {t["label"]: t["status"] for t in st["tasks"]} == {
        "pipeinit": "failed",
        "isr": "cancelled",
        "final": "cancelled",
    }
    assert st["tasks"][1]["events"] == {"cancelled": 1000}
    assert st["status"] == "failed"  # ended with the cancellation: nothing left to run
    assert await store.finish_workflows([wf]) == []  # once only


async def test_release_window_bounds_the_jobs_with_queues(store: Store) -> None:
    await submit(store, EXAMPLES / "rubin-isr.yaml")
    await store.pool.execute("UPDATE tasks SET status = 'released'")
    first = await store.claim_jobs(window=5)
    assert len(first) == 5
    assert await store.claim_jobs(window=5) == []  # window full
    assert len(await store.claim_jobs(window=8)) == 3


async def test_a_released_connection_costs_no_reset_query_but_its_transaction_ends(store: Store) -> None:
    """The pool's connections carry no session state, so a release sends nothing (the
    default reset was a round trip each); a transaction left open is still rolled back."""
    seen: list[str] = []

    def logged(record: asyncpg.connection.LoggedQuery) -> None:
        seen.append(record.query)

    async with store.pool.acquire() as conn:
        # on the connection behind the pool's proxy; it stays registered through the
        # release (what the release sends is what is looked at), until the pool closes
        conn.add_query_logger(logged)
        await conn.fetchval("SELECT 1")
        tx = conn.transaction()
        await tx.start()  # left open on purpose
        await conn.execute("CREATE TEMP TABLE left_open (x int)")
    assert seen[0] == "SELECT 1"
    assert not any("RESET" in q or "UNLISTEN" in q or "advisory" in q for q in seen), seen
    assert seen[-1] == "ROLLBACK"
    async with store.pool.acquire() as conn:  # the rolled-back table is gone
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None


async def test_a_range_returned_after_its_retry_was_issued_runs_nothing_twice(store: Store) -> None:
    # a worker reported the failure, the retry went into a delay queue, and the worker died
    # before acking its range: the redelivered copy must not run that attempt again
    job, n = await queued_event(store)
    await store.apply([update(job, n, 1, "running", started_at=T0)])
    failed = await store.apply_batch([update(job, n, 1, "failed", started_at=T0, ended_at=T0, exit_code=1)])
    await store.published([(d, T0) for d in failed.due])
    returned = StatusUpdate(job_id=job, number=n, attempt=1, status="returned", worker="w2", issue=0)
    assert (await store.apply_batch([returned])).due == []
    assert await state(store, job, n) == ("retrying", 1)
    # the retry's own range returned (its worker held it unstarted and died): issued again
    retry = StatusUpdate(job_id=job, number=n, attempt=2, status="returned", worker="w2", issue=1)
    assert [(d.status, d.attempt) for d in (await store.apply_batch([retry])).due] == [("queued", 2)]
    # before the retry was published (a crash between the commit and the publish), the
    # return finds it due: published once, by whichever comes first
    job2 = await store.pool.fetchval("SELECT min(id) FROM jobs WHERE id > $1", job)
    await store.pool.execute("UPDATE jobs SET status = 'releasing' WHERE id = $1", job2)
    await store.mark_jobs_queued([job2])
    m = await store.pool.fetchval("SELECT min(number) FROM events WHERE job_id = $1", job2)
    await store.apply([update(job2, m, 1, "failed", started_at=T0, ended_at=T0, exit_code=1)])
    back = StatusUpdate(job_id=job2, number=m, attempt=1, status="returned", worker="w2", issue=0)
    assert [(d.status, d.attempt) for d in (await store.apply_batch([back])).due] == [("retrying", 1)]


async def test_a_ready_event_returned_before_its_job_was_marked_queued_is_issued_again(store: Store) -> None:
    # an early-announced job: a worker got a range and gave it back before the releaser
    # marked the job's events queued
    await submit(store, EXAMPLES / "rubin-isr.yaml")
    job = await store.pool.fetchval("SELECT min(id) FROM jobs")
    n = await store.pool.fetchval("SELECT min(number) FROM events WHERE job_id = $1", job)
    stopped = StatusUpdate(job_id=job, number=n, attempt=1, status="stopped", worker="w1", issue=0)
    assert [(d.status, d.attempt, d.issue) for d in (await store.apply_batch([stopped])).due] == [("queued", 1, 1)]


async def test_a_job_nobody_can_set_up_fails_instead_of_being_announced_for_ever(store: Store) -> None:
    job, n = await queued_event(store)
    await store.pool.execute("UPDATE tasks SET max_attempts = 2")
    assert await store.setup_failed(job, "set-up failed: exit code 1") == []
    [due] = await store.setup_failed(job, "set-up failed: exit code 1")
    assert (due.status, due.number, due.error) == ("failed", n, "set-up failed: exit code 1")
    assert (await store.finish([job])).jobs == [(job, "failed")]


def beat() -> Heartbeat:
    return Heartbeat(host="h", pid=1, slots=1, state="live", started_at=T0)


async def held_event(store: Store) -> tuple[int, int]:
    """An event running under a live worker w1 whose range came back (w2 returned it):
    as when w1's node of a RabbitMQ cluster dies and w1 reconnects elsewhere."""
    job, n = await queued_event(store)
    await store.apply([update(job, n, 1, "running", started_at=T0)], heartbeats=[("w1", beat())])
    returned = StatusUpdate(job_id=job, number=n, attempt=1, status="returned", worker="w2", issue=0)
    assert (await store.apply_batch([returned])).due == []
    return job, n


async def test_a_range_returned_while_its_holder_lives_charges_nothing(store: Store) -> None:
    job, n = await held_event(store)
    assert await state(store, job, n) == ("running", 1)  # left to its holder
    assert await store.pool.fetchval("SELECT returned_at IS NOT NULL FROM events WHERE job_id = $1", job)
    assert await store.return_held(60.0) == []  # not silent for long yet
    await store.apply([], heartbeats=[("w1", beat())])  # the holder is heard from after it
    assert await store.return_held(0.0) == []  # its own again
    assert not await store.pool.fetchval("SELECT returned_at IS NOT NULL FROM events WHERE job_id = $1", job)
    await store.apply([update(job, n, 1, "finished", started_at=T0, ended_at=T0, exit_code=0)])
    assert await state(store, job, n) == ("finished", 1)
    attempts = await store.pool.fetch("SELECT attempt, status FROM attempts WHERE job_id = $1", job)
    assert [tuple(r) for r in attempts] == [(1, "finished")]  # no phantom attempt


async def test_a_held_event_whose_holder_stays_silent_is_charged(store: Store) -> None:
    job, n = await held_event(store)
    due = await store.return_held(0.0)
    assert [(d.number, d.status, d.attempt) for d in due] == [(n, "queued", 2)]
    assert await state(store, job, n) == ("queued", 2)
    lost = await store.pool.fetchrow("SELECT status, error FROM attempts WHERE job_id = $1 AND attempt = 1", job)
    assert lost["status"] == "failed" and "lost with its worker w1" in lost["error"]
    assert await store.return_held(0.0) == []  # charged once


async def test_events_running_under_a_lost_worker_are_charged(store: Store) -> None:
    job, n = await queued_event(store)
    await store.apply([update(job, n, 1, "running", started_at=T0)], heartbeats=[("w1", beat())])
    assert await store.return_running_under(["w2"]) == []  # not w2's
    assert await store.mark_lost_workers(0.0) == ["w1"]
    due = await store.return_running_under(["w1"])
    assert [(d.number, d.status, d.attempt) for d in due] == [(n, "queued", 2)]
    assert await store.return_running_under(["w1"]) == []  # and only once
