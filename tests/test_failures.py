"""Failure paths with the real RabbitMQ and Postgres: retries, the dead-letter queue,
replay, poison messages, cancel, and workers that die or are stopped.

The workflow-level check in each: every event ends in exactly one terminal state, the
attempt counts add up, and RabbitMQ holds no queue of a finished workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.config import Settings
from dispatcher.control import ControlPlane
from dispatcher.replay import Selector, cancel, replay
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.joblog import job_commands
from schemas.messages import DeadLetter, EventRange, StatusUpdate, decode
from tests.helpers import eventually, queue_gone
from transport.rabbitmq import Broker
from workers.worker import Worker

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def write_workflow(
    tmp_path: Path,
    payloads: dict[str, list[str]],
    *,
    function: str = "tests.payloads:flaky",
    retries: int = 2,
    retry_delay: float = 0.1,
    per_job: int = 10,
    per_range: int = 1,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A workflow of labels run in order (each depends on the previous one)."""
    labels = list(payloads)
    mapping = {label: {str(i): p for i, p in enumerate(items)} for label, items in payloads.items()}
    (tmp_path / "mapping.json").write_text(json.dumps(mapping))
    spec: dict[str, Any] = {
        "name": "failures",
        "mapping": "mapping.json",
        "enableEventService": True,
        "maxEventsPerJob": per_job,
        "eventsPerRange": per_range,
        "numberOfRetries": retries + 1,  # BPS counts every attempt
        "retryDelay": retry_delay,
        "pipetask": {
            label: {"payloadFunction": function, **({"dependsOn": [labels[i - 1]]} if i else {})}
            for i, label in enumerate(labels)
        },
    }
    spec.update(extra or {})
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Cluster:
    """A control plane and workers in this process, on the test's own namespace."""

    def __init__(self, settings: Settings, store: Store, broker: Broker) -> None:
        self.settings, self.store, self.broker = settings, store, broker
        self.control = ControlPlane(settings, store, broker)
        self.tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(self) -> None:
        stop = asyncio.Event()
        self.tasks.append((stop, asyncio.create_task(self.control.run(stop))))

    async def worker(self, slots: int = 2, grace: float = 5.0) -> tuple[Worker, asyncio.Event, asyncio.Task[None]]:
        broker = await Broker.connect(self.settings.amqp_url, self.settings.names, client="pytest-worker")
        w = Worker(
            broker,
            slots=slots,
            work_dir=self.settings.work_dir,
            log_dir=self.settings.log_dir,
            grace=grace,
            heartbeat_interval=self.settings.heartbeat_interval,
        )
        stop = asyncio.Event()

        async def run() -> None:
            try:
                await w.run(stop)
            finally:
                await broker.close()

        task = asyncio.create_task(run())
        self.tasks.append((stop, task))
        return w, stop, task

    async def stop(self) -> None:
        for stop, task in reversed(self.tasks):
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)


@pytest.fixture
async def cluster(settings: Settings, store: Store, broker: Broker) -> AsyncIterator[Cluster]:
    c = Cluster(settings, store, broker)
    await c.start()
    yield c
    await c.stop()


async def wait_workflow(store: Store, wf: int, timeout: float = 60) -> str:
    async def ended() -> str | None:
        status = await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf)
        return status if status != "running" else None

    try:
        return await eventually(ended, timeout=timeout, what=f"workflow {wf} to end")
    except AssertionError as exc:
        rows = await store.pool.fetch("SELECT job_id, number, payload, status, attempt FROM events ORDER BY 1, 2")
        jobs = await store.pool.fetch("SELECT id, status FROM jobs ORDER BY id")
        raise AssertionError(f"{exc}\nevents: {[tuple(r) for r in rows]}\njobs: {[tuple(r) for r in jobs]}") from None


async def events(store: Store) -> dict[str, tuple[str, int]]:
    """payload -> (status, attempt)"""
    rows = await store.pool.fetch("SELECT payload, status, attempt FROM events")
    return {r["payload"]: (r["status"], r["attempt"]) for r in rows}


async def attempts(store: Store) -> dict[str, list[tuple[int, str]]]:
    rows = await store.pool.fetch(
        "SELECT e.payload, a.attempt, a.status FROM attempts a JOIN events e USING (job_id, number) ORDER BY a.attempt"
    )
    out: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        out.setdefault(r["payload"], []).append((r["attempt"], r["status"]))
    return out


