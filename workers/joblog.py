"""A job's one log file, written by every worker of the job as its events are reported.

Each part (a job's set-up, an event with its output, a tear-down) is appended whole to
``<log dir>/workflow-<id>/job-<id>.log``, and the parts of a status batch are written
before the batch is sent (the reporter calls ``flush``): a worker killed with SIGKILL
loses nothing it had reported (it used to keep its part in a file of its own until the
job's tear-down, and a kill lost that part). Parts up to 64 KiB together are one
``write(2)`` to a file opened with O_APPEND, which the kernel never interleaves with
another writer's; more is written under an exclusive ``flock`` that every such writer
takes. (One write per event cost a worker a tenth of its time at ranges of one event.)
The parts' format, written here and read by the monitor and the tests, is
``schemas.joblog``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

# a part up to this size goes out in one write(2): atomic against other appenders
ONE_WRITE = 64 * 1024


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
