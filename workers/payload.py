"""Running one payload: a command (argv, no shell unless asked) or an in-process callable.

The payload string is data. For a command, the template is split into argv first and
``{payload}`` is substituted inside the arguments, so no payload can reach a shell; with
``payloadShell: true`` the template runs under /bin/sh and the payload is passed as ``$1``
(see schemas/shell.py), never pasted into the script.

A payload command lives no longer than its worker: its process group leader gets SIGKILL
when the worker dies (PR_SET_PDEATHSIG), and what the leader started carries
``DISPATCHER_WORKER_PID`` in its environment, so that the next worker on the host kills
it (``reap_orphans``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import importlib
import inspect
import os
import shlex
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from schemas.messages import PayloadSpec
from schemas.shell import shell_template
from schemas.submission import PAYLOAD_PLACEHOLDER
from schemas.text import storable

ERROR_TAIL = 2000  # characters of output kept as an event's error

# in every payload's environment: the worker that started it (pid, and its start time in
# clock ticks since boot, as /proc/<pid>/stat gives it: a pid can be reused)
WORKER_PID_ENV = "DISPATCHER_WORKER_PID"
WORKER_START_ENV = "DISPATCHER_WORKER_START"
PR_SET_PDEATHSIG = 1
SETPRIV_FAILED = "setpriv: failed to execute "


@dataclass(frozen=True)
class Outcome:
    status: Literal["finished", "failed"]
    started_at: datetime
    ended_at: datetime
    exit_code: int | None = None
    error: str | None = None
    output: bool = True  # the payload wrote to its output file


class Runner(Protocol):
    # True when ``run`` never suspends (a plain function): it needs no task of its own
    inline: bool

    async def run(self, payload: str, output: str | Path, cwd: Path) -> Outcome: ...


def now() -> datetime:
    return datetime.now(UTC)


class CommandTemplate:
    """A payload command's template, parsed once (a bad one fails at set-up, not per
    event): split into argv, or, with ``shell``, a script that takes the payload as $1."""

    def __init__(self, spec: PayloadSpec) -> None:
        assert spec.command is not None
        self.shell = spec.shell
        self._script = shell_template(spec.command) if spec.shell else ""
        self._args = [] if spec.shell else shlex.split(spec.command)

    def argv(self, payload: str) -> list[str]:
        if self.shell:
            # $1, not the payload, goes into the script: no payload can be read as shell code
            return ["/bin/sh", "-c", self._script, "sh", payload]
        return [arg.replace(PAYLOAD_PLACEHOLDER, payload) for arg in self._args]


def command_argv(spec: PayloadSpec, payload: str) -> list[str]:
    """The argv a payload runs as (without the PDEATHSIG wrapper CommandRunner adds)."""
    return CommandTemplate(spec).argv(payload)


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first, start time at index 19), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rpartition(b")")[2].decode().split()  # the command name may hold spaces


@functools.cache
def _worker_env(pid: int) -> dict[str, str]:
    """Keyed by pid: a forked copy of a worker is a worker of its own."""
    fields = _stat_fields(pid)
    env = {**os.environ, WORKER_PID_ENV: str(pid)}
    if fields is not None:
        env[WORKER_START_ENV] = fields[19]
    return env


_prctl: Any = None


def _die_with_parent(parent: int) -> None:  # pragma: no cover - runs in the forked child
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the worker died before the prctl: nobody will send the signal
        os._exit(137)


def _pdeathsig() -> tuple[tuple[str, ...], Callable[[], None] | None]:
    """How payloads get PR_SET_PDEATHSIG: an argv prefix, or a preexec_fn (naming this
    process as the parent: made per runner, a forked copy of a worker has another pid)."""
    prefix = _setpriv()
    if prefix is None:
        return (), functools.partial(_die_with_parent, os.getpid())
    return prefix, None


@functools.cache
def _setpriv() -> tuple[str, ...] | None:
    """The argv prefix that sets PR_SET_PDEATHSIG, or None when a preexec_fn must.

    setpriv(1) when it has --pdeathsig (util-linux 2.33+): one more exec, 1 to 1.5 ms a
    spawn. A preexec_fn makes subprocess fork instead of vfork, which copies the worker's
    page tables: 7 ms a spawn more for a worker (46 MB resident). Tested once, here."""
    if not sys.platform.startswith("linux"):
        return ()  # no PDEATHSIG there
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        prefix = (setpriv, "--pdeathsig", "KILL", "--")
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
    global _prctl
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return None


def _running(pid: int) -> bool:
    """True if the child has not exited. WNOWAIT: only a look, the status stays for
    asyncio's child watcher to collect."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False  # the watcher has collected it already: its callback is on its way


def _alive_worker(pid: int, start: bytes | None) -> bool:
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start is None or fields[19].encode() == start