async def dead_letters(broker: Broker) -> list[DeadLetter]:
    """Everything in es.dlq (read, then put back)."""
    ch = await broker.channel()
    q = await ch.get_queue(broker.names.dlq, ensure=False)
    held, out = [], []
    while (m := await q.get(no_ack=False, fail=False)) is not None:
        held.append(m)
        out.append(decode(m.body, DeadLetter))
    for m in held:
        await m.nack(requeue=True)
    await ch.close()
    return out


async def assert_no_job_queues(store: Store, broker: Broker, wf: int) -> None:
    for job_id in [r["id"] for r in await store.pool.fetch("SELECT id FROM jobs WHERE workflow_id = $1", wf)]:
        name = broker.names.job(job_id)  # deleted in the background
        await eventually(lambda name=name: queue_gone(broker, name), timeout=10, what=f"{name} deleted")


async def assert_consistent(store: Store) -> None:
    """Every event in exactly one terminal state, which its own attempt recorded; attempts
    numbered 1..n without gaps. (After a broker restart a range may run again as a later
    attempt of an event already finished: history keeps it, the event does not move.)"""
    rows = await store.pool.fetch(
        "SELECT e.status, e.attempt, a.status AS attempt_status, "
        "(SELECT count(*) FROM attempts x WHERE x.job_id = e.job_id AND x.number = e.number) AS n, "
        "(SELECT max(attempt) FROM attempts x WHERE x.job_id = e.job_id AND x.number = e.number) AS last "
        "FROM events e LEFT JOIN attempts a ON a.job_id = e.job_id AND a.number = e.number AND a.attempt = e.attempt"
    )
    assert rows
    for r in rows:
        assert r["status"] in ("finished", "failed", "cancelled"), dict(r)
        if r["status"] != "cancelled":
            assert r["attempt_status"] == r["status"], dict(r)
            assert r["n"] == r["last"] >= r["attempt"], dict(r)

    # an attempt lost with its worker does not stay 'running': the next one records its end.
    # (A range rerun after a broker restart may still be running when its workflow, whose
    # events all ended before, is finished: its end comes a moment later.)
    async def none_stranded() -> bool:
        return not await store.pool.fetchval(
            "SELECT count(*) FROM attempts a JOIN events e USING (job_id, number) "
            "WHERE a.status = 'running' AND e.status <> 'cancelled'"
        )

    await eventually(none_stranded, timeout=10, what="no attempt left 'running'")
    await assert_counts_kept(store)


async def assert_counts_kept(store: Store) -> None:
    """The event counters (kept by the statements on events) say what the events say."""
    counted = await store.pool.fetch(
        "SELECT task_id, status, sum(n) AS n FROM event_counts GROUP BY 1, 2 HAVING sum(n) <> 0 ORDER BY 1, 2"
    )
    grouped = await store.pool.fetch("SELECT task_id, status, count(*) AS n FROM events GROUP BY 1, 2 ORDER BY 1, 2")
    assert grouped, "the comparison must see events"
    assert [tuple(r) for r in counted] == [tuple(r) for r in grouped]


async def test_failed_events_are_retried_alone_then_dead_lettered_then_replayed(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    payloads = {"isr": ["ok:1", f"once:{tmp_path / 'flaky'}", "ok:2", f"until:{fixed}", "ok:3"], "final": ["ok:final"]}
    wf = await submit(store, write_workflow(tmp_path, payloads, retries=2))
    await cluster.worker(slots=2)

    assert await wait_workflow(store, wf) == "failed"
    ev = await events(store)
    assert ev == {
        "ok:1": ("finished", 1),
        f"once:{tmp_path / 'flaky'}": ("finished", 2),
        "ok:2": ("finished", 1),
        f"until:{fixed}": ("failed", 3),
        "ok:3": ("finished", 1),
        "ok:final": ("cancelled", 0),
    }
    at = await attempts(store)
    assert at[f"once:{tmp_path / 'flaky'}"] == [(1, "failed"), (2, "finished")]
    assert at[f"until:{fixed}"] == [(1, "failed"), (2, "failed"), (3, "failed")]
    tasks = dict(await store.pool.fetch("SELECT label, status FROM tasks"))
    assert tasks == {"isr": "failed", "final": "cancelled"}  # downstream did not start
    error = await store.pool.fetchval("SELECT error FROM events WHERE payload = $1", f"until:{fixed}")
    assert error.startswith("ValueError: not fixed yet")
    # the retry waited in a delay queue (0.1 s x 2^(n-1), +-25 %), not in a worker
    gaps = await store.pool.fetch(
        "SELECT a2.started_at - a1.ended_at AS gap, a1.attempt FROM attempts a1 JOIN attempts a2 "
        "ON a2.job_id = a1.job_id AND a2.number = a1.number AND a2.attempt = a1.attempt + 1"
    )
    assert gaps and all(g["gap"].total_seconds() >= 0.09 for g in gaps)
    [dead] = await dead_letters(broker)
    assert (dead.workflow_id, dead.label, dead.payload, dead.attempts) == (wf, "isr", f"until:{fixed}", 3)
    assert "not fixed yet" in (dead.error or "")
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)

    # replay: --dry-run changes nothing; after the fix, the event runs again and the
    # workflow (with its cancelled downstream task) finishes
    fixed.write_text("yes")
    dry = await replay(store, broker, Selector(workflow=wf), dry_run=True)
    assert [o.action for o in dry] == ["would replay"]
    assert len(await dead_letters(broker)) == 1
    assert (await events(store))[f"until:{fixed}"] == ("failed", 3)
    assert await replay(store, broker, Selector(workflow=wf + 1)) == []  # selector matches nothing
    done = await replay(store, broker, Selector(workflow=wf, task="isr"))
    assert [o.action for o in done] == ["replayed"]
    assert await dead_letters(broker) == []
    assert await replay(store, broker, Selector(workflow=wf)) == []  # twice: nothing more to run
    assert await wait_workflow(store, wf) == "finished"
    ev = await events(store)
    assert ev[f"until:{fixed}"] == ("finished", 4) and ev["ok:final"] == ("finished", 1)
    assert await store.pool.fetchval("SELECT replays FROM events WHERE payload = $1", f"until:{fixed}") == 1
    assert (await attempts(store))[f"until:{fixed}"] == [(1, "failed"), (2, "failed"), (3, "failed"), (4, "finished")]
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)


