"""The monitor's JSON API, pages and metrics against a real database holding a finished
and a running workflow; and the job page in real headless Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from dispatcher.monitor import MonitorConfig, create_app, serve
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import Heartbeat, StatusUpdate
from tests.conftest import ROOT
from transport.rabbitmq import Broker

T0 = datetime(2026, 1, 1, tzinfo=UTC)
EVIL = "<script>alert('x')</script>"
TOKEN = "s3cret-token"


@dataclass
class World:
    finished: int  # a finished workflow
    running: int  # a running one: 1 event running, 1 failed, the rest queued
    job: int  # the running workflow's first job
    evil_number: int
    failed_attempt: int  # the attempt at which event 3 of the second job ran out of attempts


def workflow_file(tmp_path: Path, name: str, payloads: list[str], per_job: int = 3) -> Path:
    (tmp_path / f"{name}.json").write_text(
        json.dumps({"a": {str(i): p for i, p in enumerate(payloads)}, "b": {"0": "b0"}})
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "mapping": f"{name}.json",
                "enableEventService": "a",
                "maxEventsPerJob": per_job,
                "pipetask": {
                    "a": {"payloadCommand": "echo {payload}"},
                    "b": {"payloadCommand": "echo {payload}", "dependsOn": "a"},
                },
            }
        )
    )
    return path


async def run_all(store: Store, wf: int, fail: set[int] = frozenset()) -> None:  # type: ignore[assignment]
    """Drive a workflow through the real bookkeeping path, as workers' reports would."""
    while True:
        await store.release_ready_tasks()
        jobs = await store.claim_jobs(window=100)
        if not jobs:
            break
        await store.mark_jobs_queued(jobs)
        updates = [
            StatusUpdate(
                job_id=j,
                number=r["number"],
                attempt=1,
                worker="w1",
                started_at=T0,
                ended_at=T0,
                status="failed" if r["number"] in fail else "finished",
                exit_code=0,
            )
            for j in jobs
            for r in await store.job_events(j)
        ]
        await store.apply(updates)
        await store.finish(jobs)


async def make_world(store: Store, tmp_path: Path) -> World:
    """A finished workflow and a running one, in the bookkeeping (shared with test_monitor_hostile)."""
    done = await submit(store, workflow_file(tmp_path, "done", [f"p{i}" for i in range(5)]))
    await run_all(store, done)
    running = await submit(store, workflow_file(tmp_path, "busy", ["x0", EVIL, "x2", "x3", "x4", "x5", "x6"]))
    await store.release_ready_tasks()
    jobs = await store.claim_jobs(window=100)
    await store.mark_jobs_queued(jobs)
    first = min(jobs)
    await store.apply(
        [StatusUpdate(job_id=first, number=0, attempt=1, status="running", worker="w1", started_at=T0)],
        heartbeats=[
            ("w1", Heartbeat(host="h1", pid=7, slots=2, state="live", jobs=[first], events_done=3, started_at=T0))
        ],
    )
    # event 3 fails every attempt it is given (the bookkeeping refuses an attempt it did not
    # issue: each failure with attempts left issues the next) until it is out of attempts
    for attempt in range(1, 11):
        failure = StatusUpdate(
            job_id=first + 1,
            number=3,
            attempt=attempt,
            status="failed",
            worker="w1",
            started_at=T0,
            ended_at=T0,
            exit_code=2,
            error="boom <b>bold</b>",
        )
        await store.apply([failure])
        status = await store.pool.fetchval("SELECT status FROM events WHERE job_id = $1 AND number = 3", first + 1)
        if status == "failed":
            break
    assert status == "failed" and attempt >= 2, (status, attempt)
    return World(finished=done, running=running, job=first, evil_number=1, failed_attempt=attempt)


@pytest.fixture
async def world(store: Store, tmp_path: Path) -> World:
    return await make_world(store, tmp_path)


@pytest.fixture
async def client(store: Store, broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store, broker, MonitorConfig(token=TOKEN))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8321") as c:
        yield c


async def test_workflows_and_their_tasks(client: httpx.AsyncClient, world: World) -> None:
    r = await client.get("/api/workflows")
    assert r.status_code == 200
    by_id = {w["id"]: w for w in r.json()}
    assert by_id[world.finished]["status"] == "finished"
    assert by_id[world.finished]["events"] == {"finished": 6} and by_id[world.finished]["done"] == 6
    assert by_id[world.running]["status"] == "running"
    assert by_id[world.running]["events"] == {"running": 1, "failed": 1, "queued": 5, "ready": 1}
    detail = (await client.get(f"/api/workflows/{world.running}")).json()
    assert [(t["label"], t["status"], t["parents"]) for t in detail["tasks"]] == [
        ("a", "running", []),
        ("b", "waiting", ["a"]),
    ]
    assert [j["n_events"] for j in detail["jobs"]] == [3, 2, 2, 1]
    assert (await client.get("/api/workflows/999999")).status_code == 404