def reap_orphans() -> int:
    """SIGKILL the process groups of payload processes whose worker is gone; how many
    such processes there were. For a worker to call once when it starts: a payload's
    leader dies with its worker (PDEATHSIG), but what the leader started lives on.

    Scans /proc/*/environ (the ones we may read: our own user's) for
    DISPATCHER_WORKER_PID naming a pid that is not running, or runs a process started
    at another time than DISPATCHER_WORKER_START (the pid was reused)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    me, my_group = os.getpid(), os.getpgrp()
    key, start_key = f"{WORKER_PID_ENV}=".encode(), f"{WORKER_START_ENV}=".encode()
    groups: set[int] = set()
    alone: list[int] = []
    found = 0
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if key not in environ:
            continue
        worker, start = None, None
        for item in environ.split(b"\0"):
            if item.startswith(key):
                worker = item[len(key) :]
            elif item.startswith(start_key):
                start = item[len(start_key) :]
        if worker is None or not worker.isdigit() or _alive_worker(int(worker), start):
            continue
        try:
            group = os.getpgid(int(name))
        except ProcessLookupError:
            continue
        found += 1
        # never our own group (a worker started from a payload), nor init's
        if group in (my_group, 0, 1):
            alone.append(int(name))
        else:
            groups.add(group)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for pid in alone:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return found


def _path(output: str | Path) -> Path:
    return output if isinstance(output, Path) else Path(output)


def _tail(path: str | Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - ERROR_TAIL))
        return f.read().decode(errors="replace").strip()


class CommandRunner:
    inline = False

    def __init__(self, spec: PayloadSpec) -> None:
        self.spec = spec
        self._template = CommandTemplate(spec)
        prefix, self._preexec = _pdeathsig()
        self._prefix = list(prefix)
        self._env = _worker_env(os.getpid())

    def _argv(self, payload: str) -> list[str]:
        return self._prefix + self._template.argv(payload)

    async def run(self, payload: str, output: str | Path, cwd: Path) -> Outcome:
        argv = self._argv(payload)
        started = now()
        with _path(output).open("wb") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=cwd,
                    env=self._env,
                    start_new_session=True,  # its own process group: a timeout kills all of it
                    preexec_fn=self._preexec,
                )
            except (OSError, ValueError) as exc:  # ValueError: a NUL or unencodable text in argv
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                return self._cannot_start(argv, started, reason)
            try:
                async with asyncio.timeout(self.spec.timeout):
                    code = await proc.wait()
            except asyncio.CancelledError:
                await _kill(proc)
                raise
            except TimeoutError:
                if proc.returncode is None and _running(proc.pid):
                    await _kill(proc)
                    return Outcome("failed", started, now(), None, f"timed out after {self.spec.timeout:g} s")
                # it exited before the timer was served (the worker was paused, e.g. SIGSTOP):
                # the exit status wins
                code = await proc.wait()
        if code == 0:
            return Outcome("finished", started, now(), 0)
        tail = _tail(output)
        if self._prefix and code in (126, 127) and tail.startswith(SETPRIV_FAILED):
            # setpriv could not exec the command: said as an OSError from a direct exec is
            return self._cannot_start(argv, started, tail.rpartition(": ")[2])
        reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        # the output is the payload's: it may hold NUL (Postgres refuses it in text)
        return Outcome("failed", started, now(), code, storable(f"{reason}: {tail}") if tail else reason)

    def _cannot_start(self, argv: list[str], started: datetime, reason: str | None) -> Outcome:
        return Outcome("failed", started, now(), None, storable(f"cannot start {argv[len(self._prefix)]!r}: {reason}"))


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


def load_function(path: str) -> Callable[[str], Any]:
    module_name, _, name = path.partition(":")
    func = getattr(importlib.import_module(module_name), name)
    if not callable(func):
        raise TypeError(f"{path} is not callable")
    return func  # type: ignore[no-any-return]


class FunctionRunner:
    """Calls ``module:function(payload)`` in the worker's process: for cheap payloads."""

    def __init__(self, spec: PayloadSpec) -> None:
        assert spec.function is not None
        self.spec = spec
        self.func = load_function(spec.function)
        self.inline = not inspect.iscoroutinefunction(self.func)

    async def run(self, payload: str, output: str | Path, cwd: Path) -> Outcome:
        started = now()
        try:
            if self.inline:
                result = self.func(payload)
                # a plain callable may still return an awaitable (None, the usual result,
                # skips the check: 1.6 µs an event)
                if result is not None and inspect.isawaitable(result):
                    async with asyncio.timeout(self.spec.timeout):
                        result = await result
                ended = now()
            else:
                # asyncio.timeout, not wait_for: no task of its own, so the payload starts
                # and its end is seen a loop turn sooner. Its times are taken inside the
                # timeout: they are the payload's own (the benchmark counts the rest as
                # dispatch overhead)
                async with asyncio.timeout(self.spec.timeout):
                    started = now()
                    result = await self.func(payload)
                    ended = now()
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return Outcome("failed", started, now(), None, f"timed out after {self.spec.timeout:g} s")
        except Exception as exc:  # a payload's failure is data: record it, never crash
            _write(output, traceback.format_exc())
            return Outcome("failed", started, now(), None, _describe(exc))
        if result is None:
            return Outcome("finished", started, ended, 0, output=False)
        try:
            text = f"{result}\n"
        except Exception as exc:  # its __str__ is the payload's code too
            _write(output, traceback.format_exc())
            return Outcome("failed", started, now(), None, "result cannot be printed: " + _describe(exc))
        _write(output, text)
        return Outcome("finished", started, ended, 0)


def _write(output: str | Path, text: str) -> None:
    # a payload's text may hold lone surrogates, which UTF-8 cannot encode
    with _path(output).open("w", encoding="utf-8", errors="backslashreplace") as out:
        out.write(text)


def _describe(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:
        text = f"{type(exc).__name__}: <str() failed>"
    return storable(text[:ERROR_TAIL], None)


def runner_for(spec: PayloadSpec) -> Runner:
    return FunctionRunner(spec) if spec.function else CommandRunner(spec)
