"""The monitor's pictures: a job's timeline (one lane per worker slot, one bar per
attempt coloured by outcome, set-ups and tear-downs marked), from the real bookkeeping
and job log, on the job page."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from dispatcher.monitor import MonitorConfig, create_app
from dispatcher.monitor.pictures import Bar, job_timeline, lanes
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.joblog import command_footer, command_header
from schemas.messages import StatusUpdate
from tests.test_failures import write_workflow
from transport.names import job_log_path
from transport.rabbitmq import Broker

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_workers_attempts_fill_as_few_lanes_as_hold_them_without_overlap() -> None:
    bars = [
        Bar("w1", "finished", 0, 2, "a"),
        Bar("w1", "finished", 1, 3, "b"),  # overlaps a: a second slot
        Bar("w1", "failed", 2, 4, "c"),  # after a: back in the first
        Bar("w1", "set-up", -1, 0, "s"),
        Bar("w2", "running", 0, 5, "d"),
    ]
    rows = lanes(bars)
    assert [[b.title for b in row] for row in rows["w1"]] == [["s"], ["a", "c"], ["b"]]
    assert [[b.title for b in row] for row in rows["w2"]] == [[], ["d"]]
    svg = job_timeline([Bar("<script>", "finished", 0, 1, "x<y")])
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "x&lt;y" in svg  # names are user data


async def test_the_job_page_draws_the_jobs_timeline_from_its_attempts_and_its_log(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"isr": ["ok:0", "ok:1", "ok:2", "ok:3"]}, per_job=4))
    await store.release_ready_tasks()
    [job] = await store.claim_jobs(10)
    await store.mark_jobs_queued([job])

    def update(number: int, attempt: int, status: str, start: float, end: float | None, worker: str) -> StatusUpdate:
        return StatusUpdate(
            job_id=job,
            number=number,
            attempt=attempt,
            status=status,
            worker=worker,  # type: ignore[arg-type]
            started_at=at(start),
            ended_at=None if end is None else at(end),
            exit_code=None if end is None else (0 if status == "finished" else 1),
        )

    await store.apply(
        [
            update(0, 1, "finished", 1, 3, "w1"),
            update(1, 1, "finished", 1.5, 4, "w1"),  # beside event 0: w1's second slot
            update(2, 1, "failed", 3, 5, "w1"),  # retried: its next attempt is issued
            update(3, 1, "running", 2, None, "w2"),
        ]
    )
    log_dir = tmp_path / "logs"
    log = job_log_path(log_dir, wf, job)
    log.parent.mkdir(parents=True)
    log.write_text(
        command_header("set-up", "make env", "w1", at(0))
        + command_footer("set-up", "finished", 0, at(1), 1.0)
        + command_header("tear-down", "upload", "w1", at(5))
        + command_footer("tear-down", "finished", 0, at(6), 1.0)
    )
    app = create_app(store, broker, MonitorConfig(log_dir=log_dir))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        page = (await client.get(f"/jobs/{job}")).text
    svg = page[page.index('<svg class="timeline"') : page.index("</svg>")]
    kinds = re.findall(r'<rect class="([\w-]+)"', svg)
    assert sorted(kinds) == sorted(["finished", "finished", "retried", "running", "set-up", "tear-down"])
    assert "w1 slot 1" in svg and "w1 slot 2" in svg and "w1 (job)" in svg and "w2 slot 1" in svg
    assert "w2 (job)" not in svg  # no set-up of w2's in the log
    assert "event 2 attempt 1: retried, 2.000 s on w1" in svg  # each bar says what it is


async def test_the_workflow_and_task_pages_draw_progress_states_and_durations_from_counters(
    store: Store, broker: Broker, tmp_path: Path
) -> None:
    wf = await submit(store, write_workflow(tmp_path, {"isr": [f"ok:{i}" for i in range(6)]}, per_job=6))
    await store.release_ready_tasks()
    [job] = await store.claim_jobs(10)
    await store.mark_jobs_queued([job])
    task = await store.pool.fetchval("SELECT task_id FROM jobs WHERE id = $1", job)
    assert await store.compact_event_counts() == [task]  # the first sample: all queued
    assert await store.compact_event_counts() == []  # nothing changed: no sample
    # five finish, one fails (its retry is issued); one 0.5 s event, the others 2 s
    runs = [(n, "finished", 2.0 * n, 2.0 * n + (0.5 if n == 0 else 2.0)) for n in range(5)]
    runs.append((5, "failed", 1.0, 3.0))
    await store.apply(
        [
            StatusUpdate(
                job_id=job,
                number=n,
                attempt=1,
                status=status,
                worker="w1",  # type: ignore[arg-type]
                started_at=at(start),
                ended_at=at(end),
                exit_code=0 if status == "finished" else 1,
            )
            for n, status, start, end in runs
        ]
    )
    assert await store.compact_event_counts() == [task]
    samples = await store.count_samples([task], 100)
    assert [s["counts"] for s in samples] == [{"queued": 6}, {"finished": 5, "retrying": 1}]
    app = create_app(store, broker, MonitorConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        pages = [(await client.get(url)).text for url in (f"/workflows/{wf}", f"/tasks/{task}")]
    for page in pages:
        charts = re.findall(r'<svg class="chart".*?</svg>', page, re.DOTALL)
        names = [re.search(r'aria-label="([^"]+)"', c)[1] for c in charts]  # type: ignore[index]
        assert names == ["events ended per second", "events by state", "event durations"]
        # every attempt that ended is counted once in the histogram, failures apart
        counted = {"finished": 0, "failed": 0}
        for n, kind in re.findall(r"<title>(\d+) (finished|failed)</title>", charts[2]):
            counted[kind] += int(n)
        assert counted == {"finished": 5, "failed": 1}
        # the 0.5 s event and the 2 s ones: two columns, two octaves (eight buckets) apart
        assert len(re.findall(r'<rect class="finished"', charts[2])) == 2
        assert re.findall(r'<rect class="finished"', charts[0])  # the progress has columns
        # the states: queued at first, then finished and retrying
        assert {"queued", "finished", "retrying"} <= set(re.findall(r'<polygon class="(\w+)"', charts[1]))
