"""The job log's format: the header and footer lines of its parts (an event's run, a
job's set-up or tear-down), written by the workers (``workers.joblog``) and read back by
the monitor's job timeline and the tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime


def event_header(number: int, attempt: int, payload: str, worker: str) -> str:
    # payloads were refused at submit unless storable: only their length is bounded here
    return f"=== event {number} attempt {attempt} payload {payload[:500]!r} worker {worker}\n"


def event_footer(number: int, status: str, exit_code: int | None, took: float, error: str | None) -> str:
    first = error.splitlines()[0][:200] if error and error.splitlines() else None  # errors are storable
    return f"=== event {number} {status} exit_code={exit_code} duration={took:.3f}s" + (
        f" error={first!r}\n" if first else "\n"
    )


def command_header(what: str, command: str, worker: str, started: datetime) -> str:
    """A job's set-up or tear-down: when and where it ran (what EventService amortizes)."""
    return f"=== job {what}: {command[:500]} worker {worker} at {started.isoformat()}\n"


def command_footer(what: str, status: str, exit_code: int | None, ended: datetime, took: float) -> str:
    return f"=== job {what} {status} exit_code={exit_code} at {ended.isoformat()} duration={took:.3f}s\n"


@dataclass(frozen=True)
class JobCommand:
    """A set-up or tear-down as a job log records it (``job_commands`` reads them back)."""

    what: str  # set-up or tear-down (the log upload)
    worker: str
    start: float
    end: float


_COMMAND_HEAD = re.compile(r"=== job (set-up|tear-down): .* worker (\S+) at (\S+)$")
_COMMAND_FOOT = re.compile(r"=== job (set-up|tear-down) \w+ exit_code=\S+ at (\S+) ")


def job_commands(log: str) -> list[JobCommand]:
    """The set-ups and tear-downs a job log records, with their worker and times."""
    found = []
    opened: tuple[str, str, float] | None = None
    for line in log.splitlines():
        if m := _COMMAND_HEAD.match(line):
            opened = (m[1], m[2], datetime.fromisoformat(m[3]).timestamp())
        elif (m := _COMMAND_FOOT.match(line)) and opened:
            found.append(JobCommand(opened[0], opened[1], opened[2], datetime.fromisoformat(m[2]).timestamp()))
            opened = None
    return found


_EVENT_HEAD = re.compile(r"^=== event (\d+) attempt (\d+) payload ", re.MULTILINE)


def event_runs(log: str) -> list[tuple[int, int]]:
    """Each run of an event a job log records, as (event number, attempt), in order: an
    event run twice appears twice."""
    return [(int(m[1]), int(m[2])) for m in _EVENT_HEAD.finditer(log)]
