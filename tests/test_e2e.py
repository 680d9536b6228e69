"""Acceptance: the Rubin example end to end with the real CLI as subprocesses —
``dispatcher start``, two ``dispatcher worker`` and ``dispatcher submit --wait``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from dispatcher.config import Settings
from tests.conftest import EXAMPLES
from tests.helpers import eventually, queue_gone
from transport.rabbitmq import Broker

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def cli_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # the payload commands say "python3": let them find this interpreter first
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DISPATCHER_AMQP_URL=settings.amqp_url,
        DISPATCHER_DATABASE_URL=settings.database_url,
        DISPATCHER_QUEUE_PREFIX=settings.names.prefix,
        DISPATCHER_WORK_DIR=str(settings.work_dir),
        DISPATCHER_LOG_DIR=str(settings.log_dir),
        DISPATCHER_MONITOR_PORT="0",  # any free port: tests never fight over one
    )
    return env


@pytest.fixture
def processes(settings: Settings, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``dispatcher start`` and two workers; stopped with SIGTERM afterwards."""
    env = cli_env(settings)
    procs = []
    for i, args in enumerate([["start"], ["worker", "--slots", "3"], ["worker", "--slots", "3"]]):
        out = (tmp_path / f"proc{i}.log").open("wb")
        procs.append(subprocess.Popen([str(BIN / "dispatcher"), *args], env=env, stdout=out, stderr=out))
    yield procs
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def test_rubin_workflow_end_to_end(
    settings: Settings, broker: Broker, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    env = cli_env(settings)
    submit = await asyncio.create_subprocess_exec(
        str(BIN / "dispatcher"),
        "submit",
        str(EXAMPLES / "rubin-isr.yaml"),
        "--wait",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(submit.communicate(), 240)
    except TimeoutError:
        submit.kill()
        logs = "\n".join((tmp_path / f"proc{i}.log").read_text()[-3000:] for i in range(3))
        pytest.fail(f"workflow did not finish in time; process logs:\n{logs}")
    assert submit.returncode == 0, err.decode()[-3000:]
    wf = int(out.decode().strip())
    assert "1002/1002 events done" in err.decode()
    for p in processes:
        assert p.poll() is None, "control plane and workers keep running"

    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT status FROM workflows WHERE id = $1", wf) == "finished"
        counts = dict(await conn.fetch("SELECT status, count(*) FROM events GROUP BY status"))
        assert counts == {"finished": 1002}
        # isr: 28 jobs of at most 36 (int(21600 / 600)), balanced: no short last job
        sizes = [
            r["n_events"]
            for r in await conn.fetch(
                "SELECT j.n_events FROM jobs j JOIN tasks t ON t.id = j.task_id WHERE t.label = 'isr' ORDER BY j.seq"
            )
        ]
        assert len(sizes) == 28 and sum(sizes) == 1000 and set(sizes) == {35, 36}
        # final starts only after every isr event finished; isr only after pipeinit
        bounds = {
            r["label"]: (r["first"], r["last"])
            for r in await conn.fetch(
                "SELECT t.label, min(e.started_at) AS first, max(e.ended_at) AS last "
                "FROM events e JOIN tasks t ON t.id = e.task_id GROUP BY t.label"
            )
        }
        assert bounds["final"][0] >= bounds["isr"][1]
        assert bounds["isr"][0] >= bounds["pipeinit"][1]
        # both workers took part, every event ran exactly once
        assert await conn.fetchval("SELECT count(DISTINCT worker) FROM events") == 2
        assert await conn.fetchval("SELECT count(*) FROM attempts") == 1002
        jobs = await conn.fetch("SELECT id, status, log_path, n_events FROM jobs ORDER BY id")
    finally:
        await conn.close()

    # one log file per job, holding every event of the job with its markers and output
    assert {j["status"] for j in jobs} == {"finished"}
    log_files = sorted(settings.log_dir.rglob("*.log"))
    assert len(log_files) == len(jobs) == 30
    assert sorted(Path(j["log_path"]) for j in jobs) == [p.resolve() for p in log_files]
    for job in jobs:
        text = Path(job["log_path"]).read_text()
        numbers = re.findall(r"^=== event (\d+) finished exit_code=0", text, re.MULTILINE)
        assert len(numbers) == job["n_events"], job["log_path"]
        for n in numbers:
            assert f"_{n}\n" in text  # the payload's own output, e.g. "isr isr_payload_7"

    # RabbitMQ holds no queue of the finished workflow (deleted in the background)
    for job in jobs:
        name = broker.names.job(job["id"])
        await eventually(lambda name=name: queue_gone(broker, name), timeout=10, what=f"{name} deleted")
    assert await broker.queue_depth(broker.names.status) == 0

    # dispatcher status --json agrees
    status = subprocess.run(
        [str(BIN / "dispatcher"), "status", str(wf), "--json"], env=env, capture_output=True, check=True
    )
    data = orjson.loads(status.stdout)
    # SIGTERM: the control plane and the workers stop cleanly (exit 0)
    for p in processes:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=30) for p in processes] == [0, 0, 0]
    assert [(t["label"], t["status"], t["events"]) for t in data["tasks"]] == [
        ("pipeinit", "finished", {"finished": 1}),
        ("isr", "finished", {"finished": 1000}),
        ("final", "finished", {"finished": 1}),
    ]
