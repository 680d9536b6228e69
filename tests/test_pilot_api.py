"""The PanDA pilot API (``/server/panda/*``) over HTTP against the real Postgres and
RabbitMQ, with a control plane in this process: jobs and ranges as the pilot gets them,
its reports through the bookkeeping, leases, and bad requests that change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dispatcher.config import Settings
from dispatcher.control import ControlPlane
from dispatcher.monitor import MonitorConfig, create_app
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import DeadLetter, decode
from tests.helpers import eventually
from transport.rabbitmq import Broker

TOKEN = "pilot-s3cret"


PILOT_COMMAND = "es_payload.py --channel-env PILOT_EVENTRANGECHANNEL"  # tests/pilotkit


def pilot_workflow(
    tmp_path: Path,
    payloads: int | list[str],
    *,
    per_job: int,
    retries: int = 2,
    per_range: int = 1,
    pilot: str = PILOT_COMMAND,
) -> Path:
    """One EventService label of these payloads (``n``: ``ok:0`` .. ``ok:n-1``). They run
    natively (``tests.payloads:flaky``) or under a pilot (``pilot``: its command)."""
    items = [f"ok:{i}" for i in range(payloads)] if isinstance(payloads, int) else payloads
    (tmp_path / "map.json").write_text(json.dumps({"isr": {str(i): p for i, p in enumerate(items)}}))
    spec = {
        "name": "pilots",
        "mapping": "map.json",
        "enableEventService": True,
        "maxEventsPerJob": per_job,
        "numberOfRetries": retries + 1,  # BPS counts every attempt
        "retryDelay": 0.1,
        "eventsPerRange": per_range,
        "pipetask": {"isr": {"payloadFunction": "tests.payloads:flaky", "pilotCommand": pilot}},
    }
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@dataclass
class Api:
    client: httpx.AsyncClient
    store: Store
    broker: Broker

    async def call(self, method: str, **form: Any) -> dict[str, Any]:
        r = await self.client.post(f"/server/panda/{method}", data={k: str(v) for k, v in form.items()})
        answer: dict[str, Any] = r.json()
        return answer

    async def ranges(self, job: int, task: int, n: int = 100) -> list[dict[str, Any]]:
        answer = await self.call("getEventRanges", pandaID=job, jobsetID=job, taskID=task, nRanges=n)
        assert answer["StatusCode"] == 0, answer
        ranges: list[dict[str, Any]] = answer["eventRanges"]
        return ranges

    async def report(self, *reports: tuple[str, str], version: int = 0) -> dict[str, Any]:
        items: list[dict[str, Any]] = [{"eventRangeID": rid, "eventStatus": st} for rid, st in reports]
        body: list[dict[str, Any]] = items
        if version:
            body = [{"zipFile": {"numEvents": len(items), "lfn": "EventService_premerge_x.tar"}, "eventRanges": items}]
        return await self.call("updateEventRanges", eventRanges=json.dumps(body), version=version)

    async def events(self) -> dict[int, tuple[str, int]]:
        rows = await self.store.pool.fetch("SELECT number, status, attempt FROM events ORDER BY number")
        return {r["number"]: (r["status"], r["attempt"]) for r in rows}


@contextlib.asynccontextmanager
async def running(settings: Settings, store: Store, broker: Broker, **config: Any) -> AsyncIterator[Api]:
    control = ControlPlane(settings, store, broker)
    stop = asyncio.Event()
    task = asyncio.create_task(control.run(stop))
    app = create_app(store, broker, MonitorConfig(**{"pilot_wait": 1.0, **config}))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            yield Api(client, store, broker)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def api(settings: Settings, store: Store, broker: Broker) -> AsyncIterator[Api]:
    async with running(settings, store, broker) as a:
        yield a


async def queued(store: Store, n: int) -> None:
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) = $1 FROM events WHERE status = 'queued'", n),
        what=f"{n} events queued",
    )


async def test_a_pilot_runs_a_job_from_get_job_to_its_last_report(api: Api, tmp_path: Path) -> None:
    wf = await submit(api.store, pilot_workflow(tmp_path, 6, per_job=3))
    await queued(api.store, 6)
    job = await api.call("getJob", siteName="SITE", node="wn01.example.org", prodSourceLabel="managed")
    assert job["StatusCode"] == 0, job
    first = await api.store.pool.fetchval("SELECT min(id) FROM jobs")
    task = await api.store.pool.fetchval("SELECT id FROM tasks")
    assert (job["PandaID"], job["jobsetID"], job["taskID"]) == (first, first, task)
    assert (job["transformation"], job["jobPars"]) == ("es_payload.py", "--channel-env PILOT_EVENTRANGECHANNEL")
    assert job["eventService"] == "True"
    # one pilot per job: the next pilot gets the other job
    other = await api.call("getJob", siteName="SITE", node="wn02")
    assert other["PandaID"] == first + 1

    ranges = await api.ranges(first, task, n=2)
    assert [r["eventRangeID"] for r in ranges] == [f"{task}-{first}-{first}-{i}-1" for i in (0, 1)]
    assert ranges[0] | {"GUID": None} == {
        "eventRangeID": f"{task}-{first}-{first}-0-1",
        "startEvent": 1,  # Rubin's fine-grained shape: the label is the file, number + 1 the event
        "lastEvent": 1,
        "LFN": "000000:isr:eventservice_0",
        "GUID": None,
        "scope": "pilots",
    }
    # leased: running under the job's pilot, in Postgres, and gone from the queue
    assert await api.events() == {0: ("running", 1), 1: ("running", 1), 2: ("queued", 1)} | {
        n: ("queued", 1) for n in (3, 4, 5)
    }
    assert await api.store.pool.fetchval("SELECT count(*) FROM events WHERE worker = $1", f"pilot:{first}") == 2
    assert await api.broker.queue_depth(api.broker.names.job(first)) == 1
    assert (await api.call("checkEventsAvailability", pandaID=first, jobsetID=first, taskID=task))["nEventRanges"] == 1
    # a pilot that cannot write its curl config sends the fields in a GET's query string
    r = await api.client.get("/server/panda/checkEventsAvailability", params={"pandaID": first, "taskID": task})
    assert r.json() == {"StatusCode": 0, "nEventRanges": 1}

    ranges += await api.ranges(first, task)
    assert len(ranges) == 3
    done = await api.report(*((r["eventRangeID"], "finished") for r in ranges), version=1)
    assert done == {"StatusCode": 0, "Returns": [True, True, True], "Command": {}}

    async def job_finished() -> bool:
        return await api.store.pool.fetchval("SELECT status FROM jobs WHERE id = $1", first) == "finished"

    await eventually(job_finished, what="the pilot's job finished")
    assert await api.ranges(first, task) == []  # its job ended: the pilot's job ends too
    assert (await api.call("updateJob", jobId=first, state="finished"))["StatusCode"] == 0
    attempts = await api.store.pool.fetch("SELECT worker, status FROM attempts WHERE job_id = $1", first)
    assert {(r["worker"], r["status"]) for r in attempts} == {(f"pilot:{first}", "finished")}
    assert len(attempts) == 3
    assert await api.store.pool.fetchval("SELECT status FROM workers WHERE id = $1", f"pilot:{first}") == "stopped"
    assert await api.store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf) == "running"


async def test_a_failed_range_is_retried_and_a_fatal_one_is_dead_lettered(api: Api, tmp_path: Path) -> None:
    await submit(api.store, pilot_workflow(tmp_path, 3, per_job=3, retries=2))
    await queued(api.store, 3)
    job = await api.call("getJob", siteName="SITE")
    job_id, task = job["PandaID"], job["taskID"]
    r0, r1, r2 = (r["eventRangeID"] for r in await api.ranges(job_id, task))
    # version 0, as the pilot reports a failure at once (with its error code)
    failed = await api.call(
        "updateEventRanges",
        eventRanges=json.dumps([{"eventRangeID": r1, "eventStatus": "failed", "errorCode": 1220}]),
        version=0,
    )
    assert failed == {"StatusCode": 0, "Returns": "[true]", "Command": "{}"}  # version 0: JSON text
    assert (await api.report((r2, "fatal")))["Returns"] == "[true]"
    assert (await api.report((r0, "finished")))["Returns"] == "[true]"

    async def retry() -> list[dict[str, Any]]:
        return await api.ranges(job_id, task)

    again = await eventually(retry, what="the failed range's next attempt")
    assert [r["eventRangeID"] for r in again] == [f"{task}-{job_id}-{job_id}-1-2"]
    assert (await api.report((r1, "finished")))["Returns"] == "[false]"  # the first attempt: stale
    assert (await api.report((again[0]["eventRangeID"], "finished")))["Returns"] == "[true]"

    async def settled() -> dict[int, tuple[str, int]] | None:
        events = await api.events()
        return events if all(s in ("finished", "failed") for s, _ in events.values()) else None

    assert await eventually(settled, what="every event ended") == {
        0: ("finished", 1),
        1: ("finished", 2),
        2: ("failed", 1),  # fatal: no further attempt, though two were left
    }
    error = await api.store.pool.fetchval("SELECT error FROM attempts WHERE number = 1 AND attempt = 1")
    assert error == "pilot reported failed (error 1220)"

    async def dead_letter() -> DeadLetter | None:
        message = await api.broker.get(api.broker.names.dlq)
        if message is None:
            return None
        await message.ack()
        return decode(message.body, DeadLetter)

    dead = await eventually(dead_letter, what="the fatal event's dead letter")
    assert (dead.job_id, dead.number, dead.attempts) == (job_id, 2, 1)


async def test_bad_requests_get_a_panda_error_and_change_nothing(api: Api, tmp_path: Path) -> None:
    await submit(api.store, pilot_workflow(tmp_path, 4, per_job=2))
    await queued(api.store, 4)
    job = await api.call("getJob", siteName="SITE")
    job_id, task = job["PandaID"], job["taskID"]
    [mine, _] = await api.ranges(job_id, task)
    before = await api.events()
    other = job_id + 1
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("getEventRanges", {"jobsetID": job_id, "taskID": task}, 80, "pandaID is missing"),
        ("getEventRanges", {"pandaID": "12abc", "taskID": task}, 30, "not a positive integer"),
        ("getEventRanges", {"pandaID": "-3"}, 30, "not a positive integer"),
        ("getEventRanges", {"pandaID": 10**30}, 30, "not a positive integer"),
        ("getEventRanges", {"pandaID": 999999}, 30, "no such job"),
        ("getEventRanges", {"pandaID": job_id, "jobsetID": other}, 30, "is its own jobset"),
        ("getEventRanges", {"pandaID": job_id, "taskID": task + 1}, 30, f"is of task {task}"),
        ("getEventRanges", {"pandaID": job_id, "nRanges": "many"}, 30, "not a positive integer"),
        ("updateEventRanges", {}, 80, "eventRanges is missing"),
        ("updateEventRanges", {"eventRanges": "[{not json"}, 30, "not JSON"),
        ("updateEventRanges", {"eventRanges": '{"a": 1}'}, 30, "not a JSON list"),
        ("updateEventRanges", {"eventRanges": json.dumps([{"eventRangeID": mine["eventRangeID"]}])}, 30, "eventStatus"),
        (
            "updateEventRanges",
            {"eventRanges": json.dumps([{"eventRangeID": mine["eventRangeID"], "eventStatus": "exploded"}])},
            30,
            "eventStatus",
        ),
        (
            "updateEventRanges",
            {"eventRanges": json.dumps([{"eventRangeID": "1-2-3", "eventStatus": "finished"}])},
            30,
            "not <taskID>",
        ),
        (
            "updateEventRanges",
            {"eventRanges": json.dumps([{"eventRangeID": f"{task}-{job_id}-{other}-0-1", "eventStatus": "finished"}])},
            30,
            "PandaID and jobsetID differ",
        ),
        (  # one good report and one of another job: neither is taken
            "updateEventRanges",
            {
                "eventRanges": json.dumps(
                    [
                        {"eventRangeID": mine["eventRangeID"], "eventStatus": "finished"},
                        {"eventRangeID": f"{task}-{other}-{other}-2-1", "eventStatus": "finished"},
                    ]
                )
            },
            30,
            "several PandaIDs",
        ),
        (
            "updateEventRanges",
            {
                "eventRanges": json.dumps(
                    [{"eventRangeID": f"{task + 7}-{job_id}-{job_id}-0-1", "eventStatus": "finished"}]
                )
            },
            30,
            f"is of task {task}",
        ),
        ("updateEventRanges", {"eventRanges": "[]", "version": "7"}, 30, "0, 1 or 2"),
        ("updateJob", {"state": "running"}, 80, "jobId is missing"),
        ("checkEventsAvailability", {"pandaID": "x"}, 30, "not a positive integer"),
    ]
    for method, form, code, reason in cases:
        answer = await api.call(method, **form)
        assert answer["StatusCode"] == code, (method, form, answer)
        assert reason in answer["errorDialog"], (method, form, answer)
    r = await api.client.post("/server/panda/getJobs", data={})
    assert r.status_code == 404 and r.json()["StatusCode"] == 30
    await asyncio.sleep(0.3)  # what a wrongly taken report would have moved by now
    assert await api.events() == before
    assert await api.broker.queue_depth(api.broker.names.job(other)) == 2  # nobody took the other job's ranges


async def test_an_expired_lease_charges_one_attempt_and_the_late_report_is_stale(
    settings: Settings, store: Store, broker: Broker, tmp_path: Path
) -> None:
    async with running(settings, store, broker, pilot_lease=4.0) as api:
        await submit(store, pilot_workflow(tmp_path, 2, per_job=2))
        await queued(store, 2)
        job = await api.call("getJob", siteName="SITE")
        job_id, task = job["PandaID"], job["taskID"]
        [r0, r1] = (r["eventRangeID"] for r in await api.ranges(job_id, task))
        # silent for longer than a native worker may be (3 heartbeats: 1.5 s), not its lease
        await asyncio.sleep(2.5)
        assert await api.events() == {0: ("running", 1), 1: ("running", 1)}
        assert await store.pool.fetchval("SELECT status FROM workers WHERE id = $1", f"pilot:{job_id}") == "live"
        # the pilot goes silent: after its lease, the watchdog charges what it held
        lost = await eventually(
            lambda: store.pool.fetchval("SELECT status = 'lost' FROM workers WHERE id = $1", f"pilot:{job_id}"),
            what="the silent pilot lost",
        )
        assert lost
        await eventually(
            lambda: store.pool.fetchval("SELECT count(*) = 2 FROM events WHERE status = 'queued' AND attempt = 2"),
            what="its events issued again",
        )
        errors = await store.pool.fetch("SELECT status, error FROM attempts WHERE attempt = 1")
        assert {(r["status"], r["error"]) for r in errors} == {("failed", f"lost with its worker pilot:{job_id}")}
        # it comes back hours later with its reports: stale, nothing moves
        assert (await api.report((r0, "finished"), (r1, "finished"), version=1))["Returns"] == [False, False]
        await asyncio.sleep(0.3)
        assert await api.events() == {0: ("queued", 2), 1: ("queued", 2)}
        # and it may take the next attempts
        again = await api.ranges(job_id, task)
        assert [r["eventRangeID"] for r in again] == [f"{task}-{job_id}-{job_id}-{i}-2" for i in (0, 1)]


async def test_a_pilot_that_ends_its_job_gives_back_what_it_still_held(api: Api, tmp_path: Path) -> None:
    await submit(api.store, pilot_workflow(tmp_path, 3, per_job=3))
    await queued(api.store, 3)
    job = await api.call("getJob", siteName="SITE")
    job_id, task = job["PandaID"], job["taskID"]
    [r0, _, _] = (r["eventRangeID"] for r in await api.ranges(job_id, task))
    assert (await api.report((r0, "finished")))["Returns"] == "[true]"
    await eventually(
        lambda: api.store.pool.fetchval("SELECT status = 'finished' FROM events WHERE number = 0"),
        what="the reported event finished",
    )
    assert (await api.call("updateJob", jobId=job_id, state="failed"))["StatusCode"] == 0

    async def returned() -> dict[int, tuple[str, int]] | None:
        events = await api.events()
        return events if events[1] == events[2] == ("queued", 2) else None

    # charged at once (the pilot is gone), not an hour later when its lease would run out
    assert await eventually(returned, what="the events it held issued again") == {
        0: ("finished", 1),
        1: ("queued", 2),
        2: ("queued", 2),
    }


async def test_a_range_of_several_events_is_handed_whole(api: Api, tmp_path: Path) -> None:
    await submit(api.store, pilot_workflow(tmp_path, 5, per_job=5, per_range=3))
    await queued(api.store, 5)
    job = await api.call("getJob", siteName="SITE")
    ranges = await api.ranges(job["PandaID"], job["taskID"], n=1)
    assert [r["startEvent"] for r in ranges] == [1, 2, 3]  # a range of 3 events, for a call asking 1
    assert [r["startEvent"] for r in await api.ranges(job["PandaID"], job["taskID"], n=1)] == [4, 5]


async def test_the_mapping_of_a_task_for_rubin_pilots(api: Api, tmp_path: Path) -> None:
    await submit(api.store, pilot_workflow(tmp_path, 3, per_job=3))
    task = await api.store.pool.fetchval("SELECT id FROM tasks")
    r = await api.client.get("/server/panda/esmap", params={"taskID": task})
    assert r.json() == {"isr": {"0": "ok:0", "1": "ok:1", "2": "ok:2"}}
    assert (await api.client.get("/server/panda/esmap", params={"taskID": task + 1})).json()["StatusCode"] == 30
    assert (await api.client.get("/server/panda/esmap", params={"taskID": "x"})).status_code == 422


async def test_with_a_token_and_an_origin_a_pilot_must_send_both(
    settings: Settings, store: Store, broker: Broker, tmp_path: Path
) -> None:
    async with running(settings, store, broker, pilot_token=TOKEN, pilot_origin="atlas.pilot") as api:
        await submit(store, pilot_workflow(tmp_path, 1, per_job=1))
        await queued(store, 1)
        calls = [
            ({}, 401, 50),
            ({"Authorization": "Bearer wrong"}, 403, 50),
            ({"Authorization": f"Bearer {TOKEN}"}, 403, 70),  # no Origin
            ({"Authorization": f"Bearer {TOKEN}", "Origin": "evil.example"}, 403, 70),
        ]
        for headers, status, code in calls:
            r = await api.client.post("/server/panda/getJob", data={"siteName": "S"}, headers=headers)
            assert (r.status_code, r.json()["StatusCode"]) == (status, code), headers
        assert await store.pool.fetchval("SELECT count(*) FROM workers") == 0  # no pilot took a job
        good = {"Authorization": f"Bearer '{TOKEN}'", "Origin": "atlas.pilot"}  # as the pilot quotes it
        r = await api.client.post("/server/panda/getJob", data={"siteName": "S"}, headers=good)
        assert r.json()["StatusCode"] == 0


async def test_a_pilot_and_a_native_worker_serve_one_job_at_once_and_every_event_runs_once(
    api: Api, settings: Settings, tmp_path: Path
) -> None:
    from tests.test_failures import Cluster

    n = 40
    await submit(api.store, pilot_workflow(tmp_path, n, per_job=n))
    await queued(api.store, n)
    job = await api.call("getJob", siteName="SITE")
    job_id, task = job["PandaID"], job["taskID"]
    natives = Cluster(settings, api.store, api.broker)  # a native worker only (the control plane runs)
    await natives.worker(slots=1)
    try:
        by_pilot: list[str] = []
        while ranges := await api.ranges(job_id, task, n=2):
            ids = [r["eventRangeID"] for r in ranges]
            by_pilot += ids
            assert (await api.report(*((i, "finished") for i in ids), version=1))["Returns"] == [True] * len(ids)
            await asyncio.sleep(0.02)  # a pilot's payload takes a while
        await eventually(
            lambda: api.store.pool.fetchval("SELECT status = 'finished' FROM jobs WHERE id = $1", job_id),
            what="the job finished",
        )
    finally:
        await natives.stop()
    rows = await api.store.pool.fetch("SELECT number, attempt, worker FROM events")
    assert {r["attempt"] for r in rows} == {1}
    pilot = {r["number"] for r in rows if r["worker"] == f"pilot:{job_id}"}
    assert pilot == {int(i.split("-")[3]) for i in by_pilot}  # what the pilot was handed, and only that
    assert 0 < len(pilot) < n  # both served the job
    attempts = await api.store.pool.fetch("SELECT number, status FROM attempts")
    assert len(attempts) == n and {r["status"] for r in attempts} == {"finished"}  # each ran once


async def test_a_range_delivered_again_is_given_back_and_its_new_copy_handed_out(
    api: Api, settings: Settings, tmp_path: Path
) -> None:
    await submit(api.store, pilot_workflow(tmp_path, 1, per_job=1))
    await queued(api.store, 1)
    job = await api.call("getJob", siteName="SITE")
    job_id, task = job["PandaID"], job["taskID"]
    # a consumer took the range and died before acking it: it is in the queue again, redelivered
    other = await Broker.connect(settings.amqp_url, settings.names, client="pytest-lost")
    assert await other.get(api.broker.names.job(job_id)) is not None
    await other.close()
    ranges = await api.ranges(job_id, task)  # (the copy issued again arrives while the call waits)
    assert [r["eventRangeID"] for r in ranges] == [f"{task}-{job_id}-{job_id}-0-1"]  # not run: no attempt charged
    assert await api.store.pool.fetchval("SELECT issue FROM events") == 1  # the new copy
    assert await api.events() == {0: ("running", 1)}


async def test_a_range_taken_while_the_database_is_away_goes_back_to_its_queue(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await submit(api.store, pilot_workflow(tmp_path, 1, per_job=1))
    await queued(api.store, 1)
    job = await api.call("getJob", siteName="SITE")
    job_id, task = job["PandaID"], job["taskID"]
    queue = api.broker.names.job(job_id)

    async def away(*args: object) -> list[tuple[int, int]]:
        raise ConnectionRefusedError("Postgres is away")  # its lease cannot be recorded

    real = api.store.pilot_lease
    monkeypatch.setattr(api.store, "pilot_lease", away)
    r = await api.client.post("/server/panda/getEventRanges", data={"pandaID": job_id, "nRanges": 1})
    assert (r.status_code, r.json()["StatusCode"]) == (503, 30)  # the pilot asks again later
    # not held unacked for an HTTP client (basic.nack has no answer: it lands a moment later)
    assert await eventually(lambda: api.broker.queue_depth(queue), what="the range back in its queue") == 1
    monkeypatch.setattr(api.store, "pilot_lease", real)
    ranges = await api.ranges(job_id, task)  # (delivered again: given back, and its new copy handed)
    assert [r["eventRangeID"] for r in ranges] == [f"{task}-{job_id}-{job_id}-0-1"]
    assert await api.events() == {0: ("running", 1)}
