"""Unit tests of workers/payload.py: argv building, CommandRunner and FunctionRunner. No services."""

from __future__ import annotations

import asyncio
import selectors
import shlex
import time
from pathlib import Path

import pytest

from schemas.messages import PayloadSpec
from workers.payload import (
    ERROR_TAIL,
    CommandRunner,
    FunctionRunner,
    command_argv,
    load_function,
    runner_for,
)

HOSTILE = "x; touch PWNED"
HOSTILE_PAYLOADS = [
    HOSTILE,
    "$(touch PWNED)",
    "`touch PWNED`",
    "it's'; touch PWNED; echo '",
    'a" && touch PWNED && echo "b',
]

# -- helper payload functions, referenced as "tests.test_payload:<name>" -------------------

NOT_CALLABLE = 42
CALLS: list[str] = []


def sync_upper(payload: str) -> str:
    CALLS.append(payload)
    return payload.upper()


def sync_none(payload: str) -> None:
    CALLS.append(payload)


async def async_reverse(payload: str) -> str:
    await asyncio.sleep(0.01)
    return payload[::-1]


async def async_slow(payload: str) -> str:
    await asyncio.sleep(5)
    return payload


def sync_raises(payload: str) -> str:
    raise ValueError(f"bad payload {payload}")


async def async_raises(payload: str) -> str:
    await asyncio.sleep(0)
    raise KeyError(payload)


# -- helpers ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (PID 1 of a container may not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


async def _gone(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not _alive(pid)


def _pid_in(path: Path) -> int | None:
    text = path.read_text().strip() if path.exists() else ""
    return int(text) if text else None


async def _read_pid(path: Path, within: float = 3.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pid = _pid_in(path)
        if pid is not None:
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} was never written")


def cmd(command: str, *, shell: bool = False, timeout: float | None = None) -> PayloadSpec:
    return PayloadSpec(command=command, shell=shell, timeout=timeout)


def func(name: str, *, timeout: float | None = None) -> PayloadSpec:
    return PayloadSpec(function=f"tests.test_payload:{name}", timeout=timeout)


# -- command_argv --------------------------------------------------------------------------


def test_command_argv_splits_template_before_substituting() -> None:
    argv = command_argv(cmd("echo --in={payload} 'two words' {payload}"), HOSTILE)
    assert argv == ["echo", f"--in={HOSTILE}", "two words", HOSTILE]


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS)
def test_command_argv_keeps_payload_one_literal_argument(payload: str) -> None:
    argv = command_argv(cmd("prog {payload}"), payload)
    assert argv == ["prog", payload]


def test_command_argv_payload_with_placeholder_text_is_not_resubstituted() -> None:
    argv = command_argv(cmd("prog {payload}"), "{payload} {payload}")
    assert argv == ["prog", "{payload} {payload}"]


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS)
def test_command_argv_shell_passes_payload_as_an_argument(payload: str) -> None:
    argv = command_argv(cmd("echo start {payload} end", shell=True), payload)
    # the script names $1; the payload itself is never part of what /bin/sh parses
    assert argv == ["/bin/sh", "-c", 'echo start "$1" end', "sh", payload]


def test_command_runner_rejects_unsplittable_template_at_setup() -> None:
    with pytest.raises(ValueError):
        CommandRunner(cmd('echo "{payload}'))


# -- CommandRunner: injection ------------------------------------------------------------


@pytest.mark.parametrize("shell", [False, True], ids=["argv", "shell"])
@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS)
async def test_hostile_payload_runs_as_data(tmp_path: Path, payload: str, shell: bool) -> None:
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd("echo {payload}", shell=shell)).run(payload, out, tmp_path)
    assert outcome.status == "finished", outcome.error
    assert not (tmp_path / "PWNED").exists()
    assert out.read_text() == payload + "\n"


async def test_shell_mode_really_uses_a_shell(tmp_path: Path) -> None:
    """The control for the test above: the template (not the payload) may use shell syntax."""
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd("echo {payload} && touch MADE", shell=True)).run(HOSTILE, out, tmp_path)
    assert outcome.status == "finished", outcome.error
    assert (tmp_path / "MADE").exists()
    assert not (tmp_path / "PWNED").exists()


# -- CommandRunner: outcomes ---------------------------------------------------------------


async def test_command_success(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd("sh -c 'echo hello \"$0\"; echo to-stderr >&2' {payload}")).run(
        "world", out, tmp_path
    )
    assert outcome.status == "finished"
    assert outcome.exit_code == 0
    assert outcome.error is None
    assert outcome.started_at <= outcome.ended_at
    assert out.read_text().splitlines() == ["hello world", "to-stderr"]


async def test_command_runs_in_cwd(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd("touch {payload}")).run("here.txt", out, work)
    assert outcome.status == "finished"
    assert (work / "here.txt").exists()


async def test_command_nonzero_exit(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd("sh -c 'echo some output; echo \"oops $0\" >&2; exit 3' {payload}")).run(
        "p1", out, tmp_path
    )
    assert outcome.status == "failed"
    assert outcome.exit_code == 3
    assert outcome.error is not None
    assert "exit code 3" in outcome.error
    assert "some output" in outcome.error
    assert "oops p1" in outcome.error
    assert "oops p1" in out.read_text()


