"""The real PanDA pilot (``panda-pilot`` 3.7.0.36, which calls us through ``curl``)
against ``dispatcher start``'s API: its CommunicationManager, its generic EventService
executor end to end with a payload of ours (tests/pilotkit), and a pilot killed while it
holds events, which a native ``dispatcher worker`` then finishes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.config import Settings
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import DeadLetter, decode
from tests.conftest import ROOT
from tests.helpers import eventually
from tests.test_crashes import Processes, finished
from tests.test_failures import assert_consistent, assert_no_job_queues
from tests.test_pilot_api import PILOT_COMMAND, pilot_workflow
from transport.rabbitmq import Broker

KIT = ROOT / "tests" / "pilotkit"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def start_dispatcher(procs: Processes, **env: str) -> str:
    """``dispatcher start`` with its monitor (and so the pilots' API) on a port of ours."""
    port = free_port()
    procs.env |= {"DISPATCHER_MONITOR_PORT": str(port), "DISPATCHER_PILOT_WAIT": "5", **env}
    procs.start("start")
    url = f"http://127.0.0.1:{port}"

    async def listening() -> bool:
        try:
            async with httpx.AsyncClient() as c:
                return (await c.post(f"{url}/server/panda/checkEventsAvailability", data={})).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(listening, timeout=30, what="the dispatcher's API")
    return url


@pytest.fixture
async def pilot_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Path]:
    """The pilot's environment in this process (its https module writes curl configs to $PILOT_HOME)."""
    from pilot.util import https

    home = tmp_path / "pilot"
    home.mkdir()
    monkeypatch.setenv("PILOT_HOME", str(home))
    monkeypatch.setenv("PILOT_USER", "generic")
    https.https_setup(None, None)
    yield home


async def test_the_pilots_communication_manager_runs_a_workflow_with_a_retry_and_a_fatal_event(
    settings: Settings,
    store: Store,
    broker: Broker,
    procs: Processes,
    pilot_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pilot.common.exception import CommunicationFailure
    from pilot.eventservice.communicationmanager.communicationmanager import CommunicationManager

    wf = await submit(store, pilot_workflow(tmp_path, 6, per_job=3))
    monkeypatch.setenv("PANDA_SERVER_URL", await start_dispatcher(procs))
    comm = CommunicationManager()
    comm.start()

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        return asyncio.to_thread(getattr(comm, method), *args, **kwargs)

    try:
        seen: list[int] = []
        for _ in range(2):
            [job] = await call("get_jobs", 1, None, {"node": "wn01", "site": "SITE"})
            seen.append(job["PandaID"])
            ranges = await call("get_event_ranges", 10, None, job)
            ids = [r["eventRangeID"] for r in ranges]
            assert len(ids) == 3, ranges
            if len(seen) == 1:
                # the first job: one event fails (retried), one fails for good
                failed = [{"eventRangeID": ids[1], "eventStatus": "failed", "errorCode": 1220}]
                fatal = [{"eventRangeID": ids[2], "eventStatus": "fatal", "errorDiag": "corrupt input"}]
                for reports in (failed, fatal):
                    answer = await call("update_events", {"eventRanges": json.dumps(reports), "version": 0})
                    assert answer["StatusCode"] == 0 and json.loads(answer["Returns"]) == [True], answer
                retry = await call("get_event_ranges", 10, None, job)  # the retry, once its delay is over
                assert [r["eventRangeID"] for r in retry] == [ids[1][: -len("-1")] + "-2"]
                ids = [ids[0], retry[0]["eventRangeID"]]
            zipped = [
                {
                    "zipFile": {"numEvents": len(ids)},
                    "eventRanges": [{"eventRangeID": i, "eventStatus": "finished"} for i in ids],
                }
            ]
            answer = await call("update_events", {"eventRanges": json.dumps(zipped), "version": 1})
            assert answer == {"StatusCode": 0, "Returns": [True] * len(ids), "Command": {}}
            [update] = await call("update_jobs", [{"jobId": job["PandaID"], "state": "finished"}])
            assert update["StatusCode"] == 0
        assert len(set(seen)) == 2  # one pilot per job
        with pytest.raises(CommunicationFailure, match="No jobs in panda"):  # none left
            await call("get_jobs", 1, None, {"node": "wn01"})
    finally:
        comm.stop()
        await asyncio.to_thread(comm.join, 30)

    async def ended() -> str | None:
        status = await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf)
        return status if status != "running" else None

    assert await eventually(ended, timeout=30, what="the workflow to end") == "failed"  # the fatal event
    events = {r["number"]: (r["status"], r["attempt"]) for r in await store.pool.fetch("SELECT * FROM events")}
    assert events == {0: ("finished", 1), 1: ("finished", 2), 2: ("failed", 1)} | {
        n: ("finished", 1) for n in (3, 4, 5)
    }
    dead = await eventually(lambda: broker.get(broker.names.dlq), what="the fatal event's dead letter")
    letter = decode(dead.body, DeadLetter)
    assert (letter.number, letter.attempts, letter.error) == (2, 1, "pilot reported fatal: corrupt input")
    await dead.ack()
    workers = {r["id"]: r["status"] for r in await store.pool.fetch("SELECT id, status FROM workers")}
    assert workers == {f"pilot:{j}": "stopped" for j in seen}


