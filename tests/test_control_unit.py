"""The control plane's consumers and publishers on the in-memory transport, with a small
fake of the store's few calls they make: the bookkeeper (acks only what committed, one
refused message never stops it), the releaser (ranges, then the announcement), and the
reissuer (a retry through its delay queue, a dead letter). The same against the real
RabbitMQ and Postgres is in test_control, test_hardening and test_failures."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from dispatcher.bookkeeper import Bookkeeper
from dispatcher.finisher import Finisher
from dispatcher.reissue import Reissuer
from dispatcher.releaser import INVITE_SECONDS, Releaser
from dispatcher.store import Applied, Due, Finished, JobToPublish
from schemas.messages import (
    DeadLetter,
    EventRange,
    JobAnnouncement,
    Refused,
    StatusBatch,
    StatusUpdate,
    decode,
    encode,
)
from tests.helpers import eventually
from transport.interface import REFUSED_BY_HEADER, Incoming, Transport
from transport.memory import MemoryBroker
from transport.names import Names


@dataclass
class FakeStore:
    """What the bookkeeper, releaser and reissuer ask of the store, kept in lists. An
    update whose error says ``refuse`` is refused as Postgres refuses a value no column
    takes; ``outages`` calls fail first as a lost connection does."""

    jobs: dict[int, JobToPublish] = field(default_factory=dict)
    events: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    applied: list[StatusUpdate] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    outages: int = 0
    issued: list[tuple[Due, Any]] = field(default_factory=list)
    dead: list[Due] = field(default_factory=list)
    claimable: list[int] = field(default_factory=list)

    async def apply_batch(
        self, updates: Sequence[StatusUpdate], logs: Sequence[Any] = (), beats: Sequence[Any] = ()
    ) -> Applied:
        if self.outages:
            self.outages -= 1
            raise ConnectionResetError("connection lost")
        if any(u.error and "refuse" in u.error for u in updates):
            raise asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence")
        self.applied += updates
        return Applied(moved={u.job_id for u in updates}, refused=[], due=[])

    async def setup_failed(self, job_id: int, reason: str) -> list[Due]:
        self.calls.append(f"setup_failed {job_id}")
        return []

    async def finish(self, job_ids: Sequence[int]) -> Finished:
        return Finished([], [], [])

    async def release_ready_tasks(self) -> list[Any]:
        return []

    async def claim_jobs(self, window: int, owner: str | None = None) -> list[int]:
        claimed, self.claimable = self.claimable[:window], self.claimable[window:]
        return claimed

    async def publishing(self, job_id: int, owner: str | None, lease: float, upto: int) -> bool:
        return True

    async def jobs_to_publish(self, job_ids: Sequence[int]) -> list[JobToPublish]:
        return [self.jobs[j] for j in job_ids if j in self.jobs]

    async def job_events(self, job_id: int, after: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events[job_id] if after is None or e["number"] > after]

    async def mark_jobs_queued(self, job_ids: Sequence[int]) -> None:
        self.calls.append(f"queued {list(job_ids)}")

    async def active_jobs(self) -> list[int]:
        return list(self.jobs)

    async def published(self, published: Sequence[tuple[Due, Any]]) -> None:
        self.issued += published

    async def dead_lettered(self, dead: Sequence[Due]) -> None:
        self.dead += dead


@dataclass
class Plane:
    memory: MemoryBroker
    store: FakeStore
    broker: Transport
    releaser: Releaser
    reissuer: Reissuer
    bookkeeper: Bookkeeper


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    memory = MemoryBroker(delay_scale=0.1)  # delay steps ten times shorter
    broker = memory.connect(Names(prefix="unit."))
    await broker.declare_topology()
    store = FakeStore()
    releaser = Releaser(store, broker, window=10)  # type: ignore[arg-type]
    reissuer = Reissuer(store, broker, releaser)  # type: ignore[arg-type]
    finisher = Finisher(store, broker, releaser.wake)  # type: ignore[arg-type]
    bookkeeper = Bookkeeper(store, broker, finisher, reissuer, batch_size=100, linger=0.005)  # type: ignore[arg-type]
    yield Plane(memory, store, broker, releaser, reissuer, bookkeeper)
    await broker.close()


def job(job_id: int, events: int, *, size: int = 1) -> tuple[JobToPublish, list[dict[str, Any]]]:
    spec = JobToPublish(job_id, 1, 1, "t", {"function": "tests.payloads:noop"}, size, 3, 0.1)
    return spec, [{"number": i, "payload": f"p{i}", "attempt": 1, "issue": 1} for i in range(events)]


def update(job_id: int, number: int, status: str = "finished", error: str | None = None) -> StatusUpdate:
    return StatusUpdate(job_id=job_id, number=number, attempt=1, status=status, worker="w", error=error)  # type: ignore[arg-type]


async def drain(broker: Transport, queue: str) -> list[Incoming]:
    got = []
    while (message := await broker.get(queue)) is not None:
        got.append(message)
    return got


# -- bookkeeper -----------------------------------------------------------------------


async def running(plane: Plane) -> asyncio.Task[None]:
    await plane.bookkeeper.start()
    return asyncio.create_task(plane.bookkeeper.run())


async def test_the_bookkeeper_acks_status_messages_only_once_they_are_applied(plane: Plane) -> None:
    plane.store.outages = 2  # the database is away for the first two tries
    names = plane.broker.names
    for n in range(3):
        await plane.broker.publish_status(encode(StatusBatch(worker="w", updates=[update(1, n)])))
    task = await running(plane)
    await eventually(lambda: asyncio.sleep(0, len(plane.store.applied) == 3), what="all applied")
    await eventually(lambda: asyncio.sleep(0, plane.memory.unacked(names.status) == 0), what="the messages acked")
    assert await plane.broker.queue_state(names.status) == (0, 1)  # none ready, one consumer
    await plane.bookkeeper.stop()
    assert await plane.broker.queue_depth(names.status) == 0  # stopping gave nothing back: all were acked
    assert sorted(u.number for u in plane.store.applied) == [0, 1, 2]
    task.cancel()


async def test_one_message_the_database_refuses_goes_to_the_dlq_and_the_rest_is_applied(plane: Plane) -> None:
    names = plane.broker.names
    good = StatusBatch(worker="w", updates=[update(1, 0)])
    bad = StatusBatch(worker="w", updates=[update(1, 1, "failed", error="refuse me"), update(1, 2)])
    for batch in (good, bad):
        await plane.broker.publish_status(encode(batch))
    await plane.broker.publish_status(b"\xff not a status")
    task = await running(plane)
    await eventually(lambda: plane.broker.queue_depth(names.dlq), what="dead letters")
    await eventually(lambda: asyncio.sleep(0, len(plane.store.applied) == 2), timeout=5, what="the rest applied")
    assert sorted(u.number for u in plane.store.applied) == [0, 2]  # the refused update alone is left out
    await eventually(lambda: asyncio.sleep(0.05, True), what="settling")
    letters = await drain(plane.broker, names.dlq)
    reasons = sorted(str(m.headers["x-reason"]) for m in letters)
    assert len(letters) == 2
    assert "the database refused this status message" in reasons[0] and "undecodable" in reasons[1]
    await plane.bookkeeper.stop()
    assert await plane.broker.queue_depth(names.status) == 0  # nothing stuck, nothing redelivered
    task.cancel()


async def test_what_a_worker_refused_is_forwarded_to_the_dlq_and_counted(plane: Plane) -> None:
    names = plane.broker.names
    refused = Refused(source=names.jobs, reason="set-up failed", body=base64.b64encode(b"ann").decode(), setup_failed=7)
    await plane.broker.publish_status(encode(StatusBatch(worker="w1", refused=[refused])))
    task = await running(plane)
    (letter,) = [await eventually(lambda: plane.broker.get(names.dlq), what="the forwarded message")]
    assert letter.body == b"ann"
    assert letter.headers[REFUSED_BY_HEADER] == "w1" and letter.headers["x-source-queue"] == names.jobs
    assert plane.store.calls == ["setup_failed 7"]
    await plane.bookkeeper.stop()
    task.cancel()


# -- releaser -------------------------------------------------------------------------


async def test_the_releaser_publishes_every_range_then_marks_the_job_queued_and_announces_it(plane: Plane) -> None:
    names = plane.broker.names
    spec, events = job(1, 70, size=2)
    plane.store.jobs[1], plane.store.events[1] = spec, events
    plane.store.claimable = [1]
    assert await plane.releaser.release_once() == 1
    ranges = [decode(m.body, EventRange) for m in await drain(plane.broker, names.job(1))]
    assert [len(r.events) for r in ranges] == [2] * 35
    assert [e.number for r in ranges for e in r.events] == list(range(70))
    # announced early (after the first 32 ranges), and not again: nobody left the job
    (announced,) = await drain(plane.broker, names.jobs)
    assert decode(announced.body, JobAnnouncement).job_id == 1
    assert plane.store.calls == ["queued [1]"]


async def test_an_invitation_announces_an_active_job_at_most_once_a_second(plane: Plane) -> None:
    names = plane.broker.names
    plane.store.jobs[1], plane.store.events[1] = job(1, 1)
    await plane.releaser.invite([1, 99])  # 99 is not active: never announced
    await plane.releaser.invite([1])  # again at once: not announced again
    assert [decode(m.body, JobAnnouncement).job_id for m in await drain(plane.broker, names.jobs)] == [1]
    assert INVITE_SECONDS >= 1.0


# -- reissuer -------------------------------------------------------------------------


def due(status: str, *, number: int = 0, attempt: int = 1, error: str | None = None) -> Due:
    return Due(1, 1, True, "t", number, status, attempt, 2, "p", "w", error, 0.1, 1)


async def test_a_retry_waits_in_its_delay_queue_then_reaches_its_job_with_its_announcement(plane: Plane) -> None:
    names = plane.broker.names
    plane.store.jobs[1], plane.store.events[1] = job(1, 1)
    await plane.broker.declare_job_queue(names.job(1))
    await plane.reissuer.publish([due("retrying")])
    assert await plane.broker.queue_depth(names.job(1)) == 0  # not yet: it waits in a delay queue
    message = await eventually(lambda: plane.broker.get(names.job(1)), timeout=5, what="the retry")
    (event,) = decode(message.body, EventRange).events
    assert (event.number, event.attempt, event.issue) == (0, 2, 2)  # the next attempt
    ann = await eventually(lambda: plane.broker.get(names.jobs), timeout=5, what="its announcement")
    assert decode(ann.body, JobAnnouncement).job_id == 1
    assert [d.number for d, _ in plane.store.issued] == [0]  # marked published once confirmed


async def test_an_event_out_of_attempts_is_dead_lettered_with_its_error(plane: Plane) -> None:
    names = plane.broker.names
    await plane.reissuer.publish([due("failed", attempt=3, error="boom")])
    (message,) = await drain(plane.broker, names.dlq)
    letter = decode(message.body, DeadLetter)
    assert (letter.job_id, letter.number, letter.attempts, letter.error) == (1, 0, 3, "boom")
    assert message.headers["x-reason"] == "boom"
    assert [d.number for d in plane.store.dead] == [0]
