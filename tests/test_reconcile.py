"""Reconciliation against the real RabbitMQ and Postgres: Postgres is the truth, and a job
queue that lost its ranges, a job left active with every event ended, or a queue left
behind is found (``dispatcher doctor``) and mended (the watchdog, ``doctor --repair``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from dispatcher.config import Settings
from dispatcher.finisher import Finisher
from dispatcher.reconcile import Reconciler
from dispatcher.releaser import Releaser
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import EventRange, decode
from tests.test_failures import write_workflow
from transport.rabbitmq import Broker


async def released(store: Store, broker: Broker, tmp_path: Path, n: int = 6) -> tuple[int, Reconciler]:
    """One job of ``n`` one-event ranges, published and announced (nobody consumes it)."""
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(n)]}, per_job=n))
    releaser = Releaser(store, broker, window=10)
    assert await releaser.release_once() == 1
    job = await store.pool.fetchval("SELECT id FROM jobs")
    assert await broker.queue_depth(broker.names.job(job)) == n
    await broker.purge_queue(broker.names.jobs)  # its announcement: not what is looked at here
    # claimed a while ago (a job claimed just now is left alone: CLAIM_SETTLE_SECONDS)
    await store.pool.execute("UPDATE jobs SET claimed_at = now() - interval '1 minute'")
    return job, Reconciler(store, broker, releaser, Finisher(store, broker, lambda: None))


async def ranges(broker: Broker, job: int) -> list[int]:
    """The event numbers in the job's queue, taking them out."""
    out = []
    while (message := await broker.get(broker.names.job(job))) is not None:
        out += [e.number for e in decode(message.body, EventRange).events]
        await message.ack()
    return sorted(out)


async def test_a_purged_job_queue_is_found_and_published_again_after_a_second_look(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    job, reconciler = await released(store, broker, tmp_path)
    await broker.purge_queue(broker.names.job(job))  # as a lost disk would
    found = await reconciler.look()
    assert [(d.job_id, d.kind) for d in found] == [(job, "queue emptied")]
    assert "6 events wait" in found[0].describe()
    assert await reconciler.round() == []  # the first sighting: a worker may be taking it up
    assert await broker.queue_depth(broker.names.job(job)) == 0
    assert [d.kind for d in await reconciler.round()] == ["queue emptied"]  # the second: republished
    assert await ranges(broker, job) == list(range(6))
    issues = await store.pool.fetch("SELECT DISTINCT issue FROM events WHERE job_id = $1", job)
    assert [r["issue"] for r in issues] == [1]  # new copies: any old one still held is stale
    assert await broker.queue_depth(broker.names.jobs) == 1  # announced again


async def test_a_deleted_job_queue_is_published_again_at_once(store: Store, broker: Broker, tmp_path: Path) -> None:
    job, reconciler = await released(store, broker, tmp_path)
    await store.pool.execute(
        "UPDATE events SET status = 'finished', attempt = 1 WHERE job_id = $1 AND number < 2", job
    )
    await broker.delete_queue(broker.names.job(job))
    assert [d.kind for d in await reconciler.round()] == ["queue missing"]
    assert await ranges(broker, job) == [2, 3, 4, 5]  # only what still waits


async def test_a_job_whose_events_all_ended_is_finished_whatever_its_state(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    job, reconciler = await released(store, broker, tmp_path)
    # its control plane died after publishing it whole, before marking it queued; its
    # events all ran meanwhile
    await store.pool.execute("UPDATE jobs SET status = 'releasing' WHERE id = $1", job)
    await store.pool.execute("UPDATE events SET status = 'finished', attempt = 1 WHERE job_id = $1", job)
    assert [d.kind for d in await reconciler.round()] == ["job stuck"]
    assert await store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job) == "finished"
    assert await store.pool.fetchval("SELECT status FROM workflows") == "finished"


async def test_a_job_claimed_a_moment_ago_is_left_alone(store: Store, broker: Broker, tmp_path: Path) -> None:
    # its control plane may have stalled mid-publish and be about to send the rest
    job, reconciler = await released(store, broker, tmp_path)
    await store.pool.execute("UPDATE jobs SET claimed_at = now()")
    await broker.purge_queue(broker.names.job(job))
    assert await reconciler.round() == [] and await reconciler.round() == []
    assert [d.kind for d in await reconciler.look()] == ["queue emptied"]  # the doctor sees it


async def test_a_job_being_served_is_left_alone(store: Store, broker: Broker, tmp_path: Path) -> None:
    job, reconciler = await released(store, broker, tmp_path)
    consumer = await broker.open_job(broker.names.job(job), prefetch=6)  # a worker took every range
    for _ in range(2):
        await asyncio.sleep(0.1)
        assert await reconciler.round() == []  # a consumer holds them: nothing is lost
    await consumer.close()


def doctor(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ,
        DISPATCHER_AMQP_URL=settings.amqp_url,
        DISPATCHER_DATABASE_URL=settings.database_url,
        DISPATCHER_QUEUE_PREFIX=settings.names.prefix,
    )
    cmd = [sys.executable, "-m", "dispatcher.cli", "doctor", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


async def test_doctor_reports_and_repairs(settings: Settings, store: Store, broker: Broker, tmp_path: Path) -> None:
    job, _ = await released(store, broker, tmp_path)
    await broker.delete_queue(broker.names.job(job))
    looked = await asyncio.to_thread(doctor, settings)
    assert looked.returncode == 1, looked.stderr
    assert f"job {job}: queue missing: 6 events wait in Postgres" in looked.stdout
    repaired = await asyncio.to_thread(doctor, settings, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "repaired 1 disagreement(s)" in repaired.stdout
    assert await broker.queue_depth(broker.names.job(job)) == 6
    again = await asyncio.to_thread(doctor, settings)
    assert (again.returncode, again.stdout.strip()) == (0, "Postgres and RabbitMQ agree")
