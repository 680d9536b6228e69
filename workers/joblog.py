"""A job's one log file, written by every worker of the job as its events are reported.

Each part (a job's set-up, an event with its output, a tear-down) is appended whole to
``<log dir>/workflow-<id>/job-<id>.log``, and the parts of a status batch are written
before the batch is sent (the reporter calls ``flush``): a worker killed with SIGKILL
loses nothing it had reported (it used to keep its part in a file of its own until the
job's tear-down, and a kill lost that part). Parts up to 64 KiB together are one
``write(2)`` to a file opened with O_APPEND, which the kernel never interleaves with
another writer's; more is written under an exclusive ``flock`` that every such writer
takes. (One write per event cost a worker a tenth of its time at ranges of one event.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# a part up to this size goes out in one write(2): atomic against other appenders
ONE_WRITE = 64 * 1024


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


class JobLogFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._parts: list[bytes] = []  # appended, not yet written

    def append(self, head: str, output: Path | None = None, tail: str = "") -> None:
        """``head``, the contents of ``output`` (then removed), ``tail``: as one part,
        written by the next ``flush``."""
        body = b""
        if output is not None:
            with contextlib.suppress(FileNotFoundError):
                body = output.read_bytes()
                output.unlink()
        self._parts.append(
            b"".join((head.encode(errors="backslashreplace"), body, tail.encode(errors="backslashreplace")))
        )

    def flush(self) -> None:
        """Write the parts appended so far, whole."""
        if self._parts:
            part, self._parts = b"".join(self._parts), []
            self._write(part)

    def _write(self, part: bytes) -> None:
        fd = self._fd
        if fd is None:
            return
        if len(part) <= ONE_WRITE:
            written = os.write(fd, part)
            if written == len(part):
                return
            part = part[written:]  # a short write (a full disk, a signal): finish it locked
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
