"""Messages exchanged over RabbitMQ (schema version 1).

``JobAnnouncement`` (es.jobs): job <id> has work, with what a worker needs to set it up.
``EventRange`` (es.job.<id>): consecutive events of one job, each with its attempt.
``StatusBatch`` (es.status): status updates of many events, and job log records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

EventStatus = Literal["running", "finished", "failed"]


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


class JobAnnouncement(_Wire):
    kind: Literal["job"] = "job"
    workflow_id: int
    task_id: int
    job_id: int
    label: str
    queue: str
    payload: PayloadSpec


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


class StatusBatch(_Wire):
    kind: Literal["status"] = "status"
    worker: str
    updates: list[StatusUpdate] = []
    logs: list[JobLog] = []


M = TypeVar("M", bound=_Wire)


def encode(message: _Wire) -> bytes:
    return orjson.dumps(message.model_dump(mode="json", exclude_none=True))


def decode(body: bytes, model: type[M]) -> M:
    """Decode one message; any problem becomes a ``MessageError`` naming it."""
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
