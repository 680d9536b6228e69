"""``schemas.states`` is the one list of states: Postgres must agree with it (the tables'
CHECK constraints and ``es_status_rank``), and the pages must show every state of it."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, cast, get_args

import httpx

from dispatcher.monitor import MonitorConfig, create_app
from dispatcher.store import FAILURES, RETURNS, Store
from schemas.messages import EventStatus
from schemas.states import (
    ATTEMPT_STATES,
    EVENT_RANK,
    EVENT_STATES,
    JOB_STATES,
    TASK_STATES,
    TERMINAL,
    WORKER_STATES,
    WORKFLOW_STATES,
    terminal,
)

BY_TABLE = {
    "workflows": WORKFLOW_STATES,
    "tasks": TASK_STATES,
    "jobs": JOB_STATES,
    "events": EVENT_STATES,
    "attempts": ATTEMPT_STATES,
    "workers": WORKER_STATES,
}


async def test_every_status_check_lists_the_states_of_its_table(store: Store) -> None:
    rows = await store.pool.fetch(
        "SELECT c.conrelid::regclass::text AS tbl, pg_get_constraintdef(c.oid) AS def "
        "FROM pg_constraint c WHERE c.contype = 'c'"
    )
    # e.g. CHECK ((status = ANY (ARRAY['running'::text, 'finished'::text, ...])))
    checks = {r["tbl"]: set(re.findall(r"'([^']*)'::text", r["def"])) for r in rows if "(status" in r["def"]}
    assert checks == {table: set(states) for table, states in BY_TABLE.items()}


async def test_event_rank_is_sqls_es_status_rank(store: Store) -> None:
    assert set(EVENT_RANK) == set(EVENT_STATES)
    for state in EVENT_STATES:
        assert await store.pool.fetchval("SELECT es_status_rank($1)", state) == EVENT_RANK[state], state


def test_terminal_states_and_the_wire_vocabulary() -> None:
    for states in (EVENT_STATES, JOB_STATES, TASK_STATES, WORKFLOW_STATES):
        assert set(TERMINAL) <= set(states)
    # what a worker reports is an attempt's state, a return (which ranks nothing), or a
    # failure with no next attempt (a PanDA pilot's 'fatal', recorded as 'failed')
    assert set(get_args(EventStatus)) - set(RETURNS) == set(ATTEMPT_STATES) | set(FAILURES)
    assert set(FAILURES) - set(ATTEMPT_STATES) == {"fatal"}
    assert terminal({s: 1 for s in EVENT_STATES}) == len(TERMINAL)


NOW = datetime(2026, 1, 1, tzinfo=UTC)
# distinct counts, so that each shown number is the one of its state
EVENTS = {s: 10 + i for i, s in enumerate(EVENT_STATES)}


class _Pages:
    """The reads behind the pages, answering one workflow with a task, a job and events
    in every state."""

    async def monitor_workflows(self, limit: int) -> list[dict[str, Any]]:
        row = {"name": "w", "n_events": sum(EVENTS.values()), "submitted_at": NOW, "finished_at": None}
        return [{**row, "id": i + 1, "status": s, "events": EVENTS} for i, s in enumerate(WORKFLOW_STATES)]

    async def workflow_status(self, workflow_id: int) -> dict[str, Any]:
        task = {"event_service": True, "max_payloads_per_job": 2, "n_jobs": 1, "jobs": {}, "events": EVENTS}
        tasks = [
            {**task, "id": i + 1, "label": f"t{i}", "status": s, "n_events": sum(EVENTS.values())}
            for i, s in enumerate(TASK_STATES)
        ]
        return {
            "id": workflow_id,
            "name": "w",
            "status": "running",
            "n_events": len(tasks) * sum(EVENTS.values()),
            "submitted_at": NOW,
            "finished_at": None,
            "tasks": tasks,
        }

    async def task_parents(self, workflow_id: int) -> dict[int, list[str]]:
        return {}

    async def jobs_page(self, workflow_id: int, after: int, status: str | None, limit: int) -> list[dict[str, Any]]:
        job = {"label": "t0", "seq": 1, "n_events": 1, "first_number": 0, "last_number": 0}
        return [{**job, "id": i + 1, "status": s} for i, s in enumerate(JOB_STATES)]

    async def monitor_job(self, job_id: int) -> dict[str, Any]:
        return {
            "id": job_id,
            "workflow_id": 1,
            "workflow": "w",
            "task_id": 1,
            "label": "t0",
            "seq": 1,
            "status": "running",
            "n_events": len(EVENT_STATES),
            "first_number": 0,
            "last_number": len(EVENT_STATES) - 1,
        }

    async def job_event_counts(self, job_id: int) -> dict[str, int]:
        return EVENTS

    async def monitor_task(self, task_id: int) -> dict[str, Any]:
        return {
            "id": task_id,
            "workflow_id": 1,
            "workflow": "w",
            "label": "t0",
            "status": "running",
            "event_service": True,
            "max_payloads_per_job": 2,
            "n_events": sum(EVENTS.values()),
            "n_jobs": 1,
            "events": EVENTS,
        }

    async def task_events_page(self, task_id: int, after: int, status: str | None, limit: int) -> list[dict[str, Any]]:
        event = {"job_id": 1, "payload": "p", "attempt": 1}
        return [{**event, "number": n, "status": s} for n, s in enumerate(EVENT_STATES)]

    async def count_samples(self, task_ids: list[int], per_task: int) -> list[dict[str, Any]]:
        return []  # (the pictures: tests/test_monitor_pictures.py)

    async def duration_counts(self, task_ids: list[int]) -> list[dict[str, Any]]:
        return []

    async def job_attempts(self, job_id: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        return [], 0  # (the timeline: tests/test_monitor_pictures.py)

    async def job_events_page(self, job_id: int, after: int, status: str | None, limit: int) -> list[dict[str, Any]]:
        return [{"number": n, "payload": "p", "status": s, "attempt": 1} for n, s in enumerate(EVENT_STATES)]


async def _page(url: str) -> str:
    app = create_app(cast(Store, _Pages()), None, MonitorConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as c:
        r = await c.get(url)
    assert r.status_code == 200, r.text
    return r.text


def _counts_shown(html: str) -> None:
    for s, n in EVENTS.items():
        assert f'<span class="state {s}">{s} {n}</span>' in html, s


async def test_the_pages_show_every_state() -> None:
    html = await _page("/")
    _counts_shown(html)
    for s in WORKFLOW_STATES:
        assert f'<span class="state {s}">{s}</span>' in html, s

    html = await _page("/workflows/1")
    _counts_shown(html)
    for s in TASK_STATES:
        assert f'<span class="state {s}">{s}</span>' in html, s
    for s in JOB_STATES:  # the filter offers each job state, and each job shows its own
        assert f">{s}</option>" in html, s
        assert f'<span class="state {s}">{s}</span>' in html, s
    done = terminal(EVENTS)  # each task's bar counts its ended events
    assert html.count(f'title="{done}/{sum(EVENTS.values())}"') == len(TASK_STATES)

    for url in ("/jobs/1", "/tasks/1"):
        html = await _page(url)
        _counts_shown(html)
        for s in EVENT_STATES:
            assert f">{s}</option>" in html, (url, s)
            assert f'<span class="state {s}">{s}</span>' in html, (url, s)