async def test_job_events_are_paginated_and_filtered(client: httpx.AsyncClient, world: World) -> None:
    job = (await client.get(f"/api/jobs/{world.job}")).json()
    assert job["events"] == {"running": 1, "queued": 2} and job["label"] == "a"
    first = (await client.get(f"/api/jobs/{world.job}/events", params={"limit": 2})).json()
    assert [e["number"] for e in first["events"]] == [0, 1] and first["next"] == 1
    second = (await client.get(f"/api/jobs/{world.job}/events", params={"limit": 2, "after": 1})).json()
    assert [e["number"] for e in second["events"]] == [2] and second["next"] is None
    running = (await client.get(f"/api/jobs/{world.job}/events", params={"status": "running"})).json()
    assert [(e["number"], e["worker"], e["attempt"]) for e in running["events"]] == [(0, "w1", 1)]
    assert (await client.get(f"/api/jobs/{world.job}/events", params={"status": "bogus"})).status_code == 422
    task_id = (await client.get(f"/api/workflows/{world.running}")).json()["tasks"][0]["id"]
    task_page = (await client.get(f"/api/tasks/{task_id}/events", params={"limit": 100})).json()
    assert [e["number"] for e in task_page["events"]] == list(range(7))


async def test_dead_letters_workers_and_openapi(client: httpx.AsyncClient, world: World) -> None:
    dlq = (await client.get("/api/dlq")).json()
    [failed] = dlq["events"]
    assert (failed["workflow_id"], failed["number"], failed["attempt"]) == (world.running, 3, world.failed_attempt)
    assert failed["replay_command"] == (f"dispatcher replay --workflow {world.running} --job {world.job + 1} --event 3")
    assert dlq["dlq_depth"] == 0  # the test's es.dlq is empty: this failure was only written to the bookkeeping
    [worker] = (await client.get("/api/workers")).json()
    assert (worker["id"], worker["host"], worker["jobs"], worker["events_done"]) == ("w1", "h1", [world.job], 3)
    spec = (await client.get("/openapi.json")).json()
    assert {"/api/workflows", "/api/jobs/{job_id}/events", "/api/dlq", "/api/replay"} <= set(spec["paths"])


async def test_html_looking_payloads_and_errors_are_escaped(client: httpx.AsyncClient, world: World) -> None:
    html = (await client.get(f"/jobs/{world.job}")).text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert '<span class="state running">running 1</span>' in html  # the job's counts by state
    assert EVIL not in html
    dlq_html = (await client.get("/dlq")).text
    assert "boom &lt;b&gt;bold&lt;/b&gt;" in dlq_html and "<b>bold</b>" not in dlq_html
    for page in ("/", f"/workflows/{world.running}", "/workers"):
        assert (await client.get(page)).status_code == 200


