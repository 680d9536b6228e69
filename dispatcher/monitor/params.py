"""What the monitor's routes take and what they may answer, as its OpenAPI says."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path, Query

from schemas.api import Problem
from schemas.states import EventState, JobState
from schemas.text import INT64_MAX

PAGE = 100

# Every integer parameter is bounded by the column it is compared with (ids are bigint):
# a larger one used to reach asyncpg and fail there, a 500.
WorkflowId = Annotated[int, Path(ge=1, le=INT64_MAX, description="a workflow's id")]
JobId = Annotated[int, Path(ge=1, le=INT64_MAX, description="a job's id")]
TaskId = Annotated[int, Path(ge=1, le=INT64_MAX, description="a task's id")]
AfterJob = Annotated[int, Query(ge=0, le=INT64_MAX, description="the last job id seen (keyset pagination)")]
AfterEvent = Annotated[int, Query(ge=-1, le=INT64_MAX, description="the last event number seen")]
Limit = Annotated[int, Query(ge=1, le=1000)]
WorkflowFilter = Annotated[int | None, Query(ge=1, le=INT64_MAX, description="only this workflow's")]
# The state filters are enums (schemas.states), so a NUL or a made-up state is a 422 from
# validation, never a query that Postgres refuses
EventFilter = Annotated[EventState | None, Query()]
JobFilter = Annotated[JobState | None, Query()]
# the pages' state menus send "" for "all"
PageEventFilter = Annotated[EventState | Literal[""] | None, Query()]
PageJobFilter = Annotated[JobState | Literal[""] | None, Query()]


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: _problem("A read token is set, and the request carries neither it nor a session")}
UNAUTHORIZED_JSON: Responses = {
    401: {
        "description": UNAUTHORIZED[401]["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}
FORBIDDEN: Responses = {
    401: _problem("No Authorization header: actions need the monitor token"),
    403: _problem("Actions are disabled, or the token is not the monitor token"),
}
NO_BROKER: Responses = {503: _problem("RabbitMQ is not configured for this monitor")}
NOT_FOUND_WORKFLOW: Responses = {404: _problem("No such workflow")}
NOT_FOUND_JOB: Responses = {404: _problem("No such job")}
NOT_FOUND_TASK: Responses = {404: _problem("No such task")}
NOT_RUNNING: Responses = {409: _problem("The workflow is not running")}
UNREADABLE_BODY: Responses = {400: _problem("The body cannot be read (not UTF-8)")}
