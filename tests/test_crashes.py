"""Crash safety with the real CLI as subprocesses: a worker killed with SIGKILL, RabbitMQ
stopped and started, Postgres restarted — each mid-run. Every event ends exactly once in
the bookkeeping, attempts add up, and no queue of the finished workflow is left."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import asyncpg
import pytest

from dispatcher.config import Settings
from dispatcher.store import Store
from dispatcher.submit import submit
from tests.conftest import ROOT
from tests.helpers import eventually
from tests.test_e2e import BIN, cli_env
from tests.test_failures import assert_consistent, assert_no_job_queues, write_workflow
from transport.rabbitmq import Broker

pytestmark = pytest.mark.slow


class Processes:
    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.env = cli_env(settings) | {"DISPATCHER_HEARTBEAT_INTERVAL": "0.5", "PYTHONPATH": str(ROOT)}
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        out = (self.tmp_path / f"proc{len(self.procs)}-{args[0]}.log").open("wb")
        proc = subprocess.Popen([str(BIN / "dispatcher"), *args], env=self.env, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.tmp_path.glob("proc*.log")))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot take SIGTERM
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()




async def finished(settings: Settings, wf: int, procs: Processes, timeout: float = 90) -> None:
    async def check() -> bool:
        try:
            conn = await asyncpg.connect(settings.database_url)
        except (OSError, asyncpg.PostgresError):
            return False
        try:
            return bool(await conn.fetchval("SELECT status = 'finished' FROM workflows WHERE id = $1", wf))
        finally:
            await conn.close()

    try:
        await eventually(check, timeout=timeout, what=f"workflow {wf} to finish")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{procs.logs()}") from None


async def test_worker_killed_mid_event_its_work_is_finished_by_another(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    wf = await submit(
        store, write_workflow(tmp_path, {"isr": [f"0.8:{i}" for i in range(8)]}, function="tests.payloads:sleepy")
    )
    procs.start("start")
    victim = procs.start("worker", "--slots", "2")
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) = 2 FROM events WHERE status = 'running'"),
        what="two running events",
    )
    running = {r["number"] for r in await store.pool.fetch("SELECT number FROM events WHERE status = 'running'")}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # the job's announcement was taken by the dead worker: the watchdog must announce it again
    procs.start("worker", "--slots", "2")
    await finished(settings, wf, procs)
    rows = await store.pool.fetch("SELECT number, status, attempt FROM events ORDER BY number")
    assert {r["status"] for r in rows} == {"finished"}
    for r in rows:  # a range redelivered after its worker died is a new attempt
        assert r["attempt"] == (2 if r["number"] in running else 1), dict(r)
    assert await store.pool.fetchval("SELECT count(*) FROM workers WHERE status = 'lost'") == 1
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)


async def test_a_range_that_keeps_killing_workers_is_given_up(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    wf = await submit(
        store,
        write_workflow(tmp_path, {"isr": ["die:1", "ok:2"]}, function="tests.payloads:deadly", per_job=2),
    )
    procs.start("start")
    workers = [procs.start("worker")]
    attempts = 3  # write_workflow's default: 2 retries

    async def ended() -> bool:
        if workers[-1].poll() is not None:  # killed by the range: the next worker comes
            assert len(workers) <= attempts + 1, f"too many workers killed\n{procs.logs()}"
            workers.append(procs.start("worker"))
        return bool(await store.pool.fetchval("SELECT status <> 'running' FROM workflows WHERE id = $1", wf))

    await eventually(ended, timeout=90, what="the workflow to end")
    # the first kill left no 'running' on record (a blocking function reports none):
    # the range came back asking for its start to be confirmed, and each kill after
    # that was charged to the worker it killed, until the attempts ran out
    assert sum(w.poll() == -signal.SIGKILL for w in workers) == attempts + 1
    rows = {r["payload"]: dict(r) for r in await store.pool.fetch("SELECT payload, status, attempt, error FROM events")}
    assert rows["ok:2"]["status"] == "finished"
    assert rows["die:1"]["status"] == "failed" and rows["die:1"]["attempt"] == attempts
    assert "lost with its worker" in rows["die:1"]["error"]
    lost = await store.pool.fetch(
        "SELECT a.worker FROM attempts a JOIN events e USING (job_id, number) WHERE e.payload = 'die:1'"
    )
    assert len({r["worker"] for r in lost}) == attempts  # each attempt names the worker it killed
    assert await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf) == "failed"
    await assert_consistent(store)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs a local RabbitMQ (rabbitmqctl)")
async def test_rabbitmq_restart_mid_run(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    wf = await submit(
        store,
        write_workflow(
            tmp_path, {"isr": [f"0.05:{i}" for i in range(400)]}, function="tests.payloads:sleepy", per_job=40
        ),
    )
    procs.start("start")
    procs.start("worker", "--slots", "3")
    procs.start("worker", "--slots", "3")
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) >= 60 FROM events WHERE status = 'finished'"),
        what="the run to be under way",
    )
    try:
        await asyncio.to_thread(_rabbitmqctl, "stop_app")
        assert await store.pool.fetchval("SELECT count(*) < 400 FROM events WHERE status = 'finished'")
        await asyncio.sleep(1)
    finally:
        await asyncio.to_thread(_rabbitmqctl, "start_app")
    await finished(settings, wf, procs, timeout=120)
    assert dict(await store.pool.fetch("SELECT status, count(*) FROM events GROUP BY status")) == {"finished": 400}
    for p in procs.procs:
        assert p.poll() is None, f"a process died with the broker:\n{procs.logs()}"
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)


def _postgres_cluster() -> list[str] | None:
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return None
    version = sorted(os.listdir("/etc/postgresql"))[0]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


@pytest.mark.skipif(_postgres_cluster() is None, reason="needs a local Postgres cluster (pg_ctlcluster)")
async def test_postgres_restart_mid_run(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    wf = await submit(
        store,
        write_workflow(
            tmp_path, {"isr": [f"0.05:{i}" for i in range(300)]}, function="tests.payloads:sleepy", per_job=30
        ),
    )
    procs.start("start")
    procs.start("worker", "--slots", "3")
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) >= 40 FROM events WHERE status = 'finished'"),
        what="the run to be under way",
    )
    await store.close()  # our own connections die with the server
    cluster = _postgres_cluster()
    assert cluster is not None
    subprocess.run([*cluster, "restart"], check=True, capture_output=True, timeout=120)
    await finished(settings, wf, procs, timeout=120)
    store.pool = (await Store.connect(settings.database_url)).pool  # the fixture closes it
    counts = dict(await store.pool.fetch("SELECT status, count(*) FROM events GROUP BY status"))
    assert counts == {"finished": 300}
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)
    for p in procs.procs:
        assert p.poll() is None, f"a process died with the database:\n{procs.logs()}"
