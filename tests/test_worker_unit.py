"""The worker on the in-memory transport (no RabbitMQ, no Postgres): what it reports,
acks and gives back when ranges come again, when it stops, when a payload fails, when a
job cannot be set up, and when a job is cancelled. Each test takes well under a second;
the same behaviour against the real services is in test_e2e, test_failures and
test_crashes."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from schemas.messages import (
    CancelJobs,
    EventRange,
    EventSpec,
    JobAnnouncement,
    PayloadSpec,
    Refused,
    StatusBatch,
    StatusUpdate,
    decode,
    encode,
)
from tests.helpers import eventually
from transport.interface import Incoming, Transport
from transport.memory import MemoryBroker
from transport.names import Names, job_log_path
from workers.worker import Worker

FLAKY = "tests.payloads:flaky"
SLEEPY = "tests.payloads:sleepy"


@dataclass
class Rig:
    """A broker in memory, a control plane's connection to it that collects every
    status batch, and workers on connections of their own."""

    memory: MemoryBroker
    control: Transport
    names: Names
    tmp: Path
    batches: list[StatusBatch] = field(default_factory=list)
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)

    @property
    def updates(self) -> list[StatusUpdate]:
        return [u for b in self.batches for u in b.updates]

    @property
    def refused(self) -> list[Refused]:
        return [r for b in self.batches for r in b.refused]

    def finals(self, status: str) -> list[int]:
        return sorted(u.number for u in self.updates if u.status == status)

    async def job(
        self, payloads: list[str], *, size: int = 1, job_id: int = 1, spec: PayloadSpec | None = None
    ) -> str:
        """A job's ranges in its queue, and its announcement."""
        queue = self.names.job(job_id)
        await self.control.declare_job_queue(queue)
        events = [EventSpec(number=i, payload=p, attempt=1, issue=1) for i, p in enumerate(payloads)]
        await self.control.publish_many(
            (queue, encode(EventRange(workflow_id=1, job_id=job_id, events=events[i : i + size])))
            for i in range(0, len(events), size)
        )
        spec = spec or PayloadSpec(function=FLAKY)
        announcement = JobAnnouncement(workflow_id=1, task_id=1, job_id=job_id, label="t", payload=spec)
        await self.control.publish(self.names.jobs, encode(announcement))
        return queue

    def worker(self, **options: object) -> Worker:
        defaults: dict[str, object] = {"work_dir": self.tmp / "work", "log_dir": self.tmp / "logs", "grace": 5.0}
        return Worker(self.memory.connect(self.names), heartbeat_interval=0.1, **(defaults | options))  # type: ignore[arg-type]

    def start(self, worker: Worker) -> asyncio.Event:
        stop = asyncio.Event()
        self.running.append((stop, asyncio.create_task(worker.run(stop))))
        return stop

    async def until(self, check: Callable[[], bool], what: str) -> None:
        await eventually(lambda: asyncio.sleep(0, check()), timeout=5, what=what)

    async def stopped(self, worker: Worker, stop: asyncio.Event) -> None:
        stop.set()
        task = next(t for s, t in self.running if s is stop)
        await asyncio.wait_for(task, 5)
        await worker.broker.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    memory = MemoryBroker()
    names = Names(prefix="unit.")
    control = memory.connect(names)
    await control.declare_topology()
    r = Rig(memory, control, names, tmp_path)

    async def collect(message: Incoming) -> None:
        r.batches.append(decode(message.body, StatusBatch))
        await message.ack()

    await control.consume(names.status, collect, prefetch=100)
    yield r
    for stop, task in r.running:
        stop.set()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 5)


async def test_a_job_is_set_up_once_runs_every_event_and_acks_every_range(rig: Rig) -> None:
    spec = PayloadSpec(function=FLAKY, setup="true")
    queue = await rig.job([f"ok:{i}" for i in range(5)], size=2, spec=spec)
    worker = rig.worker(slots=2)
    stop = rig.start(worker)
    await rig.until(lambda: rig.finals("finished") == [0, 1, 2, 3, 4], "every event finished")
    await rig.until(lambda: not worker.jobs, "the job torn down")
    assert await rig.control.queue_state(queue) == (0, 0)  # every range acked, no consumer left
    log = job_log_path(rig.tmp / "logs", 1, 1).read_text()
    assert log.count("=== job set-up") == 2  # its header and its footer: one set-up
    assert len(re.findall(r"^=== event \d+ finished exit_code=0", log, re.MULTILINE)) == 5
    assert all(u.worker == worker.id for u in rig.updates)
    await rig.stopped(worker, stop)
    assert worker.events_done == 5
    assert any(b.heartbeat and b.heartbeat.jobs == [1] for b in rig.batches)