async def test_state_changes_need_the_token(
    store: Store, broker: Broker, client: httpx.AsyncClient, world: World
) -> None:
    url = f"/api/workflows/{world.running}/cancel"
    assert (await client.post(url)).status_code == 401  # no credentials at all
    assert (await client.post(url, headers={"Authorization": "Bearer wrong"})).status_code == 403
    assert (await client.post("/api/replay", json={"dry_run": True})).status_code == 401
    assert await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", world.running) == "running"
    r = await client.post(url, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "cancelled workflow" in r.json()["detail"]
    assert await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", world.running) == "cancelled"
    r = await client.post("/api/replay", json={"dry_run": True}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["detail"] == "would replay 0 event(s)"
    # without a configured token, actions are off altogether
    app = create_app(store, broker, MonitorConfig(token=None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        r = await c.post(url, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 403 and "DISPATCHER_MONITOR_TOKEN" in r.json()["detail"]


async def test_read_token_when_configured(store: Store, broker: Broker, world: World) -> None:
    app = create_app(store, broker, MonitorConfig(read_token="r3ad"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        assert (await c.get("/api/workflows")).status_code == 401
        assert (await c.get("/api/workflows", headers={"Authorization": "Bearer r3ad"})).status_code == 200
        assert (await c.get("/", headers={"Authorization": "Bearer r3ad"})).status_code == 200
        # a token in the URL ends up in logs and browser history: not accepted
        assert (await c.get("/api/workflows", params={"token": "r3ad"})).status_code == 401


async def test_metrics(client: httpx.AsyncClient, world: World) -> None:
    text = (await client.get("/metrics")).text
    metrics = dict(re.findall(r"^(\S+) (\S+)$", text, re.MULTILINE))
    assert float(metrics['dispatcher_events{state="finished"}']) == 6
    assert float(metrics['dispatcher_events{state="queued"}']) == 5
    assert float(metrics['dispatcher_events{state="running"}']) == 1
    assert float(metrics["dispatcher_events_finished_total"]) == 6
    assert float(metrics["dispatcher_retries_total"]) == world.failed_attempt - 1  # event 3's later attempts
    assert float(metrics['dispatcher_workers{state="live"}']) == 1
    assert float(metrics['dispatcher_queue_depth{queue="dlq"}']) == 0
    assert "dispatcher_bookkeeping_lag_messages" in metrics


CHROMIUM = os.environ.get("DISPATCHER_TEST_CHROMIUM", "/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (scripts/install-tools.sh)")
async def test_job_page_updates_live_in_chromium(store: Store, broker: Broker, world: World) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    port = _free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(
        serve(create_app(store, broker, MonitorConfig(refresh_ms=300)), "127.0.0.1", port, stop)
    )
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-quic"]
            )
            page = await browser.new_page()
            for _ in range(50):  # the server takes a moment to listen
                try:
                    await page.goto(f"http://127.0.0.1:{port}/jobs/{world.job}")
                    break
                except playwright_api.Error:
                    await asyncio.sleep(0.1)
            first_row = page.locator("#events tr").nth(1)
            assert "running" in await first_row.inner_text()
            assert EVIL in await page.locator("#events").inner_text()  # shown as text, not run
            # a worker's report lands in the bookkeeping: the page shows it without a reload
            await store.apply(
                [
                    StatusUpdate(
                        job_id=world.job,
                        number=0,
                        attempt=1,
                        status="finished",
                        worker="w1",
                        started_at=T0,
                        ended_at=T0,
                        exit_code=0,
                    )
                ]
            )
            await page.locator("#events tr").nth(1).locator("text=finished").wait_for(timeout=10_000)
            assert "finished" in await page.locator("#events tr").nth(1).inner_text()
            assert await page.locator("svg.timeline").is_visible()  # the job's timeline is drawn
            await page.screenshot(path=str(artifacts / "monitor-job-page.png"), full_page=True)
            await run_on(store, world.running)  # the workflow's other events run, a sample between each
            await page.goto(f"http://127.0.0.1:{port}/workflows/{world.running}")
            charts = page.locator("svg.chart")
            await charts.first.wait_for(timeout=10_000)
            names = [await charts.nth(i).get_attribute("aria-label") for i in range(await charts.count())]
            assert names == ["events ended per second", "events by state", "event durations"]
            await page.screenshot(path=str(artifacts / "monitor-workflow-page.png"), full_page=True)
            await page.locator(".task a").first.click()  # the task's own page, its pictures too
            await page.locator("#events").wait_for(timeout=10_000)
            assert await page.locator("svg.chart").count() == 3
            await page.screenshot(path=str(artifacts / "monitor-task-page.png"), full_page=True)
            await browser.close()
    finally:
        stop.set()
        await server
    assert (artifacts / "monitor-job-page.png").stat().st_size > 0
    assert (artifacts / "monitor-workflow-page.png").stat().st_size > 0
    assert (artifacts / "monitor-task-page.png").stat().st_size > 0


async def run_on(store: Store, workflow: int) -> None:
    """Finish the workflow's queued events one by one, as the bookkeeping would, with the
    watchdog's fold (and so a sample of the counts) after each: its progress over time."""
    rows = await store.pool.fetch(
        "SELECT e.job_id, e.number FROM events e JOIN jobs j ON j.id = e.job_id"
        " WHERE j.workflow_id = $1 AND e.status = 'queued' ORDER BY e.number",
        workflow,
    )
    await store.compact_event_counts()
    for k, r in enumerate(rows):
        now = datetime.now(UTC)
        took = timedelta(milliseconds=40 * (k + 1))
        await store.apply(
            [
                StatusUpdate(
                    job_id=r["job_id"],
                    number=r["number"],
                    attempt=1,
                    status="finished",
                    worker="w2",
                    started_at=now - took,
                    ended_at=now,
                    exit_code=0,
                )
            ]
        )
        await store.compact_event_counts()
        await asyncio.sleep(0.15)


async def test_status_watch_draws_progress_and_exits_with_the_outcome(settings: object, world: World) -> None:
    from tests.test_e2e import BIN, cli_env

    env = cli_env(settings)  # type: ignore[arg-type]
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "dispatcher"),
        "status",
        str(world.finished),
        "--watch",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert "5/5" in text and "1/1" in text  # task a and task b, complete
    assert f"workflow {world.finished}: finished (6/6 events done)" in text
    usage = await asyncio.create_subprocess_exec(
        str(BIN / "dispatcher"), "status", "--watch", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await usage.communicate()
    assert usage.returncode == 2 and b"--watch needs a WORKFLOW_ID" in err
