"""One bad input never stops the system, and a broker client can do no more than its role:
payload output no column takes, status messages the database refuses, forged
announcements, statuses and dead letters, hung and killed workers. Real services."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import yaml

from dispatcher.config import Settings
from dispatcher.control import ControlPlane
from dispatcher.releaser import Releaser
from dispatcher.replay import Selector, replay
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import (
    SCHEMA_VERSION,
    DeadLetter,
    EventRange,
    EventSpec,
    Heartbeat,
    Refused,
    StatusBatch,
    StatusUpdate,
    decode,
    encode,
)
from tests.conftest import ROOT
from tests.helpers import eventually
from tests.test_control import control as control
from tests.test_crashes import Processes
from tests.test_failures import (
    Cluster,
    a_dead_letter,
    assert_consistent,
    assert_no_job_queues,
    dead_letters,
    events,
    wait_workflow,
    write_workflow,
)
from tests.test_failures import cluster as cluster
from transport.outage import is_outage, patiently
from transport.rabbitmq import Broker, with_heartbeat

T0 = datetime(2026, 1, 1, tzinfo=UTC)

# -- outages are not bugs ----------------------------------------------------------------


async def test_a_programming_error_is_not_waited_out_as_an_outage() -> None:
    assert is_outage(ConnectionRefusedError()) and is_outage(RuntimeError("Connection was not opened"))
    assert not is_outage(RuntimeError("a bug")) and not is_outage(TypeError("a bug"))
    calls = 0

    async def buggy() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(patiently(buggy, what="test"), 5)
    assert calls == 1  # surfaced at once, not retried as "service unavailable"


def test_connections_carry_short_amqp_heartbeats() -> None:
    assert with_heartbeat("amqp://u:p@h:5672/") == "amqp://u:p@h:5672/?heartbeat=10"
    assert with_heartbeat("amqp://h/?x=1") == "amqp://h/?x=1&heartbeat=10"
    assert with_heartbeat("amqp://h/?heartbeat=3") == "amqp://h/?heartbeat=3"  # the user's own wins


# -- the bookkeeper never stops for one message -----------------------------------------


async def queued_job(store: Store, tmp_path: Path, n: int = 3) -> int:
    await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(n)]}, per_job=n))
    job_id: int = await store.pool.fetchval("SELECT id FROM jobs")
    await store.pool.execute("UPDATE jobs SET status = 'releasing' WHERE id = $1", job_id)
    await store.mark_jobs_queued([job_id])
    return job_id


def finished(job_id: int, number: int, error: str | None = None, attempt: int = 1) -> bytes:
    update = StatusUpdate(
        job_id=job_id, number=number, attempt=attempt, status="finished", worker="w", exit_code=0, error=error
    )
    return encode(StatusBatch(worker="w", updates=[update]))


async def dlq_reasons(broker: Broker, count: int) -> list[tuple[bytes, str]]:
    ch = await broker.channel()
    dlq = await ch.get_queue(broker.names.dlq, ensure=False)
    out = []
    for _ in range(count):
        msg = await eventually(lambda: dlq.get(fail=False), what="a dead letter")
        out.append((msg.body, str((msg.headers or {}).get("x-reason", ""))))
        await msg.ack()
    await ch.close()
    return out


async def test_a_batch_the_database_refuses_is_applied_message_by_message(
    settings: Settings, store: Store, broker: Broker, tmp_path: Path
) -> None:
    # any value the database refuses for good (not an outage) stands for all of them:
    # here a constraint of this test's own database
    job_id = await queued_job(store, tmp_path, n=4)
    await store.pool.execute("ALTER TABLE attempts ADD CONSTRAINT no_boom CHECK (error IS DISTINCT FROM 'boom')")
    # the bad message also holds a good update (event 3), whose range is acked already
    bad = StatusBatch(
        worker="w",
        updates=[
            StatusUpdate(job_id=job_id, number=1, attempt=1, status="finished", worker="w", error="boom"),
            StatusUpdate(job_id=job_id, number=3, attempt=1, status="finished", worker="w"),
        ],
    )
    for body in (finished(job_id, 0), encode(bad), finished(job_id, 2)):
        await broker.publish(broker.names.status, body)  # in one batch: the control plane is not up yet
    cp = ControlPlane(settings, store, broker)
    stop = asyncio.Event()
    task = asyncio.create_task(cp.run(stop))
    try:
        [(body, reason)] = await dlq_reasons(broker, 1)
        assert body == encode(bad)
        assert "the database refused this status message" in reason and "no_boom" in reason
        expected = [(0, "finished"), (1, "queued"), (2, "finished"), (3, "finished")]

        async def statuses() -> bool:  # the third message is applied after the second's dead letter
            rows = await store.pool.fetch("SELECT number, status FROM events WHERE job_id = $1 ORDER BY 1", job_id)
            return [tuple(r) for r in rows] == expected

        await eventually(statuses, timeout=5, what="the other messages applied")
        # and the bookkeeper goes on
        await broker.publish(broker.names.status, finished(job_id, 1))
        await eventually(
            lambda: store.pool.fetchval("SELECT status = 'finished' FROM jobs WHERE id = $1", job_id),
            what="the job to finish",
        )
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("attempt", 2**31, "attempt"),
        ("number", 2**63, "number"),
        ("worker", "w\u0000x", None),  # mended, not refused: the update applies
        ("attempt", 5, "never issued"),  # a forged 'running' at a future attempt
    ],
)
async def test_a_hostile_status_is_dead_lettered_or_mended_and_never_stops_the_bookkeeper(
    control: ControlPlane, store: Store, broker: Broker, tmp_path: Path, field: str, value: object, reason: str | None
) -> None:
    job_id = await queued_job(store, tmp_path)
    update = {"job_id": job_id, "number": 0, "attempt": 1, "status": "running", "worker": "w", field: value}
    body = orjson.dumps({"v": SCHEMA_VERSION, "kind": "status", "worker": "w", "updates": [update]})
    await broker.publish(broker.names.status, body)
    if reason is not None:
        [(dead, why)] = await dlq_reasons(broker, 1)
        assert dead == body and reason in why
        assert (
            await store.pool.fetchval("SELECT status FROM events WHERE job_id = $1 AND number = 0", job_id) == "queued"
        )
    else:
        worker = await eventually(
            lambda: store.pool.fetchval("SELECT worker FROM events WHERE job_id = $1 AND number = 0", job_id)
        )
        assert worker == "w\ufffdx"
    await broker.publish(broker.names.status, finished(job_id, 1))  # the next message is applied
    await eventually(lambda: store.pool.fetchval("SELECT status = 'finished' FROM events WHERE number = 1"))


async def test_payload_output_no_column_takes_is_recorded_mended(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    # a command printing a NUL, a function raising NUL or a lone surrogate: each used to
    # kill the control plane (or the worker) at every redelivery
    nul_command = "python3 -c \"import sys; sys.stdout.write('x\\0y {payload}'); sys.exit(3)\""
    spec = {
        "name": "bad-text",
        "mapping": "mapping.json",
        "numberOfRetries": 1,  # one attempt
        "pipetask": {
            "cmd": {"payloadCommand": nul_command},
            "fn": {"payloadFunction": "tests.payloads:bad_text"},
        },
    }
    (tmp_path / "mapping.json").write_text(json.dumps({"cmd": {"0": "p"}, "fn": {"0": "nul", "1": "surrogate"}}))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    wf = await submit(store, tmp_path / "wf.yaml")
    _, _, task = await cluster.worker(slots=2)
    assert await wait_workflow(store, wf) == "failed"
    errors = dict(await store.pool.fetch("SELECT payload, error FROM events"))
    assert "x\ufffdy p" in errors["p"]
    assert errors["nul"] == "ValueError: bad\ufffdbyte"
    assert errors["surrogate"] == "ValueError: bad \ufffd byte"
    assert {d.payload for d in await dead_letters(broker)} == {"p", "nul", "surrogate"}
    assert not task.done()  # the worker lives on
    await assert_consistent(store)


# -- what a broker client can do (the trust model) ----------------------------------------


async def test_an_announcement_that_names_a_queue_is_refused_and_never_consumed(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    # today's announcements name no queue; one that does is forged: a worker told to
    # consume es.dlq as a job queue would loop on it for ever
    await broker.publish(broker.names.dlq, b"a dead letter that must stay")
    forged = {
        "v": SCHEMA_VERSION,
        "kind": "job",
        "workflow_id": 1,
        "task_id": 1,
        "job_id": 1,
        "label": "x",
        "queue": broker.names.dlq,
        "payload": {"command": "touch {payload}"},
    }
    await broker.publish(broker.names.jobs, orjson.dumps(forged))
    worker, _, _ = await cluster.worker(slots=1)
    [(body, reason)] = [(b, r) for b, r in await dlq_reasons(broker, 2) if b != b"a dead letter that must stay"]
    assert body == orjson.dumps(forged) and "queue" in reason
    assert not worker.jobs
    # and the work still runs
    wf = await submit(store, write_workflow(tmp_path, {"isr": ["ok:1"]}))
    assert await wait_workflow(store, wf) == "finished"


async def test_replay_runs_the_payload_postgres_holds_not_the_dead_letters(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf, fixed, real = await a_dead_letter(cluster, store, broker, tmp_path)
    # swap the dead letter for a forged one: same event, another payload, other attempts
    await (await (await broker.channel()).get_queue(broker.names.dlq, ensure=False)).purge()
    forged = real.model_copy(update={"payload": f"ok:{tmp_path / 'pwned'}", "attempts": 7})
    await broker.publish(broker.names.dlq, encode(forged))
    fixed.write_text("yes")
    assert [o.action for o in await replay(store, broker, Selector())] == ["replayed"]
    assert await wait_workflow(store, wf) == "finished"
    assert (await events(store))[f"until:{fixed}"] == ("finished", 2)  # Postgres's payload and attempt
    log = Path(await store.pool.fetchval("SELECT log_path FROM jobs")).read_text()
    assert "pwned" not in log and f"until:{fixed}" in log
    assert isinstance(decode(encode(forged), DeadLetter), DeadLetter)


# -- work that used to get stuck -------------------------------------------------------------


async def test_a_stale_release_keeps_the_queue_whose_ranges_a_worker_holds(
    cluster: Cluster, store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(4)]}, per_job=4))
    job_id = await store.pool.fetchval("SELECT id FROM jobs")
    queue = broker.names.job(job_id)
    await eventually(lambda: broker.queue_depth(queue), what="the job's ranges")
    # a worker holds a range unacked; its control plane died mid-release (left 'releasing')
    holder = await broker.open_job(queue, prefetch=1)
    held = await holder.get()
    assert held is not None
    await store.pool.execute("UPDATE jobs SET status = 'releasing', claimed_at = now() - interval '1 hour'")
    await Releaser(store, broker, window=10).reclaim(older_than=30)
    assert await broker.queue_depth(queue) is not None  # not deleted under the holder
    await holder.close()  # the holder dies: its range comes back to the queue
    await cluster.worker(slots=1)
    assert await wait_workflow(store, wf) == "finished"
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)


async def test_a_job_left_releasing_whose_events_all_finished_is_finished(
    control: ControlPlane, store: Store, broker: Broker, tmp_path: Path
) -> None:
    job_id = await queued_job(store, tmp_path, n=2)
    await store.pool.execute("UPDATE jobs SET status = 'releasing' WHERE id = $1", job_id)  # never marked queued
    await store.apply([StatusUpdate(job_id=job_id, number=n, attempt=1, status="finished", worker="w") for n in (0, 1)])
    done = await control.finisher.check([job_id])
    assert done.jobs == [(job_id, "finished")]


async def test_a_job_with_ranges_and_no_consumer_is_announced_at_once(
    store: Store, broker: Broker, settings: Settings, tmp_path: Path
) -> None:
    # its only worker died: RabbitMQ gave its ranges back, nobody consumes them, and its
    # announcement was taken long ago
    await submit(store, write_workflow(tmp_path, {"isr": ["ok:1", "ok:2"]}))
    cp = ControlPlane(settings, store, broker)
    await cp.releaser.release_once()
    job_id = await store.pool.fetchval("SELECT id FROM jobs")
    ch = await broker.channel()
    await (await ch.get_queue(broker.names.jobs, ensure=False)).purge()
    await ch.close()
    # a worker setting the job up consumes its queue only once set up: not announced
    beat = Heartbeat(host="h", pid=1, slots=1, state="live", setting_up=[job_id], started_at=T0)
    await store.apply([], heartbeats=[("w", beat)])
    assert await cp.announce_unconsumed() == []
    assert await cp.announce_unconsumed() == []
    # that worker died during its set-up (lost), or none is on it: found twice in a row
    await store.apply([], heartbeats=[("w", beat.model_copy(update={"setting_up": []}))])
    assert await cp.announce_unconsumed() == []  # the first sighting: a worker may be taking it up
    assert await cp.announce_unconsumed() == [job_id]
    assert await broker.queue_depth(broker.names.jobs) == 1
    consumer = await broker.open_job(broker.names.job(job_id))
    try:  # consumed: nothing to announce
        assert await cp.announce_unconsumed() == []
        assert await cp.announce_unconsumed() == []
    finally:
        await consumer.close()


# -- workers as processes: hung, killed --------------------------------------------------------


async def test_a_hung_worker_loses_its_ranges_to_rabbitmq_heartbeats(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    # heartbeats of 1 s here (10 s by default): RabbitMQ drops the stopped worker's
    # connection after about two of them, and its range goes to the other worker
    procs.env["DISPATCHER_AMQP_URL"] = with_heartbeat(settings.amqp_url, 1)
    wf = await submit(
        store,
        write_workflow(tmp_path, {"isr": ["3:a", "0.1:b"]}, function="tests.payloads:sleepy", per_job=2),
    )
    procs.start("start")
    hung = procs.start("worker", "--slots", "1")
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) = 1 FROM events WHERE status = 'running'"), what="a running event"
    )
    os.kill(hung.pid, signal.SIGSTOP)
    procs.start("worker", "--slots", "1")
    await eventually(
        lambda: store.pool.fetchval("SELECT status = 'finished' FROM workflows WHERE id = $1", wf),
        timeout=30,
        what=f"the workflow to finish while a worker hangs\n{procs.logs()}",
    )
    assert hung.poll() is None  # still stopped: RabbitMQ took its range back, not a restart
    lost = await store.pool.fetchval("SELECT count(*) FROM attempts WHERE error LIKE 'lost with its worker%'")
    assert lost == 1


async def test_every_finished_event_is_in_its_jobs_log_after_a_sigkill(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    payloads = [f"0.05:{i}" for i in range(60)]
    wf = await submit(store, write_workflow(tmp_path, {"isr": payloads}, function="tests.payloads:sleepy", per_job=30))
    procs.start("start")
    victim = procs.start("worker", "--slots", "2")
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) >= 15 FROM events WHERE status = 'finished'"),
        what="the run under way",
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    procs.start("worker", "--slots", "2")
    await eventually(
        lambda: store.pool.fetchval("SELECT status = 'finished' FROM workflows WHERE id = $1", wf),
        timeout=60,
        what=f"the workflow to finish\n{procs.logs()}",
    )
    rows = await store.pool.fetch(
        "SELECT e.job_id, e.number, e.attempt, j.workflow_id FROM events e JOIN jobs j ON j.id = e.job_id"
    )
    for r in rows:
        text = (settings.log_dir / f"workflow-{r['workflow_id']}" / f"job-{r['job_id']}.log").read_text()
        assert f"=== event {r['number']} attempt {r['attempt']} " in text, f"event {r['number']} missing from its log"
        assert f"=== event {r['number']} finished " in text


def test_the_worker_and_the_control_plane_do_not_import_each_other() -> None:
    # the control plane used to take now() from the worker package
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, dispatcher.control, dispatcher.bookkeeper, dispatcher.monitor;"
            "print('workers' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip() == "False"


async def test_a_message_a_worker_refused_is_kept_in_the_dlq_but_never_replayed(
    control: ControlPlane, store: Store, broker: Broker, tmp_path: Path
) -> None:
    # a worker may report a refused message, which the bookkeeper forwards to es.dlq: its
    # body must not pass for a dead letter that replay would act on
    job_id = await queued_job(store, tmp_path)
    forged = DeadLetter(workflow_id=1, job_id=job_id, label="isr", number=0, payload="ok:forged", attempts=1, at=T0)
    refused = Refused(source="es.jobs", reason="forged", body=base64.b64encode(encode(forged)).decode())
    await broker.publish(broker.names.status, encode(StatusBatch(worker="w", refused=[refused])))
    await eventually(lambda: broker.queue_depth(broker.names.dlq), what="the forwarded message")
    outcomes = await replay(store, broker, Selector())
    assert outcomes == []  # kept for a person to read, not replayed

    async def kept() -> bool:  # (a quorum queue takes a message given back a moment later)
        return await broker.queue_depth(broker.names.dlq) == 1

    await eventually(kept, timeout=5, what="the message back in es.dlq")


async def test_invitations_announce_only_active_jobs_at_most_once_a_second(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    job_id = await queued_job(store, tmp_path)
    releaser = Releaser(store, broker, window=10)
    await releaser.invite([job_id, job_id + 1000, job_id])  # one real, one forged
    assert await broker.queue_depth(broker.names.jobs) == 1
    await releaser.invite([job_id] * 50)  # a flood from one status batch
    assert await broker.queue_depth(broker.names.jobs) == 1


async def test_a_range_rabbitmq_dead_letters_is_returned_and_a_poison_one_goes_to_the_dlq(
    control: ControlPlane, store: Store, broker: Broker, tmp_path: Path
) -> None:
    # ranges a job queue dead-letters (a policy's limit; here a reject) reach the control
    # plane: a valid one is issued again from Postgres, an undecodable one is kept in es.dlq
    job_id = await queued_job(store, tmp_path, n=1)
    queue = broker.names.job(job_id)
    await broker.declare_job_queue(queue)
    good = EventRange(workflow_id=1, job_id=job_id, events=[EventSpec(number=0, payload="ignored", attempt=1)])
    await broker.publish(queue, encode(good))
    await broker.publish(queue, b"not a range")
    ch = await broker.channel()
    q = await ch.get_queue(queue, ensure=False)
    for _ in range(2):
        message = await eventually(lambda: q.get(no_ack=False, fail=False), what="a range")
        await message.reject(requeue=False)
    await ch.close()
    [(body, reason)] = await dlq_reasons(broker, 1)
    assert body == b"not a range" and "undecodable" in reason
    reissued = await eventually(lambda: broker.queue_depth(queue), what="the range issued again")
    assert reissued == 1
    ch = await broker.channel()
    again = decode((await (await ch.get_queue(queue, ensure=False)).get(no_ack=True)).body, EventRange)
    await ch.close()
    assert [(e.number, e.payload, e.issue) for e in again.events] == [(0, "ok:0", 1)]  # Postgres's payload