async def test_a_retry_after_every_worker_left_brings_a_worker_back(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    flaky = f"once:{tmp_path / 'flaky'}"
    wf = await submit(store, write_workflow(tmp_path, {"isr": ["ok:1", flaky]}, retry_delay=1.5))
    worker, _, _ = await cluster.worker(slots=2)

    async def worker_left() -> bool:
        attempt = await store.pool.fetchval("SELECT attempt FROM attempts WHERE attempt = 1 AND status = 'failed'")
        return bool(attempt) and not worker.jobs

    await eventually(worker_left, what="the worker to leave the job while the retry waits")
    assert await store.pool.fetchval("SELECT status FROM events WHERE payload = $1", flaky) == "retrying"
    assert await wait_workflow(store, wf) == "finished"
    assert (await events(store))[flaky] == ("finished", 2)
    log_text = Path(await store.pool.fetchval("SELECT log_path FROM jobs")).read_text()
    assert "attempt 1" in log_text and "attempt 2" in log_text  # both set-ups appended to the one log
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)


async def test_a_jobs_log_upload_runs_while_the_next_job_sets_up(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    label = {"payloadFunction": "tests.payloads:flaky", "jobSetupCommand": "sleep 0.5", "jobTeardownCommand": "sleep 1"}
    payloads = {"isr": [f"ok:{i}" for i in range(4)]}
    wf = await submit(store, write_workflow(tmp_path, payloads, per_job=2, extra={"pipetask": {"isr": label}}))
    await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "finished"

    async def logs() -> list[str] | None:
        # a log is known from its job's set-up on; its tear-down is appended last
        paths = [r["log_path"] for r in await store.pool.fetch("SELECT log_path FROM jobs ORDER BY id")]
        texts = None if None in paths else [Path(p).read_text() for p in paths]
        return texts if texts and all(t.count("=== job tear-down") == 2 for t in texts) else None

    texts = await eventually(logs, what="both jobs' logs")
    first, second = ({c.what: c for c in job_commands(text)} for text in texts)
    assert set(first) == set(second) == {"set-up", "tear-down"}  # each logged with its worker and times
    # one slot, yet the later job was set up while the earlier one's log was uploaded
    earlier, later = sorted((first, second), key=lambda commands: commands["set-up"].start)
    assert later["set-up"].start < earlier["tear-down"].end
    await assert_consistent(store)


async def test_poison_messages_go_to_the_dlq_and_work_goes_on(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"isr": ["2:a", "0:b"]}, function="tests.payloads:sleepy"))
    job_id = await store.pool.fetchval("SELECT id FROM jobs")
    await eventually(lambda: broker.queue_depth(broker.names.job(job_id)), what="the job's queue")
    await broker.publish(broker.names.job(job_id), b'{"v": 2, "kind": "range", "workflow_id": 1}')
    await broker.publish(broker.names.jobs, b"not json at all")
    await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "finished"

    # the bad announcement is taken once the worker has left the job
    async def both_dead() -> bool:
        return await broker.queue_depth(broker.names.dlq) == 2

    await eventually(both_dead, what="both dead letters")
    ch = await broker.channel()
    q = await ch.get_queue(broker.names.dlq, ensure=False)
    reasons = []
    while (m := await q.get(fail=False)) is not None:
        reasons.append((m.headers["x-source-queue"], m.headers["x-reason"]))
    await ch.close()
    assert sorted(reasons) == sorted(
        [
            (broker.names.job(job_id), "invalid EventRange: job_id: Field required"),
            (broker.names.jobs, reasons[0][1] if reasons[0][0] == broker.names.jobs else reasons[1][1]),
        ]
    )
    assert any("undecodable" in r for _, r in reasons)
    await assert_consistent(store)


