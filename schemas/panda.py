"""The PanDA pilot's wire format, as the pilot (``panda-pilot`` 3.7) and PanDA's job
dispatcher speak it: what ``/server/panda/<method>`` takes (form fields, some holding JSON
text) and answers (JSON with a ``StatusCode``).

Ids map one to one: PandaID = jobsetID = our job id, taskID = our task id, and an event
range is one event at one attempt, ``<taskID>-<PandaID>-<jobsetID>-<number>-<attempt>``
(PanDA's own shape), so an update names the attempt it speaks of and a stale one is known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from schemas.text import Text

# PanDA's status codes (pandaserver.jobdispatcher.Protocol)
SC_SUCCESS = 0
SC_NO_JOBS = 20
SC_FAILED = 30
SC_INVALID = 50  # invalid token
SC_PERMS = 70
SC_MISS_KEY = 80

INT64 = 2**63 - 1
INT32 = 2**31 - 1
_RANGE_ID = re.compile(r"^(\d{1,19})-(\d{1,19})-(\d{1,19})-(\d{1,19})-(\d{1,10})$")


class PandaError(ValueError):
    """A request the dispatcher refuses: answered with a PanDA status code and a reason,
    and nothing changed."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class RangeId:
    """One event at one attempt, as PanDA names an event range."""

    task_id: int
    job_id: int
    number: int
    attempt: int

    def __str__(self) -> str:
        return f"{self.task_id}-{self.job_id}-{self.job_id}-{self.number}-{self.attempt}"

    @classmethod
    def parse(cls, text: object) -> RangeId:
        m = _RANGE_ID.match(text) if isinstance(text, str) else None
        if m is None:
            shape = "<taskID>-<PandaID>-<jobsetID>-<event>-<attempt>"
            raise PandaError(SC_FAILED, f"eventRangeID {_show(text)}: not {shape}")
        task, job, jobset, number, attempt = (int(g) for g in m.groups())
        if job != jobset:
            raise PandaError(SC_FAILED, f"eventRangeID {text}: PandaID and jobsetID differ")
        if not (1 <= task <= INT64 and 1 <= job <= INT64 and number <= INT64 and 1 <= attempt <= INT32):
            raise PandaError(SC_FAILED, f"eventRangeID {text}: a number out of range")
        return cls(task, job, number, attempt)


def form_id(form: Mapping[str, str], key: str, *, required: bool = True) -> int | None:
    """An id field of a form: a positive integer, or a PanDA error naming it."""
    value = form.get(key)
    if value is None or value == "":
        if required:
            raise PandaError(SC_MISS_KEY, f"{key} is missing")
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 19 and 1 <= int(value) <= INT64):
        raise PandaError(SC_FAILED, f"{key} {_show(value)}: not a positive integer")
    return int(value)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class PandaRange(BaseModel):
    """An event range as getEventRanges hands it to the pilot."""

    eventRangeID: str
    startEvent: int
    lastEvent: int
    LFN: str
    GUID: str
    scope: str


# What a pilot reports of a range. 'running' and 'transferring' (its output on the way)
# keep it running; 'finished'; 'failed' (retried per the task's attempts); 'fatal' (no
# further attempt). PanDA's other names for an end are read as the nearest of these.
ReportStatus = Literal["running", "transferring", "finished", "failed", "fatal", "cancelled", "discarded"]


class RangeReport(BaseModel):
    """One item of updateEventRanges' ``eventRanges``."""

    model_config = ConfigDict(extra="ignore")  # pilots send more (objstoreID, pathConvention, ...)

    eventRangeID: str
    eventStatus: ReportStatus
    errorCode: Annotated[int, Field(ge=-INT32, le=INT32)] | None = None
    errorDiag: Text | None = None
    coreCount: Annotated[int, Field(ge=0, le=INT32)] | None = None
    cpuConsumptionTime: Annotated[float, Field(ge=0)] | None = None


class ZipReport(BaseModel):
    """Version 1 and 2: ranges reported with the file that holds their output."""

    model_config = ConfigDict(extra="ignore")

    eventRanges: list[RangeReport]
    zipFile: dict[str, Any] | None = None
    esOutput: dict[str, Any] | None = None


_V0 = TypeAdapter(list[RangeReport])
_V1 = TypeAdapter(list[ZipReport | RangeReport])

MAX_REPORTS = 100_000


def parse_reports(text: str | None, version: int) -> list[RangeReport]:
    """updateEventRanges' ``eventRanges`` (JSON text) as a flat list of reports."""
    if text is None or text == "":
        raise PandaError(SC_MISS_KEY, "eventRanges is missing")
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise PandaError(SC_FAILED, f"eventRanges is not JSON: {exc}") from None
    if not isinstance(raw, list):
        raise PandaError(SC_FAILED, "eventRanges is not a JSON list")
    try:
        if version == 0:
            reports = _V0.validate_python(raw)
        else:
            items = _V1.validate_python(raw)
            reports = [r for item in items for r in (item.eventRanges if isinstance(item, ZipReport) else [item])]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PandaError(SC_FAILED, f"eventRanges[{where}]: {first['msg']}") from None
    if len(reports) > MAX_REPORTS:
        raise PandaError(SC_FAILED, f"eventRanges: {len(reports)} reports, at most {MAX_REPORTS} at once")
    return reports


def answer(code: int = SC_SUCCESS, **fields: Any) -> dict[str, Any]:
    """A PanDA answer: ``StatusCode`` first, then the fields."""
    return {"StatusCode": code, **fields}


def refusal(error: PandaError) -> dict[str, Any]:
    return answer(error.code, errorDialog=error.reason)
