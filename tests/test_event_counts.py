"""The event counters (migration 0011): every statement on events keeps them, in its own
transaction, so that a count by state reads a few rows instead of every event; and the
watchdog's fold neither loses nor doubles a delta while bookkeepers write beside it."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx

from dispatcher.monitor import MonitorConfig, create_app
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import StatusUpdate
from tests.test_failures import assert_counts_kept, write_workflow
from tests.test_store import T0

STATES = ("queued", "running", "finished", "failed", "retrying")


async def test_every_kind_of_statement_on_events_keeps_the_counts(store: Store, tmp_path: Path) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"a": [f"ok:{i}" for i in range(40)], "b": ["ok:b"]}, per_job=8))
    await assert_counts_kept(store)  # the submission's insert
    await store.release_ready_tasks()
    jobs = await store.claim_jobs(10)
    await store.mark_jobs_queued(jobs)
    await assert_counts_kept(store)
    # the bookkeeping's own statement: finished, failed, a retry issued
    number = await store.pool.fetchval("SELECT min(number) FROM events WHERE job_id = $1", jobs[0])
    await store.apply(
        [
            StatusUpdate(
                job_id=jobs[0], number=number + i, attempt=1, status=s, worker="w", started_at=T0, ended_at=T0
            )  # type: ignore[arg-type]
            for i, s in enumerate(["finished", "failed", "finished"])
        ]
    )
    await assert_counts_kept(store)
    await store.compact_event_counts()
    await assert_counts_kept(store)
    assert await store.cancel_workflow(wf)  # the cancellation's statement
    await assert_counts_kept(store)
    await store.compact_event_counts()
    await assert_counts_kept(store)
    # one row per (task, state) once folded, and none of a state nobody is in any more
    rows = await store.pool.fetch("SELECT count(*) AS n, sum(n) AS total FROM event_counts GROUP BY task_id, status")
    assert rows and all(r["n"] == 1 and r["total"] != 0 for r in rows)
    # a deletion takes its events out of the counts too
    await store.pool.execute("DELETE FROM jobs WHERE id = $1", jobs[0])
    await assert_counts_kept(store)


async def test_folding_beside_concurrent_writers_neither_loses_nor_doubles_a_delta(
    store: Store, tmp_path: Path
) -> None:
    await submit(store, write_workflow(tmp_path, {"a": [f"ok:{i}" for i in range(400)]}, per_job=50))
    rng = random.Random(7)
    stop = asyncio.Event()

    async def writer() -> None:  # moves random events between states, a statement at a time
        while not stop.is_set():
            async with store.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE events SET status = $1 WHERE (job_id, number) IN "
                    "(SELECT job_id, number FROM events ORDER BY random() LIMIT $2)",
                    rng.choice(STATES),
                    rng.randint(1, 30),
                )

    async def folder() -> int:
        folds = 0
        while not stop.is_set():
            await store.compact_event_counts()
            folds += 1
        return folds

    writers = [asyncio.create_task(writer()) for _ in range(2)]
    folding = asyncio.create_task(folder())
    await asyncio.sleep(3)
    stop.set()
    await asyncio.gather(*writers)
    assert await folding > 10  # it did fold, many times, while the writers wrote
    await assert_counts_kept(store)
    await store.compact_event_counts()
    await assert_counts_kept(store)


async def test_the_monitor_counts_what_the_events_say(store: Store, tmp_path: Path) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"a": [f"ok:{i}" for i in range(30)]}, per_job=10))
    await store.pool.execute("UPDATE events SET status = CASE WHEN number % 3 = 0 THEN 'finished' ELSE 'running' END")
    rows = await store.pool.fetch("SELECT status, count(*) AS n FROM events GROUP BY 1")
    grouped = {r["status"]: r["n"] for r in rows}
    task = await store.pool.fetchval("SELECT id FROM tasks WHERE workflow_id = $1", wf)
    app = create_app(store, None, MonitorConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        listed = (await client.get("/api/workflows")).json()
        detail = (await client.get(f"/api/workflows/{wf}")).json()
        task_detail = (await client.get(f"/api/tasks/{task}")).json()
        missing = await client.get("/api/tasks/999999")
    assert grouped == {"finished": 10, "running": 20}
    assert [w["events"] for w in listed if w["id"] == wf] == [grouped]
    assert detail["events"] == grouped and detail["tasks"][0]["events"] == grouped
    assert task_detail["events"] == grouped and task_detail["done"] == 10
    assert missing.status_code == 404


async def test_a_task_is_sampled_less_often_as_its_run_grows_and_always_at_its_end(
    store: Store, tmp_path: Path
) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"a": [f"ok:{i}" for i in range(3)]}, per_job=3))
    task = await store.pool.fetchval("SELECT id FROM tasks WHERE workflow_id = $1", wf)
    job = await store.pool.fetchval("SELECT id FROM jobs WHERE workflow_id = $1", wf)

    async def report(number: int, status: str) -> int:
        """Change the task's counts, fold them: how many samples the task has then."""
        update = StatusUpdate(job_id=job, number=number, attempt=1, status=status, worker="w", started_at=T0)  # type: ignore[arg-type]
        await store.apply([update.model_copy(update={"ended_at": T0} if status == "finished" else {})])
        assert await store.compact_event_counts() == [task]
        return int(await store.pool.fetchval("SELECT count(*) FROM event_count_samples WHERE task_id = $1", task))

    async def pretend(first: float, last: float) -> None:
        """The task's samples: its first ``first`` seconds ago, its last ``last`` seconds ago."""
        await store.pool.execute("DELETE FROM event_count_samples WHERE task_id = $1", task)
        await store.pool.execute(
            "INSERT INTO event_count_samples (task_id, at, counts) SELECT $1, now() - make_interval(secs => s), '{}'"
            " FROM unnest($2::float8[]) AS s",
            task,
            [first, last],
        )

    # a run of 10,000 s so far: one sample per 20 s of it (SAMPLES_PER_RUN 500)
    await pretend(10_000, 10)
    assert await report(0, "running") == 2  # 10 s after the last: not yet
    await pretend(10_000, 30)
    assert await report(1, "running") == 3  # 30 s after it: sampled
    # young runs are sampled at every fold that changed them
    await pretend(100, 1)
    assert await report(2, "running") == 3
    # the last change of a task with nothing left to run is always kept
    await pretend(10_000, 1)
    await report(0, "finished")
    await report(1, "finished")
    assert await report(2, "finished") == 3
    last = await store.pool.fetchval(
        "SELECT counts FROM event_count_samples WHERE task_id = $1 ORDER BY at DESC LIMIT 1", task
    )
    assert last == {"finished": 3}