def run_pilot(home: Path, url: str) -> subprocess.Popen[bytes]:
    """The pilot's executor for one job, in a process of its own (it changes directory and
    leaves threads behind), with its payload in a process group of their own."""
    env = dict(os.environ, PANDA_SERVER_URL=url, PYTHONPATH=str(KIT))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    out = (home.parent / f"{home.name}.out").open("wb")
    return subprocess.Popen(
        [sys.executable, str(KIT / "run_pilot.py"), str(home)], env=env, stdout=out, stderr=out, start_new_session=True
    )


async def exited(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    code = await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
    return code


async def test_the_pilots_generic_executor_runs_our_payload_end_to_end(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    marker = tmp_path / "failed-once"
    payloads = [f"ok:{i}" for i in range(6)]
    payloads[4] = f"once:{marker}"  # fails at its first attempt: retried, and handed to the pilot again
    wf = await submit(store, pilot_workflow(tmp_path, payloads, per_job=3))
    url = await start_dispatcher(procs)
    pilots = [run_pilot(tmp_path / f"pilot{i}", url) for i in range(2)]
    codes = [await exited(p) for p in pilots]
    logs = "\n".join((tmp_path / f"pilot{i}.out").read_text() for i in range(2))
    assert codes == [0, 0], logs + procs.logs()
    await finished(settings, wf, procs, timeout=30)
    rows = await store.pool.fetch("SELECT number, status, attempt, worker FROM events ORDER BY number")
    assert [(r["status"], r["attempt"]) for r in rows] == [("finished", 2 if r["number"] == 4 else 1) for r in rows]
    jobs = [r["id"] for r in await store.pool.fetch("SELECT id FROM jobs ORDER BY id")]
    assert {r["worker"] for r in rows} == {f"pilot:{j}" for j in jobs}  # each job ran under its pilot
    failed = await store.pool.fetchrow("SELECT status, error FROM attempts WHERE number = 4 AND attempt = 1")
    assert (failed["status"], failed["error"]) == ("failed", "pilot reported failed (error 1220)")
    # the payload ran every event: its outputs were staged out by the pilot (tarred, moved)
    assert marker.exists()
    await assert_consistent(store)
    await assert_no_job_queues(store, broker, wf)


async def test_a_killed_pilots_events_come_back_after_its_lease_and_a_native_worker_finishes_them(
    settings: Settings, store: Store, broker: Broker, procs: Processes, tmp_path: Path
) -> None:
    # the pilot's payload takes a minute an event: it is killed holding what it was handed
    wf = await submit(store, pilot_workflow(tmp_path, 5, per_job=5, pilot=f"{PILOT_COMMAND} --sleep 60"))
    url = await start_dispatcher(procs, DISPATCHER_PILOT_LEASE="3")
    pilot = run_pilot(tmp_path / "pilot", url)
    # it asks for two ranges (twice its cores), and is handed two events
    await eventually(
        lambda: store.pool.fetchval(
            "SELECT count(*) = 2 FROM events WHERE status = 'running' AND worker LIKE 'pilot:%'"
        ),
        timeout=60,
        what="events handed to the pilot",
    )
    held = await store.pool.fetch("SELECT number FROM events WHERE status = 'running'")
    os.killpg(pilot.pid, signal.SIGKILL)  # the pilot and its payload
    pilot.wait()
    procs.start("worker", "--slots", "2")
    await finished(settings, wf, procs, timeout=60)
    rows = {r["number"]: r for r in await store.pool.fetch("SELECT number, status, attempt, worker FROM events")}
    numbers = {r["number"] for r in held}
    assert {n: (r["status"], r["attempt"]) for n, r in rows.items()} == {
        n: ("finished", 2 if n in numbers else 1) for n in range(5)
    }
    assert not any(r["worker"].startswith("pilot:") for r in rows.values())  # finished by the native worker
    job = await store.pool.fetchval("SELECT id FROM jobs")
    charged = await store.pool.fetch("SELECT number, status, worker, error FROM attempts WHERE attempt = 1")
    lost = {r["number"] for r in charged if r["worker"] == f"pilot:{job}"}
    assert lost == numbers
    assert {r["error"] for r in charged if r["number"] in numbers} == {f"lost with its worker pilot:{job}"}
    assert await store.pool.fetchval("SELECT status FROM workers WHERE id = $1", f"pilot:{job}") == "lost"
    await assert_consistent(store)
