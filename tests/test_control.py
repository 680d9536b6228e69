"""The control plane in-process against the real RabbitMQ and Postgres (the releaser's
order of publishes on the in-memory transport, which records them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import aiormq
import pytest

from dispatcher.bookkeeper import Bookkeeper
from dispatcher.config import Settings
from dispatcher.control import ControlPlane
from dispatcher.finisher import Finisher
from dispatcher.reissue import Reissuer
from dispatcher.releaser import FIRST_RANGES, Releaser
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import (
    EventRange,
    Heartbeat,
    JobAnnouncement,
    JobLog,
    StatusBatch,
    StatusUpdate,
    decode,
    encode,
)
from tests.conftest import EXAMPLES
from tests.helpers import eventually, queue_gone
from tests.test_failures import write_workflow
from tests.test_store import queued_event, snapshot
from transport.interface import Transport
from transport.memory import Connection, MemoryBroker
from transport.names import Names
from transport.rabbitmq import Broker

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def bookkeeper_of(store: Store, broker: Broker) -> Bookkeeper:
    """A bookkeeper alone (no control plane around it), with small batches."""
    reissuer = Reissuer(store, broker, Releaser(store, broker, window=10))
    return Bookkeeper(store, broker, Finisher(store, broker, lambda: None), reissuer, batch_size=50, linger=0.01)


@pytest.fixture
async def control(settings: Settings, store: Store, broker: Broker) -> AsyncIterator[ControlPlane]:
    cp = ControlPlane(settings, store, broker)
    stop = asyncio.Event()
    task = asyncio.create_task(cp.run(stop))
    yield cp
    stop.set()
    await asyncio.wait_for(task, 10)


async def get_one(broker: Transport, queue: str) -> bytes | None:
    jq = await broker.open_job(queue)
    try:
        msg = await jq.get()
        if msg is None:
            return None
        await jq.ack(msg)
        return msg.body
    finally:
        await jq.close()


async def wait_applied(control: ControlPlane, count: int) -> None:
    async def check() -> bool:
        return control.bookkeeper.applied >= count and not control.bookkeeper.held

    await eventually(check, what=f"{count} updates applied")


async def test_submission_is_released_published_and_announced(
    control: ControlPlane, store: Store, broker: Broker
) -> None:
    wf = await submit(store, EXAMPLES / "rubin-isr.yaml")
    ann_body = await eventually(lambda: get_one(broker, broker.names.jobs), what="an announcement")
    ann = decode(ann_body, JobAnnouncement)
    assert (ann.workflow_id, ann.label) == (wf, "pipeinit")
    assert ann.payload.command and "{payload}" in ann.payload.command
    queue = broker.names.job(ann.job_id)  # derived from the id: a message names no queue
    rng = decode(await get_one(broker, queue) or b"", EventRange)
    assert [(e.number, e.payload, e.attempt) for e in rng.events] == [(0, "pipeinit_0", 1)]
    assert await get_one(broker, queue) is None  # one range only
    assert await store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", ann.job_id) == "queued"
    # isr waits for pipeinit: nothing else was announced
    assert await get_one(broker, broker.names.jobs) is None


class Recorded(Connection):
    """The in-memory transport, recording (queue, messages) per publish_many, and calling
    ``after_first_announcement`` once the first announcement is out."""

    def __init__(self, names: Names, after_first_announcement: Callable[[Recorded, str], Awaitable[None]]) -> None:
        super().__init__(MemoryBroker(), names)
        self.after = after_first_announcement
        self.sent: list[tuple[str, int]] = []
        self.queue = ""

    async def publish_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        items = list(items)
        self.sent.append((items[0][0], len(items)))
        await super().publish_many(items)
        if items[0][0] == self.names.jobs and len(self.sent) == 2:
            await self.after(self, self.queue)


async def first_job_released(
    store: Store, names: Names, tmp_path: Path, after_first_announcement: Callable[[Recorded, str], Awaitable[None]]
) -> Recorded:
    """Release a workflow of one job of 100 ranges, on a transport that records what
    was published in which order."""
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(100)]}, per_job=100))
    broker = Recorded(names, after_first_announcement)
    await broker.declare_topology()
    broker.queue = names.job(await store.pool.fetchval("SELECT id FROM jobs"))
    assert await Releaser(store, broker, window=4).release_once() == 1
    assert await broker.queue_depth(broker.queue) is not None
    return broker


async def test_a_windows_first_job_is_announced_once_its_first_ranges_are_in(
    store: Store, names: Names, tmp_path: Path
) -> None:
    async def nobody(broker: Recorded, queue: str) -> None:  # its announcement waits in es.jobs
        return None

    broker = await first_job_released(store, names, tmp_path, nobody)
    queue, jobs = broker.queue, names.jobs
    assert broker.sent == [(queue, FIRST_RANGES), (jobs, 1), (queue, 100 - FIRST_RANGES)]
    assert await broker.queue_depth(queue) == 100
    assert await broker.queue_depth(jobs) == 1  # the one announcement is enough
    assert await store.pool.fetchval("SELECT status FROM jobs") == "queued"


async def test_a_first_job_a_worker_emptied_and_left_before_the_rest_came_is_announced_again(
    store: Store, names: Names, tmp_path: Path
) -> None:
    async def worker_took_all_and_left(broker: Recorded, queue: str) -> None:
        assert await get_one(broker, names.jobs) is not None
        for _ in range(FIRST_RANGES):
            assert await get_one(broker, queue) is not None

    broker = await first_job_released(store, names, tmp_path, worker_took_all_and_left)
    queue, jobs = broker.queue, names.jobs
    assert broker.sent == [(queue, FIRST_RANGES), (jobs, 1), (queue, 100 - FIRST_RANGES), (jobs, 1)]
    assert await broker.queue_depth(jobs) == 1  # the second announcement


async def test_a_first_job_a_worker_consumes_or_sets_up_is_not_announced_twice(
    store: Store, names: Names, tmp_path: Path
) -> None:
    consumers = []

    async def worker_on_it(broker: Recorded, queue: str) -> None:  # took the announcement; set up, or consuming
        assert await get_one(broker, names.jobs) is not None
        consumers.append(await broker.open_job(queue, prefetch=1))

    broker = await first_job_released(store, names, tmp_path, worker_on_it)
    for consumer in consumers:
        await consumer.close()
    assert broker.sent[1:] == [(names.jobs, 1), (broker.queue, 100 - FIRST_RANGES)]
    assert await broker.queue_depth(names.jobs) == 0


async def test_replayed_and_stale_status_messages_change_nothing(
    control: ControlPlane, store: Store, broker: Broker
) -> None:
    await submit(store, EXAMPLES / "rubin-isr.yaml")
    ann = decode(await eventually(lambda: get_one(broker, broker.names.jobs)), JobAnnouncement)
    done = StatusBatch(
        worker="w",
        updates=[
            StatusUpdate(job_id=ann.job_id, number=0, attempt=1, status="running", worker="w", started_at=T0),
            StatusUpdate(
                job_id=ann.job_id,
                number=0,
                attempt=1,
                status="finished",
                worker="w",
                started_at=T0,
                ended_at=T0,
                exit_code=0,
            ),
        ],
    )
    await broker.publish(broker.names.status, encode(done))
    await wait_applied(control, 2)
    # pipeinit finished -> isr released: its 28 jobs are announced
    # (each job is marked queued as soon as its ranges are published)
    assert await eventually(
        lambda: store.pool.fetchval(
            "SELECT count(*) = 28 FROM jobs j JOIN tasks t ON t.id = j.task_id "
            "WHERE t.label = 'isr' AND j.status = 'queued'"
        ),
        what="all 28 isr jobs queued",
    )
    assert await broker.queue_depth(broker.names.job(ann.job_id)) is None  # finished job: queue deleted
    before = await snapshot(store)
    stale = StatusBatch(
        worker="w",
        updates=[
            StatusUpdate(
                job_id=ann.job_id,
                number=0,
                attempt=1,
                status="failed",
                worker="w",
                started_at=T0,
                ended_at=T0,
                exit_code=1,
                error="old",
            ),
        ],
    )
    await broker.publish(broker.names.status, encode(done))
    await broker.publish(broker.names.status, encode(done))
    await broker.publish(broker.names.status, encode(stale))
    await wait_applied(control, 7)
    # the same attempt, finished already: neither the event nor its history moves
    assert await snapshot(store) == before


async def test_poison_status_message_is_dead_lettered_with_its_reason(
    control: ControlPlane, store: Store, broker: Broker
) -> None:
    await broker.publish(broker.names.status, b'{"v": 7, "kind": "status"}')
    await broker.publish(broker.names.status, b"\xff garbage")
    ch = await broker.channel()
    dlq = await ch.get_queue(broker.names.dlq, ensure=False)
    reasons = []
    for _ in range(2):
        msg = await eventually(lambda: dlq.get(fail=False), what="a dead letter")
        reasons.append(msg.headers["x-reason"])
        assert msg.headers["x-source-queue"] == broker.names.status
        await msg.ack()
    await ch.close()
    assert "unsupported schema version 7" in reasons[0]
    assert "undecodable" in reasons[1]
    # the bookkeeper still works
    wf = await submit(store, EXAMPLES / "rubin-isr.yaml")
    ann = decode(await eventually(lambda: get_one(broker, broker.names.jobs)), JobAnnouncement)
    await broker.publish(
        broker.names.status,
        encode(
            StatusBatch(
                worker="w",
                updates=[
                    StatusUpdate(job_id=ann.job_id, number=0, attempt=1, status="finished", worker="w", ended_at=T0)
                ],
            )
        ),
    )
    await eventually(
        lambda: store.pool.fetchval(
            "SELECT status = 'finished' FROM tasks WHERE workflow_id = $1 AND label = 'pipeinit'", wf
        )
    )


async def test_restarted_control_plane_announces_queued_jobs_again(
    settings: Settings, store: Store, broker: Broker
) -> None:
    async def run_once() -> None:
        cp = ControlPlane(settings, store, broker)
        stop = asyncio.Event()
        task = asyncio.create_task(cp.run(stop))
        with contextlib.suppress(AssertionError):
            await eventually(lambda: broker.queue_depth(broker.names.jobs), timeout=5)
        stop.set()
        await task

    await submit(store, EXAMPLES / "rubin-isr.yaml")
    await run_once()
    assert await get_one(broker, broker.names.jobs) is not None  # the first announcement, taken
    assert await get_one(broker, broker.names.jobs) is None
    await run_once()  # e.g. after a crash: the queued job is announced again
    ann = decode(await get_one(broker, broker.names.jobs) or b"", JobAnnouncement)
    assert ann.label == "pipeinit"
    assert await store.pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'queued'") == 1


async def test_status_for_an_unknown_job_is_dead_lettered(control: ControlPlane, store: Store, broker: Broker) -> None:
    await submit(store, EXAMPLES / "rubin-isr.yaml")
    ann = decode(await eventually(lambda: get_one(broker, broker.names.jobs)), JobAnnouncement)
    batch = StatusBatch(
        worker="w",
        updates=[
            StatusUpdate(job_id=ann.job_id, number=0, attempt=1, status="finished", worker="w", ended_at=T0),
            StatusUpdate(job_id=987654, number=3, attempt=1, status="finished", worker="w", ended_at=T0),
        ],
    )
    await broker.publish(broker.names.status, encode(batch))
    ch = await broker.channel()
    dlq = await ch.get_queue(broker.names.dlq, ensure=False)
    msg = await eventually(lambda: dlq.get(fail=False), what="a dead letter")
    await msg.ack()
    await ch.close()
    assert "status for unknown event: job 987654 event 3" in msg.headers["x-reason"]
    assert decode(msg.body, StatusBatch) == batch  # kept whole, for a person to read
    # the known update in the same message was applied
    assert await store.pool.fetchval("SELECT status FROM events WHERE job_id = $1", ann.job_id) == "finished"


async def test_bookkeeper_holds_one_transaction_of_updates_decoded_the_rest_as_bodies(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(400)]}, per_job=400))
    job_id = await store.pool.fetchval("SELECT id FROM jobs")
    for first in range(0, 400, 20):  # 20 messages of 20 updates
        batch = StatusBatch(
            worker="w",
            updates=[
                StatusUpdate(job_id=job_id, number=n, attempt=1, status="finished", worker="w", ended_at=T0)
                for n in range(first, first + 20)
            ],
        )
        await broker.publish(broker.names.status, encode(batch))
    bookkeeper = bookkeeper_of(store, broker)
    await bookkeeper.start()
    try:
        await eventually(lambda: asyncio.sleep(0, bookkeeper.held == 20), what="all 20 messages delivered")
        assert bookkeeper.held_decoded == 3  # 60 updates: the one that reached batch_size is the last decoded
        sizes = []
        while bookkeeper.held:
            before = bookkeeper.applied
            await bookkeeper.flush()
            sizes.append(bookkeeper.applied - before)
        assert sizes == [60, 60, 60, 60, 60, 60, 40]  # about batch_size per transaction, in order
        assert await store.pool.fetchval("SELECT count(*) FROM events WHERE status = 'finished'") == 400
        assert await broker.queue_depth(broker.names.status) == 0
    finally:
        await bookkeeper.stop()


async def test_status_messages_are_acked_only_after_the_finish_check_of_their_jobs(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(10)]}, per_job=10))
    job_id = await store.pool.fetchval("SELECT id FROM jobs")
    await store.pool.execute("UPDATE jobs SET status = 'releasing' WHERE id = $1", job_id)
    await store.mark_jobs_queued([job_id])  # as if published
    updates = [
        StatusUpdate(job_id=job_id, number=n, attempt=1, status="finished", worker="w", ended_at=T0) for n in range(10)
    ]
    await broker.publish(broker.names.status, encode(StatusBatch(worker="w", updates=updates)))

    def bookkeeper() -> Bookkeeper:
        return bookkeeper_of(store, broker)

    first = bookkeeper()
    await first.start()
    await eventually(lambda: asyncio.sleep(0, first.held == 1), what="the status message delivered")
    await first.apply()  # committed; the finish check and the ack come after
    assert await store.pool.fetchval("SELECT count(*) FROM events WHERE status = 'finished'") == 10
    assert await store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) != "finished"
    await first.stop()  # gone before the check (a crash): its message comes back
    await eventually(
        lambda: _depth_is(broker, broker.names.status, 1), what="the unacked status message back in its queue"
    )
    second = bookkeeper()
    await second.start()
    try:
        await eventually(lambda: asyncio.sleep(0, second.held == 1), what="the message delivered again")
        await second.flush()  # applied again (changes nothing), checked, acked
        assert await store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "finished"
    finally:
        await second.stop()
    assert await _depth_is(broker, broker.names.status, 0)


async def test_a_batch_over_several_jobs_is_applied_in_transactions_side_by_side_and_whole(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(12)]}, per_job=3))
    jobs = [r["id"] for r in await store.pool.fetch("SELECT id FROM jobs ORDER BY id")]
    assert len(jobs) == 4 and {j % 2 for j in jobs} == {0, 1}  # both shares have work
    numbers = {
        r["job_id"]: r["ns"]
        for r in await store.pool.fetch("SELECT job_id, array_agg(number) AS ns FROM events GROUP BY job_id")
    }
    updates = [
        StatusUpdate(job_id=j, number=n, attempt=1, status="finished", worker="w", ended_at=T0)
        for j in jobs
        for n in numbers[j]
    ]
    beat = Heartbeat(host="h", pid=1, slots=1, state="live", jobs=jobs, events_done=12, started_at=T0)
    logs = [JobLog(job_id=j, path=f"/logs/job-{j}.log") for j in jobs]
    await broker.publish(
        broker.names.status, encode(StatusBatch(worker="w", updates=updates, logs=logs, heartbeat=beat))
    )
    bookkeeper = bookkeeper_of(store, broker)
    assert bookkeeper.parallel == 2
    await bookkeeper.start()
    try:
        await eventually(lambda: asyncio.sleep(0, bookkeeper.held == 1), what="the status message delivered")
        await bookkeeper.flush()
    finally:
        await bookkeeper.stop()
    assert await store.pool.fetchval("SELECT count(*) FROM events WHERE status = 'finished'") == 12
    assert await store.pool.fetchval("SELECT count(*) FROM attempts WHERE status = 'finished'") == 12
    assert [r["log_path"] for r in await store.pool.fetch("SELECT log_path FROM jobs ORDER BY id")] == [
        f"/logs/job-{j}.log" for j in jobs
    ]
    assert await store.pool.fetchval("SELECT events_done FROM workers WHERE id = 'w'") == 12
    assert await _depth_is(broker, broker.names.status, 0)


async def _depth_is(broker: Broker, queue: str, depth: int) -> bool:
    return await broker.queue_depth(queue) == depth


async def test_a_finished_jobs_queue_is_deleted_even_if_rabbitmq_is_away_at_that_moment(
    store: Store, broker: Broker
) -> None:
    job, n = await queued_event(store)
    await broker.declare_job_queue(broker.names.job(job))
    await store.apply([StatusUpdate(job_id=job, number=n, attempt=1, status="finished", worker="w", ended_at=T0)])

    class AwayOnce:  # the real broker, but the first deletion fails as during a restart
        names = broker.names
        failed = False

        async def delete_queue(self, name: str, *, wait: bool = True) -> None:
            if not self.failed:
                self.failed = True
                raise aiormq.exceptions.AMQPConnectionError("connection lost")
            await broker.delete_queue(name, wait=wait)

    away = AwayOnce()
    done = await Finisher(store, away, lambda: None).check([job])  # type: ignore[arg-type]
    assert done.jobs == [(job, "finished")] and away.failed
    # finished in Postgres before the deletion failed: it was retried, not forgotten
    assert await broker.queue_depth(broker.names.job(job)) is None


async def test_a_job_queue_whose_unanswered_delete_the_broker_dropped_is_deleted_again(
    store: Store, broker: Broker
) -> None:
    """With the control plane's background deleter a delete goes out without waiting for
    RabbitMQ's answer; one sent as RabbitMQ stops is never run (seen in CI: a finished
    job's queue outlived a restart). The deleter looks again and deletes it again."""
    job, n = await queued_event(store)
    name = broker.names.job(job)
    await broker.declare_job_queue(name)

    class DropsFirst:  # the real broker, but the first unanswered delete is lost
        names = broker.names
        dropped: list[str] = []

        async def delete_queue(self, name: str, *, wait: bool = True) -> None:
            if not wait and not self.dropped:
                self.dropped.append(name)
                return
            await broker.delete_queue(name, wait=wait)

        async def queue_state(self, name: str) -> tuple[int, int] | None:
            return await broker.queue_state(name)

    drops = DropsFirst()
    finisher = Finisher(store, drops, lambda: None, recheck=0.2)  # type: ignore[arg-type]
    deleter = asyncio.create_task(finisher.delete_queues())
    try:
        await asyncio.sleep(0)  # the deleter runs: deletes go out unanswered
        await store.apply([StatusUpdate(job_id=job, number=n, attempt=1, status="finished", worker="w", ended_at=T0)])
        assert (await finisher.check([job])).jobs == [(job, "finished")]
        await eventually(lambda: queue_gone(broker, name), what="the queue deleted")
        assert drops.dropped == [name]
    finally:
        deleter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await deleter

