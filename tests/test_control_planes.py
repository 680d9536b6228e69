"""Several control planes on one Postgres: the release window counted across them, a
job's claim fenced by its lease, one leader at a time (against the real services)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

from dispatcher.config import Settings
from dispatcher.control import ControlPlane
from dispatcher.leader import LEADER_TIMEOUT, Leadership
from dispatcher.releaser import CLAIM_LEASE_SECONDS, Releaser
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.joblog import event_runs
from schemas.messages import EventRange, EventSpec, decode, encode
from tests.helpers import eventually
from tests.test_crashes import Processes
from tests.test_failures import write_workflow
from transport.rabbitmq import Broker
from workers.worker import Worker


async def test_two_control_planes_claiming_at_once_fill_one_window(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(60)]}, per_job=1))
    await store.release_ready_tasks()
    other = await Store.connect(settings.database_url)
    try:
        for _ in range(3):  # claimed at the same moment, by two processes' pools
            a, b = await asyncio.gather(store.claim_jobs(10, "a"), other.claim_jobs(10, "b"))
            assert len(a) + len(b) == 10  # the window of 10, not 10 each
            active = await store.pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'releasing'")
            assert active == 10
            await store.pool.execute("UPDATE jobs SET status = 'finished' WHERE status = 'releasing'")
    finally:
        await other.close()


async def test_a_control_plane_that_lost_its_claim_publishes_nothing_more(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(600)]}, per_job=600))
    await store.release_ready_tasks()
    stalled = Releaser(store, broker, window=10, owner="cp-a")
    [job] = await store.claim_jobs(10, "cp-a")
    # cp-a stalls; its lease runs out and cp-b takes the job over
    await store.pool.execute("UPDATE jobs SET claimed_at = now() - interval '1 minute' WHERE id = $1", job)
    taker = Releaser(store, broker, window=10, owner="cp-b")
    await taker.reclaim(CLAIM_LEASE_SECONDS)
    assert await store.pool.fetchval("SELECT claimed_by FROM jobs WHERE id = $1", job) == "cp-b"
    queue = broker.names.job(job)
    assert await broker.queue_depth(queue) == 600  # cp-b published it whole
    # cp-a wakes up and goes on publishing the job it had claimed: fenced off
    await stalled.publish_jobs([job], fenced=True)
    assert await broker.queue_depth(queue) == 600  # not one range more
    assert await store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job) == "queued"  # by cp-b
    assert not await store.publishing(job, "cp-a", CLAIM_LEASE_SECONDS, 0)


async def test_a_job_taken_over_is_published_from_where_its_first_owner_stopped(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(600)]}, per_job=600))
    await store.release_ready_tasks()
    [job] = await store.claim_jobs(10, "cp-a")
    queue = broker.names.job(job)
    await broker.declare_job_queue(queue)
    # cp-a recorded and published its first batch (events 0..255), then stalled
    assert await store.publishing(job, "cp-a", CLAIM_LEASE_SECONDS, 255)
    first = [r for r in await store.job_events(job) if r["number"] <= 255]
    await broker.publish_many((queue, encode(one_range(job, r["number"], r["payload"]))) for r in first)
    await store.pool.execute("UPDATE jobs SET claimed_at = now() - interval '1 minute' WHERE id = $1", job)
    await Releaser(store, broker, window=10, owner="cp-b").reclaim(CLAIM_LEASE_SECONDS)
    numbers = []
    while (message := await broker.get(queue)) is not None:
        numbers += [e.number for e in decode(message.body, EventRange).events]
        await message.ack()
    assert sorted(numbers) == list(range(600))  # every event once: none published twice
    assert await store.pool.fetchval("SELECT count(DISTINCT issue) FROM events WHERE job_id = $1", job) == 1


def one_range(job: int, number: int, payload: str) -> EventRange:
    return EventRange(workflow_id=1, job_id=job, events=[EventSpec(number=number, payload=payload, attempt=1)])


async def test_a_claim_holds_while_its_owner_renews_it(store: Store, tmp_path: Path) -> None:
    await submit(store, write_workflow(tmp_path, {"isr": ["ok:0"]}, per_job=1))
    await store.release_ready_tasks()
    [job] = await store.claim_jobs(10, "cp-a")
    assert await store.publishing(job, "cp-a", CLAIM_LEASE_SECONDS, 0)
    assert not await store.publishing(job, "cp-b", CLAIM_LEASE_SECONDS, 0)
    await store.pool.execute("UPDATE jobs SET claimed_at = now() - interval '1 minute' WHERE id = $1", job)
    assert not await store.publishing(job, "cp-a", CLAIM_LEASE_SECONDS, 0)  # run out
    await store.renew_claims("cp-a", [job])
    assert await store.publishing(job, "cp-a", CLAIM_LEASE_SECONDS, 0)
    assert await store.reclaim_stale_releasing(CLAIM_LEASE_SECONDS, "cp-b") == []  # renewed: not taken over


async def test_one_leader_at_a_time_and_a_stalled_one_is_replaced(settings: Settings, store: Store) -> None:
    first, second = Leadership(settings.database_url, "cp-1"), Leadership(settings.database_url, "cp-2")
    try:
        await first.step()
        await second.step()
        assert (first.is_leader, second.is_leader) == (True, False)
        # the leader stalls (it renews no more): Postgres ends its session, the other takes over
        t0 = time.monotonic()

        async def second_leads() -> bool:
            await second.step()
            return second.is_leader

        await eventually(second_leads, timeout=3 * LEADER_TIMEOUT, what="the second leading")
        assert time.monotonic() - t0 >= LEADER_TIMEOUT * 0.5  # not before the first could have renewed
        # the stalled one wakes up and steps down at its next renewal
        await first.step()
        assert not first.is_leader
        await first.step()  # and does not take the lock back while the second holds it
        assert (first.is_leader, second.is_leader) == (False, True)
    finally:
        for leadership in (first, second):
            await leadership.close()


async def test_a_job_whose_control_plane_died_between_publishing_and_marking_it_queued_finishes(
    settings: Settings, store: Store, broker: Broker, tmp_path: Path
) -> None:
    """Another control plane (the leader) takes the job over once the dead one's lease
    has run out, and the workflow finishes without the dead one ever coming back."""
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(20)]}, per_job=20))
    await store.release_ready_tasks()
    dead = Releaser(store, broker, window=10, owner="cp-dead")
    [job] = await store.claim_jobs(10, "cp-dead")
    # it published every range and announced the job, then died before mark_jobs_queued
    queue = broker.names.job(job)
    await broker.declare_job_queue(queue)
    rows = await store.job_events(job)
    ranges = [
        EventRange(workflow_id=1, job_id=job, events=[EventSpec(number=r["number"], payload=r["payload"], attempt=1)])
        for r in rows
    ]
    await broker.publish_many((queue, encode(r)) for r in ranges)
    await dead.announce_ids([job])
    worker = Worker(broker, slots=2, work_dir=tmp_path / "work", log_dir=tmp_path / "logs", heartbeat_interval=0.5)
    cp = ControlPlane(settings, store, broker)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(cp.run(stop)), asyncio.create_task(worker.run(stop))]
    try:

        async def finished() -> bool:
            return await store.pool.fetchval("SELECT status FROM workflows") == "finished"

        await eventually(finished, timeout=3 * CLAIM_LEASE_SECONDS, what="the workflow finished")
        events = await store.pool.fetch("SELECT status, attempt FROM events")
        assert {(r["status"], r["attempt"]) for r in events} == {("finished", 1)} and len(events) == 20
        assert await store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job) == "finished"
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_control_plane_paused_mid_publish_makes_no_event_run_twice(
    settings: Settings, store: Store, procs: Processes, tmp_path: Path
) -> None:
    """Two control planes with a window of 4; the one publishing a job is SIGSTOPped for
    45 s, longer than its lease (and the leader's timeout), then resumed. The other takes its
    jobs over and the workflow finishes; no event runs twice, every event is finished at
    attempt 1, and never more than 4 jobs were active."""
    for _ in range(2):
        procs.start("start", "--no-monitor", "--release-window", "4")
    n = 3000
    wf = await submit(
        store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(n)]}, function="tests.payloads:noop",
                              per_job=500)
    )

    async def a_claim() -> str | None:
        return await store.pool.fetchval("SELECT claimed_by FROM jobs WHERE status = 'releasing' LIMIT 1")

    most_active = 0

    async def sample() -> None:  # the window is 4 across both control planes, not 4 each
        nonlocal most_active
        while True:
            active = await store.pool.fetchval(
                "SELECT count(*) FROM jobs WHERE status IN ('releasing', 'queued', 'running')"
            )
            most_active = max(most_active, active)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    owner = await eventually(a_claim, timeout=30, what="a job being published")
    pid = int(owner.split(":")[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(2):
            procs.start("worker", "--slots", "2")
        # 45 s: past its lease, the leader's timeout, and RabbitMQ's heartbeats (which
        # drop its connection: it wakes up to a reconnect, and must still publish nothing)
        await asyncio.sleep(45)
        assert CLAIM_LEASE_SECONDS + LEADER_TIMEOUT < 45
    finally:
        os.kill(pid, signal.SIGCONT)

    async def finished() -> bool:
        return await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf) == "finished"

    await eventually(finished, timeout=120, what="the workflow finished")
    sampler.cancel()
    assert 0 < most_active <= 4
    events = await store.pool.fetch("SELECT status, attempt FROM events")
    assert len(events) == n and {(r["status"], r["attempt"]) for r in events} == {("finished", 1)}
    runs: Counter[tuple[int, int]] = Counter()
    for row in await store.pool.fetch("SELECT id, log_path FROM jobs"):
        runs.update((row["id"], number) for number, _ in event_runs(Path(row["log_path"]).read_text()))
    assert sum(runs.values()) == n and max(runs.values()) == 1  # every event ran exactly once
