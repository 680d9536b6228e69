"""Messages exchanged over RabbitMQ (schema version 2).

``JobAnnouncement`` (es.jobs): job <id> has work, with what a worker needs to set it up.
``EventRange`` (es.job.<id>): consecutive events of one job, each with its attempt.
``StatusBatch`` (es.status): status updates of many events, job log records, heartbeats,
messages a worker refused, and jobs it asks others to join.
``DeadLetter`` (es.dlq): an event that used up its attempts (replay selects with it).
``CancelJobs`` (es.control, fanout to every worker): stop running these jobs.

Only the control plane publishes work (announcements, ranges, retries, dead letters);
a worker publishes status batches and nothing else (see the trust model in the docs).
So nothing a worker needs to find is named by a message: a job's queue is derived from
its id, and every next attempt is issued by the control plane from Postgres.

Every integer is bounded to the Postgres column that stores it, and every text from
outside is made storable (``schemas.text``): one bad value used to fail the whole
bookkeeping transaction it was in, again at every redelivery.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.text import Int32, Name, NonNegInt32, NonNegInt64, PosInt32, Text

SCHEMA_VERSION = 2

# What a worker says of one attempt of one event:
#   running, finished, failed: the payload started, succeeded, failed (the control plane
#     decides whether a next attempt is issued or the event is dead-lettered);
#   returned: the range came back to this worker after its holder was lost (RabbitMQ
#     delivered it again): not run here; the control plane charges the attempt only if
#     Postgres saw it running, and issues the events again;
#   stopped: this worker gave the event back unfinished (shutdown, job closed): issued
#     again at the same attempt (a shutdown is not a failure of the payload);
#   fatal: failed, and no further attempt is to be made (a PanDA pilot's "fatal"): the
#     event fails and is dead-lettered whatever attempts it has left.
EventStatus = Literal["running", "finished", "failed", "returned", "stopped", "fatal"]
Id = Annotated[int, Field(ge=1, le=2**63 - 1, strict=True)]


class MessageError(ValueError):
    """A message that cannot be decoded or does not validate (a poison message)."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[2] = 2  # SCHEMA_VERSION


class PayloadSpec(BaseModel):
    """How a task's payloads run: a command template or an in-process callable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    command: str | None = None  # template with {payload}; split into argv, no shell
    shell: bool = False  # the label asked for /bin/sh; the payload reaches it as "$1", never as code
    function: str | None = None  # "module:function", called with the payload string
    timeout: float | None = Field(default=None, gt=0)
    setup: str | None = None  # a command run once when a worker sets the job up
    teardown: str | None = None  # ... and once when it tears it down (before the log is written)


class JobAnnouncement(_Wire):
    """Job <id> has work. Its queue is ``Names.job(job_id)``: never a name from a message."""

    kind: Literal["job"] = "job"
    workflow_id: Id
    task_id: Id
    job_id: Id
    label: str
    payload: PayloadSpec


class EventSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    number: NonNegInt64
    payload: str
    attempt: PosInt32 = 1
    issue: NonNegInt32 = 0  # which publication of the event this is (see ``returned``)


class EventRange(_Wire):
    kind: Literal["range"] = "range"
    workflow_id: Id
    job_id: Id
    events: Annotated[list[EventSpec], Field(min_length=1, max_length=100_000)]
    # these events came back once already: the worker confirms each one's 'running'
    # before it starts it, so that a payload that kills its worker before the report
    # left (a blocking function reports none) is seen running, and charged, next time
    confirm_start: bool = False


class StatusUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: Id
    number: NonNegInt64
    attempt: PosInt32
    status: EventStatus
    worker: Name
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: Int32 | None = None
    error: Text | None = None
    issue: NonNegInt32 | None = None  # returned, stopped: the issue of the range given back


class JobLog(BaseModel):
    """Where a job's log is (informational: the monitor derives it from the ids)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: Id
    path: Text


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    host: Name
    pid: Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]
    slots: PosInt32
    state: Literal["live", "stopping", "stopped"]
    jobs: Annotated[list[Id], Field(max_length=100_000)] = []  # jobs this worker is serving now
    setting_up: Annotated[list[Id], Field(max_length=10_000)] = []  # ... and setting up (not consumed yet)
    events_done: NonNegInt64 = 0
    started_at: datetime


class Refused(BaseModel):
    """A message a worker could not take (undecodable, or not what its queue holds): the
    control plane puts it in es.dlq with the reason (a worker may not publish there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Name  # the queue it came from
    reason: Text
    body: Annotated[str, Field(max_length=1_000_000)]  # the message's bytes, base64
    # an announcement refused because the job's set-up failed here: counted, and a job
    # nobody can set up fails instead of being announced for ever
    setup_failed: Id | None = None


class StatusBatch(_Wire):
    kind: Literal["status"] = "status"
    worker: Name
    updates: Annotated[list[StatusUpdate], Field(max_length=100_000)] = []
    logs: Annotated[list[JobLog], Field(max_length=10_000)] = []
    heartbeat: Heartbeat | None = None
    refused: Annotated[list[Refused], Field(max_length=1000)] = []
    # jobs with more ranges waiting than this worker takes at once: announce them again
    # so that idle workers join
    invite: Annotated[list[Id], Field(max_length=10_000)] = []


class DeadLetter(_Wire):
    """An event out of attempts. Replay selects with it and takes the event's payload and
    attempts from Postgres: a dead letter is never trusted to say what runs."""

    kind: Literal["dead"] = "dead"
    workflow_id: Id
    job_id: Id
    label: str
    number: NonNegInt64
    payload: str
    attempts: PosInt32
    error: Text | None = None
    worker: Name | None = None
    at: datetime


class CancelJobs(_Wire):
    kind: Literal["cancel"] = "cancel"
    job_ids: Annotated[list[Id], Field(max_length=100_000)]


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
