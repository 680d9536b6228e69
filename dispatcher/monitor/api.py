"""The JSON API (reads) and /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from dispatcher.metrics import render_metrics
from dispatcher.monitor.auth import Guards
from dispatcher.monitor.params import (
    NOT_FOUND_JOB,
    NOT_FOUND_TASK,
    NOT_FOUND_WORKFLOW,
    PAGE,
    UNAUTHORIZED,
    UNAUTHORIZED_JSON,
    AfterEvent,
    AfterJob,
    EventFilter,
    JobFilter,
    JobId,
    Limit,
    TaskId,
    WorkflowFilter,
    WorkflowId,
)
from dispatcher.monitor.views import Views
from schemas.api import (
    DeadLetters,
    EventsPage,
    JobDetail,
    TaskDetail,
    WorkerView,
    WorkflowDetail,
    WorkflowSummary,
)


def router(views: Views, guards: Guards) -> APIRouter:
    api = APIRouter()
    read = guards.read

    @api.get("/api/workflows", dependencies=read, response_model=list[WorkflowSummary], responses=UNAUTHORIZED)
    async def api_workflows(limit: Limit = 50) -> list[WorkflowSummary]:
        return await views.workflows(limit)

    @api.get(
        "/api/workflows/{workflow_id}",
        dependencies=read,
        response_model=WorkflowDetail,
        responses={**UNAUTHORIZED, **NOT_FOUND_WORKFLOW},
    )
    async def api_workflow(workflow_id: WorkflowId, after: AfterJob = 0, status: JobFilter = None) -> WorkflowDetail:
        """A workflow, its task DAG with counts, and a page of its jobs (``after``: a job id)."""
        return await views.workflow(workflow_id, after, status)

    @api.get(
        "/api/jobs/{job_id}",
        dependencies=read,
        response_model=JobDetail,
        responses={**UNAUTHORIZED, **NOT_FOUND_JOB},
    )
    async def api_job(job_id: JobId) -> JobDetail:
        return await views.job(job_id)

    @api.get(
        "/api/jobs/{job_id}/events",
        dependencies=read,
        response_model=EventsPage,
        responses=UNAUTHORIZED,
    )
    async def api_job_events(
        job_id: JobId,
        after: AfterEvent = -1,
        status: EventFilter = None,
        limit: Limit = PAGE,
    ) -> EventsPage:
        """A page of a job's events by number (``after``: the last number seen), optionally of one state
        (an unknown job has none)."""
        return await views.job_events(job_id, after, status, limit)

    @api.get(
        "/api/tasks/{task_id}",
        dependencies=read,
        response_model=TaskDetail,
        responses={**UNAUTHORIZED, **NOT_FOUND_TASK},
    )
    async def api_task(task_id: TaskId) -> TaskDetail:
        """A task and its events counted by state."""
        return await views.task(task_id)

    @api.get(
        "/api/tasks/{task_id}/events",
        dependencies=read,
        response_model=EventsPage,
        responses=UNAUTHORIZED,
    )
    async def api_task_events(
        task_id: TaskId,
        after: AfterEvent = -1,
        status: EventFilter = None,
        limit: Limit = PAGE,
    ) -> EventsPage:
        return await views.task_events(task_id, after, status, limit)

    @api.get("/api/dlq", dependencies=read, response_model=DeadLetters, responses=UNAUTHORIZED)
    async def api_dlq(workflow: WorkflowFilter = None) -> DeadLetters:
        """Failed events (out of attempts) with the replay command for each."""
        return await views.dead_letters(workflow)

    @api.get("/api/workers", dependencies=read, response_model=list[WorkerView], responses=UNAUTHORIZED)
    async def api_workers() -> list[WorkerView]:
        return await views.workers()

    return api


def metrics_router(views: Views, guards: Guards) -> APIRouter:
    """/metrics: a router of its own, included after the actions (the OpenAPI lists paths
    in the order they were added)."""
    api = APIRouter()

    # a text route: its error bodies are still JSON, said explicitly (FastAPI would say text/plain)
    @api.get("/metrics", dependencies=guards.read, response_class=PlainTextResponse, responses=UNAUTHORIZED_JSON)
    async def metrics() -> Response:
        body, content_type = await render_metrics(views.store, views.broker)
        return Response(body, media_type=content_type)

    return api
