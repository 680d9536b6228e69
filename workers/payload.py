"""Running one payload: a command (argv, no shell unless asked) or an in-process callable.

The payload string is data. For a command, the template is split into argv first and
``{payload}`` is substituted inside the arguments, so no payload can reach a shell; with
``payloadShell: true`` the template runs under /bin/sh and the payload is shell-quoted.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import shlex
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from schemas.messages import PayloadSpec
from schemas.submission import PAYLOAD_PLACEHOLDER

ERROR_TAIL = 2000  # characters of output kept as an event's error


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


def command_argv(spec: PayloadSpec, payload: str) -> list[str]:
    assert spec.command is not None
    if spec.shell:
        return ["/bin/sh", "-c", spec.command.replace(PAYLOAD_PLACEHOLDER, shlex.quote(payload))]
    return [arg.replace(PAYLOAD_PLACEHOLDER, payload) for arg in shlex.split(spec.command)]


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
        if not spec.shell:
            command_argv(spec, "")  # a template shlex cannot split fails at set-up, not per event

    async def run(self, payload: str, output: str | Path, cwd: Path) -> Outcome:
        argv = command_argv(self.spec, payload)
        started = now()
        with _path(output).open("wb") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=cwd,
                    start_new_session=True,  # its own process group: a timeout kills all of it
                )
            except OSError as exc:
                return Outcome("failed", started, now(), None, f"cannot start {argv[0]!r}: {exc.strerror}")
            try:
                async with asyncio.timeout(self.spec.timeout):
                    code = await proc.wait()
            except (TimeoutError, asyncio.CancelledError) as exc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return Outcome("failed", started, now(), None, f"timed out after {self.spec.timeout:g} s")
        if code == 0:
            return Outcome("finished", started, now(), 0)
        reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        tail = _tail(output)
        return Outcome("failed", started, now(), code, f"{reason}: {tail}" if tail else reason)


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
            with _path(output).open("w") as out:
                out.write(traceback.format_exc())
            return Outcome("failed", started, now(), None, f"{type(exc).__name__}: {exc}"[:ERROR_TAIL])
        if result is None:
            return Outcome("finished", started, ended, 0, output=False)
        with _path(output).open("w") as out:
            out.write(f"{result}\n")
        return Outcome("finished", started, ended, 0)


def runner_for(spec: PayloadSpec) -> Runner:
    return FunctionRunner(spec) if spec.function else CommandRunner(spec)
