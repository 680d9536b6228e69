"""Messages exchanged over RabbitMQ (schema version 1).

``JobAnnouncement`` (es.jobs): job <id> has work, with what a worker needs to set it up.
``EventRange`` (es.job.<id>): consecutive events of one job, each with its attempt.
``StatusBatch`` (es.status): status updates of many events, job log records, heartbeats.
``DeadLetter`` (es.dlq): an event that used up its attempts, with what replay needs.
``CancelJobs`` (es.control, fanout to every worker): stop running these jobs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

# 'retrying': this attempt failed and the next one is scheduled (in a delay queue)
EventStatus = Literal["running", "finished", "failed", "retrying"]


class MessageError(ValueError):
    """A message that cannot be decoded or does not validate (a poison message)."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = 1  # SCHEMA_VERSION


class PayloadSpec(BaseModel):
    """How a task's payloads run: a command template or an in-process callable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    command: str | None = None  # template with {payload}; split into argv, no shell
    shell: bool = False  # the label asked for /bin/sh; {payload} is shell-quoted
    function: str | None = None  # "module:function", called with the payload string
    timeout: float | None = Field(default=None, gt=0)
    setup: str | None = None  # a command run once when a worker sets the job up
    teardown: str | None = None  # ... and once when it tears it down (before the log is written)


class JobAnnouncement(_Wire):
    kind: Literal["job"] = "job"
    workflow_id: int
    task_id: int
    job_id: int
    label: str
    queue: str
    payload: PayloadSpec
    max_attempts: Annotated[int, Field(ge=1)] = 1
    retry_delay: Annotated[float, Field(ge=0)] = 2.0  # seconds before the 2nd attempt; doubles after


class EventSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    number: int
    payload: str
    attempt: Annotated[int, Field(ge=1)] = 1


class EventRange(_Wire):
    kind: Literal["range"] = "range"
    workflow_id: int
    job_id: int
    events: Annotated[list[EventSpec], Field(min_length=1)]


class StatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: int
    number: int
    attempt: Annotated[int, Field(ge=1)]
    status: EventStatus
    worker: str
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None


class JobLog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: int
    path: str


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    pid: int
    slots: int
    state: Literal["live", "stopping", "stopped"]
    jobs: list[int] = []  # jobs this worker is serving now
    events_done: int = 0
    started_at: datetime


class StatusBatch(_Wire):
    kind: Literal["status"] = "status"
    worker: str
    updates: list[StatusUpdate] = []
    logs: list[JobLog] = []
    heartbeat: Heartbeat | None = None


class DeadLetter(_Wire):
    """An event out of attempts. Replay puts it back into its job's queue."""

    kind: Literal["dead"] = "dead"
    workflow_id: int
    job_id: int
    label: str
    number: int
    payload: str
    attempts: int
    error: str | None = None
    worker: str | None = None
    at: datetime


class CancelJobs(_Wire):
    kind: Literal["cancel"] = "cancel"
    job_ids: list[int]


M = TypeVar("M", bound=_Wire)


def _fields(model: BaseModel) -> dict[str, Any]:
    return model.__dict__  # a model's fields (orjson asks for each model it meets)


def encode(message: _Wire) -> bytes:
    # orjson walks the models itself (datetimes in RFC 3339, None as null): about 3x
    # cheaper than model_dump(mode="json"), which built every dict and string in Python
    return orjson.dumps(message, default=_fields)


def decode(body: bytes, model: type[M]) -> M:
    """Decode one message; any problem becomes a ``MessageError`` naming it."""
    try:  # the common case, parsed and validated in one pass by pydantic-core
        message = model.model_validate_json(body)
        if "v" in message.model_fields_set:  # a version it must state, not default
            return message
    except ValidationError:
        pass  # parsed again below, to say precisely what is wrong
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MessageError(f"undecodable body: {exc}") from None
    if not isinstance(raw, dict):
        raise MessageError("message is not a JSON object")
    if raw.get("v") != SCHEMA_VERSION:
        raise MessageError(f"unsupported schema version {raw.get('v')!r} (expected {SCHEMA_VERSION})")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MessageError(f"invalid {model.__name__}: {where}: {first['msg']}") from None