async def test_command_error_keeps_only_the_output_tail(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    script = "import sys; print('HEAD' + 'a' * 5000); print('THE END'); sys.exit(1)"
    outcome = await CommandRunner(cmd(f"python3 -c {shlex.quote(script)} {{payload}}")).run("p", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.exit_code == 1
    assert outcome.error is not None
    assert outcome.error.startswith("exit code 1: ")
    assert outcome.error.endswith("THE END")
    assert "HEAD" not in outcome.error
    assert len(outcome.error) <= ERROR_TAIL + len("exit code 1: ")
    assert "HEAD" in out.read_text()  # the whole output stays in the file


async def test_command_killed_by_signal(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd("sh -c 'kill -9 $$' {payload}")).run("p", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.exit_code == -9
    assert outcome.error is not None
    assert "killed by signal 9" in outcome.error


async def test_command_timeout_kills_the_process_group(tmp_path: Path) -> None:
    # the shell starts a background grandchild: both must die, not only the direct child
    script = "sleep 5 & echo $! > child.pid; echo $$ > sh.pid; wait"
    spec = cmd(f"sh -c {shlex.quote(script)} {{payload}}", timeout=0.5)
    out = tmp_path / "out.log"
    t0 = time.monotonic()
    outcome = await CommandRunner(spec).run("p", out, tmp_path)
    elapsed = time.monotonic() - t0
    assert outcome.status == "failed"
    assert outcome.exit_code is None
    assert outcome.error is not None
    assert "timed out" in outcome.error
    assert elapsed < 3.0
    sh_pid = await _read_pid(tmp_path / "sh.pid")
    child_pid = await _read_pid(tmp_path / "child.pid")
    assert await _gone(sh_pid), f"shell {sh_pid} still alive"
    assert await _gone(child_pid), f"grandchild {child_pid} still alive: the process group was not killed"


async def test_command_cancelled_kills_the_process_group(tmp_path: Path) -> None:
    script = "sleep 5 & echo $! > child.pid; wait"
    runner = CommandRunner(cmd(f"sh -c {shlex.quote(script)} {{payload}}"))
    task = asyncio.create_task(runner.run("p", tmp_path / "out.log", tmp_path))
    child_pid = await _read_pid(tmp_path / "child.pid")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _gone(child_pid), f"grandchild {child_pid} still alive after cancellation"


async def test_command_missing_executable(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd("no-such-binary-xyz {payload}")).run("p", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.exit_code is None
    assert outcome.error is not None
    assert "no-such-binary-xyz" in outcome.error


# -- FunctionRunner ----------------------------------------------------------------------


async def test_function_sync(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    CALLS.clear()
    outcome = await FunctionRunner(func("sync_upper")).run("abc", out, tmp_path)
    assert outcome.status == "finished"
    assert outcome.exit_code == 0
    assert outcome.error is None
    assert CALLS == ["abc"]
    assert out.read_text() == "ABC\n"


async def test_function_sync_returning_none(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    CALLS.clear()
    outcome = await FunctionRunner(func("sync_none")).run("abc", out, tmp_path)
    assert outcome.status == "finished"
    assert CALLS == ["abc"]
    assert not out.exists() or out.read_text() == ""


async def test_function_async(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await FunctionRunner(func("async_reverse")).run("abc", out, tmp_path)
    assert outcome.status == "finished"
    assert outcome.exit_code == 0
    assert out.read_text() == "cba\n"


@pytest.mark.parametrize(
    ("name", "expect"),
    [("sync_raises", "ValueError: bad payload p7"), ("async_raises", "KeyError: 'p7'")],
)
async def test_function_raising(tmp_path: Path, name: str, expect: str) -> None:
    out = tmp_path / "out.log"
    outcome = await FunctionRunner(func(name)).run("p7", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.exit_code is None
    assert outcome.error == expect
    text = out.read_text()
    assert text.startswith("Traceback")
    assert name in text


async def test_function_async_timeout(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    t0 = time.monotonic()
    outcome = await FunctionRunner(func("async_slow", timeout=0.2)).run("p", out, tmp_path)
    assert time.monotonic() - t0 < 3.0
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert "timed out" in outcome.error


@pytest.mark.parametrize(
    ("path", "exc"),
    [
        ("tests.no_such_module_xyz:f", ModuleNotFoundError),
        ("tests.test_payload:no_such_function", AttributeError),
        ("tests.test_payload:NOT_CALLABLE", TypeError),
    ],
)
def test_load_function_errors(path: str, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        load_function(path)
    with pytest.raises(exc):
        FunctionRunner(PayloadSpec(function=path))


def test_load_function_finds_the_callable() -> None:
    assert load_function("tests.test_payload:sync_upper") is sync_upper


def test_runner_for_picks_the_kind() -> None:
    assert isinstance(runner_for(func("sync_upper")), FunctionRunner)
    assert isinstance(runner_for(cmd("echo {payload}")), CommandRunner)


def test_a_worker_runs_on_a_loop_whose_timers_take_microseconds() -> None:
    # epoll takes whole milliseconds (a 50 ms sleep woke 0.5 ms late on average); the
    # benchmark measures the difference, this checks the wiring
    from dispatcher.cli import run_async

    seen: list[type] = []

    async def probe() -> int:
        seen.append(type(asyncio.get_running_loop()._selector))  # type: ignore[attr-defined]
        return 0

    with pytest.raises(SystemExit) as exited:
        run_async(probe(), precise_timers=True)
    assert exited.value.code == 0 and seen == [selectors.SelectSelector]
    with pytest.raises(SystemExit):
        run_async(probe())
    assert seen[1] is not selectors.SelectSelector