async def test_a_range_delivered_again_is_returned_not_run(rig: Rig, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    queue = await rig.job([f"once:{marker}"])
    lost = rig.memory.connect(rig.names)  # a worker that took the range and died
    assert await lost.get(queue) is not None
    await lost.close()
    worker = rig.worker()
    stop = rig.start(worker)
    await rig.until(lambda: rig.finals("returned") == [0], "the range returned")
    returned = next(u for u in rig.updates if u.status == "returned")
    assert (returned.attempt, returned.issue) == (1, 1)  # names its issue: a stale one reissues nothing
    assert not marker.exists()  # never run
    await rig.until(lambda: not worker.jobs, "the job left")
    assert await rig.control.queue_state(queue) == (0, 0)  # acked
    await rig.stopped(worker, stop)


async def test_ranges_a_stopping_worker_did_not_start_go_back(rig: Rig) -> None:
    queue = await rig.job(["0.2", "0.2"], spec=PayloadSpec(function=SLEEPY))
    worker = rig.worker(slots=1, prefetch=2)  # holds the second range while it runs the first
    stop = rig.start(worker)
    await rig.until(lambda: rig.finals("running") == [0], "the first event running")
    await rig.stopped(worker, stop)
    assert rig.finals("finished") == [0]  # it ran to its end within the grace period
    assert 1 not in {u.number for u in rig.updates}  # never started, so never reported
    back = await rig.control.get(queue)
    assert back is not None and back.redelivered
    assert [e.number for e in decode(back.body, EventRange).events] == [1]


async def test_a_payload_still_running_after_the_grace_period_is_stopped_and_given_back(rig: Rig) -> None:
    queue = await rig.job(["30"], spec=PayloadSpec(function=SLEEPY))
    worker = rig.worker(grace=0.1)
    stop = rig.start(worker)
    await rig.until(lambda: rig.finals("running") == [0], "the event running")
    await rig.stopped(worker, stop)
    stopped = [u for u in rig.updates if u.status == "stopped"]
    assert [(u.number, u.attempt, u.issue) for u in stopped] == [(0, 1, 1)]  # issued again at the same attempt
    assert rig.finals("finished") == rig.finals("failed") == []
    assert await rig.control.queue_state(queue) == (0, 0)  # acked: its event was given back by status


async def test_a_failed_attempt_is_reported_once_for_the_control_plane_to_retry(rig: Rig) -> None:
    queue = await rig.job(["until:/nonexistent/fix", "ok:1"])
    worker = rig.worker()
    stop = rig.start(worker)
    await rig.until(lambda: rig.finals("failed") == [0] and rig.finals("finished") == [1], "both ended")
    failed = next(u for u in rig.updates if u.status == "failed")
    assert failed.attempt == 1 and failed.error and "not fixed yet" in failed.error
    await asyncio.sleep(0.1)
    assert len([u for u in rig.updates if u.number == 0 and u.status != "running"]) == 1  # not retried here
    assert await rig.control.queue_state(queue) == (0, 0)
    await rig.stopped(worker, stop)


async def test_a_job_whose_set_up_fails_is_given_up_with_its_id(rig: Rig) -> None:
    queue = await rig.job(["ok:0"], spec=PayloadSpec(function=FLAKY, setup="false"))
    worker = rig.worker()
    stop = rig.start(worker)
    await rig.until(lambda: bool(rig.refused), "the refusal")
    (refusal,) = rig.refused
    assert refusal.setup_failed == 1 and "set-up failed" in refusal.reason
    assert refusal.source == rig.names.jobs
    assert await rig.control.queue_state(queue) == (1, 0)  # its range untouched, for another worker
    assert worker.jobs == {}
    await rig.stopped(worker, stop)
    assert await rig.control.queue_depth(rig.names.jobs) == 0  # the announcement was acked, not given back


async def test_cancel_stops_the_running_payload_and_drops_the_ranges_delivered(rig: Rig) -> None:
    queue = await rig.job(["30", "30", "30"], spec=PayloadSpec(function=SLEEPY))
    worker = rig.worker(slots=1, prefetch=3)
    stop = rig.start(worker)
    await rig.until(lambda: rig.finals("running") == [0], "the first event running")
    await rig.control.broadcast(encode(CancelJobs(job_ids=[1])))
    await rig.until(lambda: not worker.jobs, "the job torn down")
    assert {u.status for u in rig.updates} == {"running"}  # no final status: the bookkeeping cancelled them
    assert await rig.control.queue_state(queue) == (0, 0)  # the ranges it held are dropped, not given back
    assert "=== event 0 cancelled" in job_log_path(rig.tmp / "logs", 1, 1).read_text()
    await rig.stopped(worker, stop)


async def test_a_range_that_does_not_decode_or_names_another_job_is_refused(rig: Rig) -> None:
    queue = await rig.job(["ok:0"])
    await rig.control.publish(queue, b"not json")
    other = EventRange(workflow_id=1, job_id=2, events=[EventSpec(number=9, payload="ok", attempt=1, issue=1)])
    await rig.control.publish(queue, encode(other))
    worker = rig.worker()
    stop = rig.start(worker)
    await rig.until(lambda: len(rig.refused) == 2 and rig.finals("finished") == [0], "two refusals and the event")
    reasons = sorted(r.reason for r in rig.refused)
    assert "range of job 2 in the queue of job 1" in reasons[0] and "undecodable" in reasons[1]
    assert {r.source for r in rig.refused} == {queue}
    assert await rig.control.queue_state(queue) == (0, 0)  # refused ranges are acked: never run, never stuck
    await rig.stopped(worker, stop)


async def test_a_second_worker_joins_a_job_it_is_invited_to(rig: Rig) -> None:
    queue = await rig.job(["0.05"] * 8, spec=PayloadSpec(function=SLEEPY))
    first = rig.worker(slots=1)
    stop_first = rig.start(first)
    await rig.until(lambda: any(b.invite == [1] for b in rig.batches), "the invitation")
    # the control plane's answer to an invitation: the job announced again
    announcement = JobAnnouncement(workflow_id=1, task_id=1, job_id=1, label="t", payload=PayloadSpec(function=SLEEPY))
    await rig.control.publish(rig.names.jobs, encode(announcement))
    second = rig.worker(slots=1)
    stop_second = rig.start(second)
    await rig.until(lambda: rig.finals("finished") == list(range(8)), "every event finished")
    assert {u.worker for u in rig.updates if u.status == "finished"} == {first.id, second.id}
    assert await rig.control.queue_state(queue) == (0, 0)
    await rig.stopped(first, stop_first)
    await rig.stopped(second, stop_second)


async def test_a_worker_waiting_for_a_job_stops_at_once(rig: Rig) -> None:
    worker = rig.worker()
    stop = rig.start(worker)
    await rig.until(lambda: any(b.heartbeat for b in rig.batches), "a heartbeat")
    await rig.stopped(worker, stop)
    assert rig.batches[-1].heartbeat is not None and rig.batches[-1].heartbeat.state == "stopped"


async def test_a_job_that_comes_back_during_its_tear_down_is_set_up_apart_from_it(rig: Rig) -> None:
    """The job's work drained, its tear-down is under way (its command takes a while), and
    new work of the job arrives (a retry, a range given back): the new set-up runs it in a
    directory of its own, which the old tear-down does not remove under it."""
    spec = PayloadSpec(function=SLEEPY, teardown="sleep 0.5")
    queue = await rig.job(["0.01"], spec=spec)
    worker = rig.worker(slots=1)
    rig.start(worker)
    await rig.until(lambda: rig.finals("finished") == [0], "the first event finished")
    await rig.until(lambda: not worker.jobs, "the job leaving")
    again = EventRange(workflow_id=1, job_id=1, events=[EventSpec(number=1, payload="1.0", attempt=1, issue=1)])
    await rig.control.publish(queue, encode(again))
    announcement = JobAnnouncement(workflow_id=1, task_id=1, job_id=1, label="t", payload=spec)
    await rig.control.publish(rig.names.jobs, encode(announcement))
    # (its payload writes its result after the old tear-down removed the old directory)
    await eventually(lambda: asyncio.sleep(0, rig.finals("finished") == [0, 1]), timeout=8, what="the new event")
    assert rig.finals("failed") == []


async def test_a_payload_whose_files_fail_here_fails_its_attempt_and_is_not_left_running(rig: Rig) -> None:
    """Its work directory gone (a full disk would do as well): the result cannot be written.
    That attempt fails, reported, and the range is acked; it is not abandoned unacked as if
    the broker were down."""
    queue = await rig.job([str(rig.tmp / "work")], spec=PayloadSpec(function="tests.payloads:lose_work_dirs"))
    worker = rig.worker(slots=1)
    stop = rig.start(worker)
    await rig.until(lambda: rig.finals("failed") == [0], "the attempt failed")
    [failed] = [u for u in rig.updates if u.status == "failed"]
    assert failed.error is not None and "could not run it" in failed.error
    await rig.until(lambda: not worker.jobs, "the job torn down")
    assert await rig.control.queue_state(queue) == (0, 0)  # acked, not held
    await rig.stopped(worker, stop)