async def test_cancel_stops_running_payloads_and_removes_queues(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf = await submit(
        store,
        write_workflow(
            tmp_path,
            {"isr": [f"30:{i}" for i in range(6)], "final": ["0:f"]},
            function="tests.payloads:sleepy",
            per_job=3,
        ),
    )
    worker, _, _ = await cluster.worker(slots=2)
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) = 2 FROM events WHERE status = 'running'"),
        what="two running events",
    )
    jobs = await cancel(store, broker, wf)
    assert jobs is not None and len(jobs) == 2
    assert await cancel(store, broker, wf) is None  # not running any more
    await eventually(lambda: asyncio.sleep(0, not worker.jobs), timeout=5, what="the worker to drop the job")
    assert await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf) == "cancelled"
    assert dict(await store.pool.fetch("SELECT status, count(*) FROM events GROUP BY status")) == {"cancelled": 7}
    assert dict(await store.pool.fetch("SELECT status, count(*) FROM tasks GROUP BY status")) == {"cancelled": 2}
    await assert_no_job_queues(store, broker, wf)
    await asyncio.sleep(0.5)  # a late status from the stopped payloads changes nothing
    assert dict(await store.pool.fetch("SELECT status, count(*) FROM events GROUP BY status")) == {"cancelled": 7}


async def test_sigterm_lets_running_events_finish_and_gives_the_rest_back(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    # one range of 4 events of 0.6 s on a 1-slot worker
    wf = await submit(
        store,
        write_workflow(
            tmp_path, {"isr": [f"0.6:{i}" for i in range(4)]}, function="tests.payloads:sleepy", per_job=4, per_range=4
        ),
    )
    first, stop, task = await cluster.worker(slots=1, grace=5)
    await eventually(lambda: store.pool.fetchval("SELECT count(*) = 1 FROM events WHERE status = 'running'"))
    stop.set()
    await asyncio.wait_for(task, 10)  # returns (exit 0 for the CLI) once the running event finished

    async def first_recorded() -> list[str] | None:
        rows = await store.pool.fetch("SELECT status FROM events ORDER BY number")
        statuses = [r["status"] for r in rows]
        return statuses if statuses[0] != "running" else None

    # its status was confirmed in es.status before the worker returned; the bookkeeper
    # records it a moment later
    assert await eventually(first_recorded, what="the finished event recorded") == [
        "finished",
        "queued",
        "queued",
        "queued",
    ]
    second, _, _ = await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "finished"
    rows = await store.pool.fetch("SELECT attempt, worker FROM events ORDER BY number")
    assert [r["attempt"] for r in rows] == [1, 1, 1, 1]  # a shutdown is not a failed attempt
    assert [r["worker"] for r in rows] == [first.id, second.id, second.id, second.id]
    assert await store.pool.fetchval("SELECT count(*) FROM attempts WHERE status = 'failed'") == 0
    assert await store.pool.fetchval("SELECT status FROM workers WHERE id = $1", first.id) == "stopped"
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)


async def test_grace_period_over_stops_the_payload_and_gives_it_back(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"isr": ["3:a"]}, function="tests.payloads:sleepy"))
    _, stop, task = await cluster.worker(slots=1, grace=0.3)
    await eventually(lambda: store.pool.fetchval("SELECT count(*) = 1 FROM events WHERE status = 'running'"))
    stop.set()
    await asyncio.wait_for(task, 3)  # well before the 3 s payload would end
    await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "finished"
    assert await store.pool.fetchval("SELECT attempt FROM events") == 1
    await assert_consistent(store)


