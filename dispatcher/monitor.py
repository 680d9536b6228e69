"""The monitor: HTML pages, a JSON API (OpenAPI at /openapi.json) and /metrics, read from
the Postgres bookkeeping. Served by ``dispatcher start`` and alone by ``dispatcher monitor``.

Every value is escaped (Jinja2 autoescape): payloads and errors are user data. Actions
that change state (cancel, replay) need ``DISPATCHER_MONITOR_TOKEN``; reading needs
``DISPATCHER_MONITOR_READ_TOKEN`` only when that is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from fastapi.templating import Jinja2Templates

from dispatcher.broker import Broker
from dispatcher.metrics import render_metrics
from dispatcher.replay import Selector, cancel, replay
from dispatcher.status import EVENT_STATES, terminal
from dispatcher.store import Store
from schemas.api import (
    ActionResult,
    DeadLetters,
    EventsPage,
    EventView,
    FailedEvent,
    JobDetail,
    JobView,
    ReplayRequest,
    TaskView,
    WorkerView,
    WorkflowDetail,
    WorkflowSummary,
)

log = logging.getLogger(__name__)

PAGE = 100


@dataclass(frozen=True)
class MonitorConfig:
    token: str | None = None  # for cancel and replay
    read_token: str | None = None  # for everything, when set
    refresh_ms: int = 2000


def _event(row: dict[str, Any]) -> EventView:
    started, ended = row.get("started_at"), row.get("ended_at")
    duration = (ended - started).total_seconds() if started and ended else None
    return EventView(**row, duration=duration)


def replay_command(
    *, workflow: int | None = None, task: str | None = None, job: int | None = None, event: int | None = None
) -> str:
    parts = ["dispatcher", "replay"]
    for flag, value in (("--workflow", workflow), ("--task", task), ("--job", job), ("--event", event)):
        if value is not None:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def create_app(store: Store, broker: Broker | None, config: MonitorConfig) -> FastAPI:
    app = FastAPI(title="EventService dispatcher monitor", version="1", docs_url=None, redoc_url=None)
    templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))  # autoescape on for .html

    def secret_matches(given: str | None, expected: str) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), expected.encode())

    def token_of(request: Request, authorization: str | None, x_token: str | None) -> str | None:
        if authorization and authorization.lower().startswith("bearer "):
            return authorization[7:]
        return x_token or request.query_params.get("token")

    async def may_read(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_dispatcher_token: Annotated[str | None, Header()] = None,
    ) -> None:
        if config.read_token and not secret_matches(
            token_of(request, authorization, x_dispatcher_token), config.read_token
        ):
            raise HTTPException(401, "reading needs the monitor's read token")

    async def may_act(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        x_dispatcher_token: Annotated[str | None, Header()] = None,
    ) -> None:
        if not config.token:
            raise HTTPException(403, "actions are disabled: start the monitor with DISPATCHER_MONITOR_TOKEN set")
        if not secret_matches(token_of(request, authorization, x_dispatcher_token), config.token):
            raise HTTPException(403, "this action needs the monitor token (Authorization: Bearer ...)")

    read = [Depends(may_read)]

    # -- data ---------------------------------------------------------------------------

    async def workflows(limit: int = 50) -> list[WorkflowSummary]:
        rows = await store.fetch("monitor_workflows", limit)
        return [WorkflowSummary(**r, done=terminal(r["events"])) for r in rows]

    async def workflow(workflow_id: int, after: int = 0, status: str | None = None) -> WorkflowDetail:
        st = await store.workflow_status(workflow_id)
        if st is None:
            raise HTTPException(404, f"no workflow {workflow_id}")
        parents: dict[int, list[str]] = {}
        for d in await store.fetch("monitor_task_deps", workflow_id):
            parents.setdefault(d["task_id"], []).append(d["parent"])
        tasks = [
            TaskView(**{k: t[k] for k in TaskView.model_fields if k in t}, parents=parents.get(t["id"], []))
            for t in st["tasks"]
        ]
        events: dict[str, int] = {}
        for t in tasks:
            for s, n in t.events.items():
                events[s] = events.get(s, 0) + n
        jobs = [JobView(**r) for r in await store.fetch("monitor_jobs", workflow_id, after, status, PAGE + 1)]
        return WorkflowDetail(
            id=st["id"],
            name=st["name"],
            status=st["status"],
            n_events=st["n_events"],
            done=terminal(events),
            events=events,
            submitted_at=st["submitted_at"],
            finished_at=st["finished_at"],
            tasks=tasks,
            jobs=jobs[:PAGE],
            next_job=jobs[PAGE - 1].id if len(jobs) > PAGE else None,
        )

    async def job(job_id: int) -> JobDetail:
        row = await store.fetchrow("monitor_job", job_id)
        if row is None:
            raise HTTPException(404, f"no job {job_id}")
        counts = {r["status"]: r["n"] for r in await store.fetch("monitor_job_counts", job_id)}
        return JobDetail(**row, events=counts)

    async def page(query: str, key: int, after: int, status: str | None, limit: int) -> EventsPage:
        if status is not None and status not in (*EVENT_STATES, "retrying"):
            raise HTTPException(422, f"unknown state {status!r}")
        rows = await store.fetch(query, key, after, status, limit + 1)
        return EventsPage(
            events=[_event(r) for r in rows[:limit]], next=rows[limit - 1]["number"] if len(rows) > limit else None
        )

    async def dead_letters(workflow_id: int | None = None, limit: int = 500) -> DeadLetters:
        depth = None
        if broker is not None:
            with contextlib.suppress(Exception):
                depth = await broker.queue_depth(broker.names.dlq)
        rows = await store.fetch("monitor_failed_events", workflow_id, limit)
        events = [
            FailedEvent(
                **r, replay_command=replay_command(workflow=r["workflow_id"], job=r["job_id"], event=r["number"])
            )
            for r in rows
        ]
        return DeadLetters(dlq_depth=depth, events=events, replay_all=replay_command(workflow=workflow_id))

    async def workers() -> list[WorkerView]:
        return [WorkerView(**r) for r in await store.fetch("monitor_workers")]

    # -- JSON API -----------------------------------------------------------------------

    @app.get("/api/workflows", dependencies=read, response_model=list[WorkflowSummary])
    async def api_workflows(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[WorkflowSummary]:
        return await workflows(limit)

    @app.get("/api/workflows/{workflow_id}", dependencies=read, response_model=WorkflowDetail)
    async def api_workflow(workflow_id: int, after: int = 0, status: str | None = None) -> WorkflowDetail:
        """A workflow, its task DAG with counts, and a page of its jobs (``after``: a job id)."""
        return await workflow(workflow_id, after, status)

    @app.get("/api/jobs/{job_id}", dependencies=read, response_model=JobDetail)
    async def api_job(job_id: int) -> JobDetail:
        return await job(job_id)

    @app.get("/api/jobs/{job_id}/events", dependencies=read, response_model=EventsPage)
    async def api_job_events(
        job_id: int, after: int = -1, status: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = PAGE
    ) -> EventsPage:
        """A page of a job's events by number (``after``: the last number seen), optionally of one state."""
        return await page("monitor_job_events", job_id, after, status, limit)

    @app.get("/api/tasks/{task_id}/events", dependencies=read, response_model=EventsPage)
    async def api_task_events(
        task_id: int, after: int = -1, status: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = PAGE
    ) -> EventsPage:
        return await page("monitor_task_events", task_id, after, status, limit)

    @app.get("/api/dlq", dependencies=read, response_model=DeadLetters)
    async def api_dlq(workflow: int | None = None) -> DeadLetters:
        """Failed events (out of attempts) with the replay command for each."""
        return await dead_letters(workflow)

    @app.get("/api/workers", dependencies=read, response_model=list[WorkerView])
    async def api_workers() -> list[WorkerView]:
        return await workers()

    @app.post("/api/workflows/{workflow_id}/cancel", dependencies=[Depends(may_act)], response_model=ActionResult)
    async def api_cancel(workflow_id: int) -> ActionResult:
        if broker is None:
            raise HTTPException(503, "RabbitMQ is not configured for this monitor")
        jobs = await cancel(store, broker, workflow_id)
        if jobs is None:
            raise HTTPException(409, f"workflow {workflow_id} is not running")
        return ActionResult(ok=True, detail=f"cancelled workflow {workflow_id}: {len(jobs)} job(s) stopped")

    @app.post("/api/replay", dependencies=[Depends(may_act)], response_model=ActionResult)
    async def api_replay(body: ReplayRequest) -> ActionResult:
        if broker is None:
            raise HTTPException(503, "RabbitMQ is not configured for this monitor")
        selector = Selector(workflow=body.workflow, task=body.task, job=body.job, event=body.event, reason=body.reason)
        outcomes = await replay(store, broker, selector, limit=body.limit, dry_run=body.dry_run)
        n = sum(o.action in ("replayed", "would replay") for o in outcomes)
        return ActionResult(
            ok=True,
            detail=f"{'would replay' if body.dry_run else 'replayed'} {n} event(s)",
            lines=[o.describe() for o in outcomes],
        )

    @app.get("/metrics", dependencies=read, response_class=PlainTextResponse)
    async def metrics() -> Response:
        body, content_type = await render_metrics(store, broker)
        return Response(body, media_type=content_type)

    # -- pages --------------------------------------------------------------------------

    def render(request: Request, name: str, **context: Any) -> HTMLResponse:
        context.update(states=EVENT_STATES, refresh_ms=config.refresh_ms, now=datetime.now().astimezone())
        return templates.TemplateResponse(request, name, context)

    @app.get("/", dependencies=read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workflows(request: Request) -> HTMLResponse:
        return render(request, "workflows.html", workflows=await workflows())

    @app.get("/workflows/{workflow_id}", dependencies=read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workflow(
        request: Request, workflow_id: int, after: int = 0, status: str | None = None
    ) -> HTMLResponse:
        wf = await workflow(workflow_id, after, status or None)
        return render(request, "workflow.html", wf=wf, levels=list(_levels(wf.tasks)), status=status)

    @app.get("/jobs/{job_id}", dependencies=read, response_class=HTMLResponse, include_in_schema=False)
    async def page_job(request: Request, job_id: int, after: int = -1, status: str | None = None) -> HTMLResponse:
        detail = await job(job_id)
        events = await page("monitor_job_events", job_id, after, status or None, PAGE)
        return render(request, "job.html", job=detail, page=events, status=status or "", after=after)

    @app.get("/jobs/{job_id}/log", dependencies=read, include_in_schema=False)
    async def job_log(job_id: int) -> Response:
        detail = await job(job_id)
        if not detail.log_path or not Path(detail.log_path).is_file():
            raise HTTPException(404, "this job has no log (yet), or it is not on this host")
        return FileResponse(detail.log_path, media_type="text/plain; charset=utf-8")

    @app.get("/dlq", dependencies=read, response_class=HTMLResponse, include_in_schema=False)
    async def page_dlq(request: Request, workflow: int | None = None) -> HTMLResponse:
        return render(request, "dlq.html", dlq=await dead_letters(workflow), workflow=workflow)

    @app.get("/workers", dependencies=read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workers(request: Request) -> HTMLResponse:
        return render(request, "workers.html", workers=await workers())

    return app


def _levels(tasks: list[TaskView]) -> Iterator[list[TaskView]]:
    """The DAG drawn left to right: a task one column after its last parent."""
    by_label = {t.label: t for t in tasks}
    level: dict[str, int] = {}

    def depth(label: str) -> int:
        if label not in level:
            level[label] = 1 + max((depth(p) for p in by_label[label].parents), default=-1)
        return level[label]

    for t in tasks:
        depth(t.label)
    for n in range(max(level.values(), default=-1) + 1):
        yield [t for t in tasks if level[t.label] == n]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the dispatcher handles SIGINT/SIGTERM itself


async def serve(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    log.info("monitor listening", extra={"url": f"http://{host}:{port}/"})

    async def stopper() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stopper())
    try:
        await server.serve()
    finally:
        watcher.cancel()
