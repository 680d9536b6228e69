"""The monitor's JSON API (what its pages show), described in its OpenAPI document."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from schemas.text import INT32_MAX, INT64_MAX, MAX_NAME, MAX_TEXT

# free text of a request may hold anything but NUL (Postgres text cannot)
NO_NUL = r"^[^\x00]*$"


class Problem(BaseModel):
    """The body of every error but 422 (FastAPI's HTTPValidationError)."""

    detail: str


class WorkflowSummary(BaseModel):
    id: int
    name: str
    status: str
    n_events: int
    done: int  # events in a terminal state
    events: dict[str, int]  # by state
    submitted_at: datetime
    finished_at: datetime | None = None


class TaskView(BaseModel):
    id: int
    label: str
    status: str
    parents: list[str]
    event_service: bool
    max_payloads_per_job: int
    n_events: int
    n_jobs: int
    events: dict[str, int]
    jobs: dict[str, int]
    released_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class TaskDetail(BaseModel):
    """A task on its own page: its events by state (from the bookkeeping's counters)."""

    id: int
    workflow_id: int
    workflow: str
    label: str
    status: str
    event_service: bool
    max_payloads_per_job: int
    n_events: int
    n_jobs: int
    done: int  # events in a terminal state
    events: dict[str, int]
    released_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobView(BaseModel):
    id: int
    label: str
    seq: int
    status: str
    n_events: int
    first_number: int
    last_number: int
    log_path: str | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class WorkflowDetail(WorkflowSummary):
    tasks: list[TaskView]
    jobs: list[JobView]  # the first page; more at /api/workflows/{id}/jobs
    next_job: int | None = None  # pass as ?after= for the next page


class EventView(BaseModel):
    job_id: int | None = None
    number: int
    payload: str
    status: str
    attempt: int
    worker: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration: float | None = None  # seconds
    exit_code: int | None = None
    error: str | None = None
    replays: int = 0


class EventsPage(BaseModel):
    events: list[EventView]
    next: int | None = None  # pass as ?after= for the next page


class JobDetail(JobView):
    workflow_id: int
    workflow: str
    task_id: int
    walltime: float | None = None
    events: dict[str, int]


class FailedEvent(BaseModel):
    workflow_id: int
    label: str
    job_id: int
    number: int
    payload: str
    attempt: int
    worker: str | None = None
    ended_at: datetime | None = None
    error: str | None = None
    replay_command: str


class DeadLetters(BaseModel):
    dlq_depth: int | None  # messages in es.dlq (None: RabbitMQ unreachable)
    events: list[FailedEvent]
    replay_all: str


class WorkerView(BaseModel):
    id: str
    host: str
    pid: int
    slots: int
    status: str
    jobs: list[int]
    events_done: int
    started_at: datetime
    last_seen: datetime


def _not_text(value: object) -> object:
    # JSON Schema's integer takes 40.0 but not "40" nor true: lax pydantic takes all three,
    # strict pydantic none but true
    if isinstance(value, str | bytes | bool):
        raise ValueError("must be a JSON integer")
    return value


# (the bounds before the validator: after it, pydantic writes them as "ge"/"le", not JSON Schema)
_JsonInt = BeforeValidator(_not_text)
JsonId = Annotated[int, Field(ge=1, le=INT64_MAX), _JsonInt]  # a bigint id
JsonNumber = Annotated[int, Field(ge=0, le=INT64_MAX), _JsonInt]  # an event number (bigint)
JsonCount = Annotated[int, Field(ge=1, le=INT32_MAX), _JsonInt]


class ReplayRequest(BaseModel):
    # an unknown field (a misspelt dry_run) is refused rather than ignored: ignoring it
    # would replay for real
    model_config = ConfigDict(extra="forbid")
    workflow: JsonId | None = None
    task: str | None = Field(None, max_length=MAX_NAME, pattern=NO_NUL)
    job: JsonId | None = None
    event: JsonNumber | None = None
    reason: str | None = Field(None, max_length=MAX_TEXT, pattern=NO_NUL)  # a substring of the last error
    limit: JsonCount | None = None
    dry_run: StrictBool = False  # "false" is not false


class ActionResult(BaseModel):
    ok: bool
    detail: str
    lines: list[str] = []