async def lose_a_range(store: Store, broker: Broker, *, ran: bool, worker: str = "ghost") -> None:
    """Take the first range of the (only) job as a worker would, and lose it: RabbitMQ
    delivers it again, flagged redelivered. ``ran``: the bookkeeping saw its events start
    under ``worker`` first (as it does for a worker killed mid-event)."""
    job_id = await store.pool.fetchval("SELECT max(id) FROM jobs")
    await eventually(lambda: broker.queue_depth(broker.names.job(job_id)), what="the job's ranges")
    ch = await broker.channel()
    queue = await ch.get_queue(broker.names.job(job_id), ensure=False)
    message = await queue.get(no_ack=False, fail=False)
    assert message is not None
    rng = decode(message.body, EventRange)
    if ran:
        await store.apply(
            [
                StatusUpdate(
                    job_id=job_id, number=e.number, attempt=e.attempt, status="running", worker=worker, started_at=T0
                )
                for e in rng.events
            ]
        )
    await message.nack(requeue=True)
    await ch.close()


async def test_a_range_that_keeps_killing_workers_is_given_up_with_a_dead_letter(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"isr": ["ok:1", "ok:2"]}, per_job=2, retries=0))
    # a range whose only attempt was seen running under a worker that was lost
    # (tests/test_crashes.py kills real workers for it)
    await lose_a_range(store, broker, ran=True)
    await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "failed"
    rows = {
        r["payload"]: (r["status"], r["attempt"], r["error"])
        for r in await store.pool.fetch("SELECT payload, status, attempt, error FROM events")
    }
    failed = [p for p, (status, _, _) in rows.items() if status == "failed"]
    assert len(failed) == 1  # only the range that was lost; the other event ran
    _, attempt, error = rows[failed[0]]
    assert attempt == 1 and "lost with its worker ghost" in error
    [dead] = await dead_letters(broker)
    assert dead.payload == failed[0] and "lost with its worker ghost" in (dead.error or "")
    await assert_no_job_queues(store, broker, wf)


async def test_a_range_delivered_again_charges_only_the_attempts_postgres_saw_running(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    # lost twice: once never started (held in a prefetch, or a broker crash: no charge),
    # once while running under "ghost" (charged to ghost, with its start)
    wf = await submit(store, write_workflow(tmp_path, {"isr": ["ok:1"]}))
    await lose_a_range(store, broker, ran=False)
    # the redelivered copy is returned by the next worker, then issued again
    worker, stop, task = await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "finished"
    assert (await events(store))["ok:1"] == ("finished", 1)  # never charged
    assert [tuple(r) for r in await store.pool.fetch("SELECT attempt, status FROM attempts")] == [(1, "finished")]
    stop.set()
    await task

    wf = await submit(store, write_workflow(tmp_path, {"isr": ["ok:2"]}))
    await lose_a_range(store, broker, ran=True)
    worker, _, _ = await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "finished"
    attempts = [
        (r["attempt"], r["status"], r["worker"], r["started_at"], r["error"])
        for r in await store.pool.fetch(
            "SELECT a.* FROM attempts a JOIN events e USING (job_id, number) WHERE e.payload = 'ok:2' ORDER BY attempt"
        )
    ]
    assert attempts[0] == (1, "failed", "ghost", T0, "lost with its worker ghost")
    assert attempts[1][:2] == (2, "finished") and attempts[1][2] == worker.id
    assert (await events(store))["ok:2"] == ("finished", 2)
    await assert_consistent(store)


async def a_dead_letter(cluster: Cluster, store: Store, broker: Broker, tmp_path: Path) -> tuple[int, Path, DeadLetter]:
    """A workflow whose one event failed its one attempt: (workflow, the file that fixes
    it, its dead letter)."""
    fixed = tmp_path / "fixed"
    wf = await submit(store, write_workflow(tmp_path, {"isr": [f"until:{fixed}"]}, retries=0))
    await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "failed"
    [dead] = await dead_letters(broker)
    return wf, fixed, dead


async def test_replay_killed_after_the_bookkeeping_step_publishes_on_the_next_run(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf, fixed, dead = await a_dead_letter(cluster, store, broker, tmp_path)
    fixed.write_text("yes")
    # a replay that died right after giving the event its fresh attempt in Postgres,
    # before republishing: the dead letter is still in the DLQ, nothing is in the queue
    assert await store.replay_event(wf, dead.job_id, dead.number, dead.attempts)
    assert (await events(store))[f"until:{fixed}"] == ("queued", 2)
    outcomes = await replay(store, broker, Selector())
    assert [o.action for o in outcomes] == ["replayed"]
    assert await wait_workflow(store, wf) == "finished"
    assert (await events(store))[f"until:{fixed}"] == ("finished", 2)
    assert await dead_letters(broker) == []
    await assert_consistent(store)
