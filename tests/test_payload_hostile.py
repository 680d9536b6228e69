"""Hostile payloads and hostile conditions for workers/payload.py: shell injection through
quoted placeholders, text Postgres or UTF-8 refuses, payload processes outliving a killed
worker, and a paused worker mistaking a finished payload for a timed-out one. No services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.messages import PayloadSpec
from schemas.shell import shell_template
from schemas.text import unstorable
from workers.payload import WORKER_PID_ENV, CommandRunner, FunctionRunner, reap_orphans

ROOT = Path(__file__).resolve().parent.parent
MARK = "PWNED"  # the file an injection would create, relative to the payload's cwd

# quote-breaking, command substitution, separators, pipes, newline
INJECTIONS = [
    f"; touch {MARK}",
    f"$(touch {MARK})",
    f"`touch {MARK}`",
    f"' ; touch {MARK} ; '",
    f'" ; touch {MARK} ; "',
    f"| touch {MARK}",
    f"&& touch {MARK}",
    f"\n touch {MARK}",
    f"$((0)); touch {MARK}",
    f"'\"$(touch {MARK})\"'",
    f"x\\'; touch {MARK}; \\\"",
]

# (template, what printf receives around the payload); printf '[%s]' shows one argument
# per line, so a payload split into words would print several
TEMPLATES = [
    ("printf '[%s]\\n' {payload}", "{}"),
    ("printf '[%s]\\n' '{payload}'", "{}"),
    ("printf '[%s]\\n' \"{payload}\"", "{}"),
    ("printf '[%s]\\n' 'pre {payload} post'", "pre {} post"),
    ("printf '[%s]\\n' \"pre $HOME {payload} post\"", "pre {home} {} post"),
    ("printf '[%s]\\n' pre-{payload}-post", "pre-{}-post"),
    ("printf '[%s]\\n' {payload}'{payload}'\"{payload}\"", "{}{}{}"),
]


def cmd(command: str, *, shell: bool = False, timeout: float | None = None) -> PayloadSpec:
    return PayloadSpec(command=command, shell=shell, timeout=timeout)


def func(name: str) -> PayloadSpec:
    return PayloadSpec(function=f"tests.test_payload_hostile:{name}")


# -- 1. shell templates ----------------------------------------------------------------


@pytest.mark.parametrize(("template", "shape"), TEMPLATES, ids=[t for t, _ in TEMPLATES])
@pytest.mark.parametrize("payload", INJECTIONS)
async def test_injection_through_any_template_form_runs_as_data(
    tmp_path: Path, template: str, shape: str, payload: str
) -> None:
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd(template, shell=True)).run(payload, out, tmp_path)
    assert outcome.status == "finished", outcome.error
    assert not (tmp_path / MARK).exists(), "the payload ran as shell code"
    expected = shape.replace("{home}", os.environ.get("HOME", "")).replace("{}", payload)
    assert out.read_text() == f"[{expected}]\n"


@pytest.mark.parametrize(
    ("template", "script"),
    [
        ("echo {payload}", 'echo "$1"'),
        ("echo '{payload}'", "echo ''\"$1\"''"),
        ('echo "{payload}"', 'echo "$1"'),
        ("echo 'a {payload} b'", "echo 'a '\"$1\"' b'"),
        ('echo "a {payload} b"', 'echo "a $1 b"'),
        ("echo x{payload}y", 'echo x"$1"y'),
        # a backslash outside quotes escapes any character: \' opens nothing
        ("echo \\' {payload}", 'echo \\\' "$1"'),
        # inside double quotes \" does not close them; a lone backslash stays
        ('echo "a\\"b {payload} \\d"', 'echo "a\\"b $1 \\d"'),
        # no escapes inside single quotes: the backslash is literal, the quote closes
        ("echo 'a\\' {payload}", "echo 'a\\' \"$1\""),
        ('echo "it\'s {payload}"', 'echo "it\'s $1"'),
        # a comment: its quote counts for nothing, its placeholder is left alone
        ("echo {payload} # don't {payload}", 'echo "$1" # don\'t {payload}'),
        ("echo a#'{payload}'", "echo a#''\"$1\"''"),  # not a comment: '#' inside a word
        ("echo \\\\{payload}", 'echo \\\\"$1"'),  # an escaped backslash, then the placeholder
        ("printf %s {payload}\necho '{payload}'", "printf %s \"$1\"\necho ''\"$1\"''"),
    ],
)
def test_shell_template_quotes_each_placeholder_for_its_context(template: str, script: str) -> None:
    assert shell_template(template) == script


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("echo '{payload}", "unclosed single quote (opened at 5)"),
        ('echo "{payload}', "unclosed double quote (opened at 5)"),
        ("echo \"it's\" '{payload}", "unclosed single quote"),
        ("echo 'a\\'' {payload}", "unclosed single quote"),
        ('echo "a\\" {payload}', "unclosed double quote"),
        ("echo {payload} \\", "ends with a backslash"),
        ("echo \\{payload}", "right after a backslash"),
        ('echo "\\{payload}"', "right after a backslash"),
    ],
)
def test_shell_template_refuses_what_it_cannot_quote(template: str, message: str) -> None:
    with pytest.raises(ValueError, match="shell template") as raised:
        shell_template(template)
    assert message in str(raised.value)


def test_shell_template_errors_surface_at_set_up() -> None:
    with pytest.raises(ValueError, match="unclosed single quote"):
        CommandRunner(cmd("echo '{payload}", shell=True))


async def test_shell_payload_is_one_argument_even_when_the_template_uses_positional_parameters(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd('printf "[%s]" {payload} "$#"', shell=True)).run("a b", out, tmp_path)
    assert outcome.status == "finished", outcome.error
    assert out.read_text() == "[a b][1]"


# -- 2. text that Postgres or UTF-8 refuses ------------------------------------------------


def raise_nul(payload: str) -> None:
    raise ValueError("bad\x00byte")


def raise_surrogate(payload: str) -> None:
    raise ValueError("\udcff")


def return_surrogate(payload: str) -> str:
    return "ok \udcff"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def raise_unprintable(payload: str) -> None:
    raise UnprintableError()


def return_unprintable(payload: str) -> Unprintable:
    return Unprintable()


async def test_command_output_with_nul_makes_a_storable_error(tmp_path: Path) -> None:
    script = "import sys; sys.stdout.write('x\\0y'); sys.exit(3)"
    out = tmp_path / "out.log"
    outcome = await CommandRunner(cmd(f"{shlex.quote(sys.executable)} -c {shlex.quote(script)} {{payload}}")).run(
        "p", out, tmp_path
    )
    assert outcome.status == "failed"
    assert outcome.exit_code == 3
    assert outcome.error is not None
    assert unstorable(outcome.error) is None
    assert outcome.error == "exit code 3: x\ufffdy"
    assert out.read_bytes() == b"x\0y"  # the output file keeps what the payload wrote


async def test_function_error_with_nul_is_storable(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await FunctionRunner(func("raise_nul")).run("p", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.error == "ValueError: bad\ufffdbyte"
    assert "Traceback" in out.read_text()


async def test_function_error_with_lone_surrogate_is_recorded_not_fatal(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await FunctionRunner(func("raise_surrogate")).run("p", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.error == "ValueError: \ufffd"
    text = out.read_text()
    assert text.startswith("Traceback")
    assert "ValueError: \\udcff" in text  # escaped, not lost


async def test_function_result_with_lone_surrogate_is_written_escaped(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await FunctionRunner(func("return_surrogate")).run("p", out, tmp_path)
    assert outcome.status == "finished"
    assert out.read_text() == "ok \\udcff\n"


async def test_function_unprintable_exception_and_result_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    outcome = await FunctionRunner(func("raise_unprintable")).run("p", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.error == "UnprintableError: <str() failed>"
    outcome = await FunctionRunner(func("return_unprintable")).run("p", out, tmp_path)
    assert outcome.status == "failed"
    assert outcome.error == "result cannot be printed: RuntimeError: no str for you"


async def test_payload_that_cannot_be_an_argument_fails_the_event_only(tmp_path: Path) -> None:
    outcome = await CommandRunner(cmd("echo {payload}")).run("a\x00b", tmp_path / "out.log", tmp_path)
    assert outcome.status == "failed"
    assert outcome.error is not None
    assert unstorable(outcome.error) is None
    assert "cannot start 'echo'" in outcome.error


# -- 3. payloads do not outlive their worker -----------------------------------------------

# a worker stand-in: runs one payload whose shell leaves two children, then waits forever
STAND_IN = """
import asyncio, shlex, sys
from pathlib import Path
import workers.payload as payload
from schemas.messages import PayloadSpec

work, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "prctl":  # the fallback when setpriv is missing
    payload.shutil.which = lambda name: None
script = "sleep 60 & echo $! > a.pid; sleep 60 & echo $! > b.pid; echo $$ > sh.pid; wait"
spec = PayloadSpec(command="sh -c " + shlex.quote(script) + " {payload}")
asyncio.run(payload.CommandRunner(spec).run("p", work / "out.log", work))
"""

# a worker stand-in whose payload exits 0 well within its timeout. It says "started" only
# after 0.1 s: by then the stand-in has armed the timer (a pause before that would only
# delay the whole run)
PAUSED = """
import asyncio, json, sys
from pathlib import Path
from workers.payload import CommandRunner
from schemas.messages import PayloadSpec

work = Path(sys.argv[1])
spec = PayloadSpec(command="sh -c 'sleep 0.1; echo x > started; sleep 0.2' {payload}", timeout=0.5)
outcome = asyncio.run(CommandRunner(spec).run("p", work / "out.log", work))
print(json.dumps({"status": outcome.status, "exit_code": outcome.exit_code, "error": outcome.error}))
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_for(path: Path, within: float = 20.0) -> str:
    deadline = time.monotonic() + within
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was never written")
        time.sleep(0.005)
    return path.read_text().strip()


@contextlib.contextmanager
def _stand_in(script: str, work: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(work), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@pytest.mark.parametrize("mode", ["setpriv", "prctl"])
def test_payloads_die_with_their_worker(tmp_path: Path, mode: str) -> None:
    pids: list[int] = []
    try:
        with _stand_in(STAND_IN, tmp_path, mode) as worker:
            for name in ("sh", "a", "b"):
                pids.append(int(_wait_for(tmp_path / f"{name}.pid")))
            sh, a, b = pids
            environ = Path(f"/proc/{a}/environ").read_bytes().split(b"\0")
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        assert _gone(sh), f"the payload's leader {sh} outlived its worker (no PDEATHSIG)"
        # the leader's children are orphans now: PDEATHSIG does not reach them
        assert _alive(a) and _alive(b)
        assert f"{WORKER_PID_ENV}={worker.pid}".encode() in environ
        assert reap_orphans() >= 2
        assert _gone(a) and _gone(b), "reap_orphans left the payload's children running"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_reap_orphans_spares_payloads_of_a_live_worker(tmp_path: Path) -> None:
    pids: list[int] = []
    try:
        with _stand_in(STAND_IN, tmp_path, "setpriv"):
            for name in ("sh", "a", "b"):
                pids.append(int(_wait_for(tmp_path / f"{name}.pid")))
            reap_orphans()
            assert all(_alive(pid) for pid in pids)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- 4. a paused worker: an exit already collected wins over the timer -----------------------


def test_paused_worker_records_the_payload_exit_not_a_timeout(tmp_path: Path) -> None:
    with _stand_in(PAUSED, tmp_path) as worker:
        _wait_for(tmp_path / "started")
        worker.send_signal(signal.SIGSTOP)  # longer than the timeout: the payload ends meanwhile
        time.sleep(1.5)
        worker.send_signal(signal.SIGCONT)
        stdout, _ = worker.communicate(timeout=20)
    assert json.loads(stdout) == {"status": "finished", "exit_code": 0, "error": None}


async def _appears(path: Path, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{path} never appeared")


async def test_blocked_loop_records_the_payload_exit_not_a_timeout(tmp_path: Path) -> None:
    runner = CommandRunner(cmd("sh -c 'echo > started; sleep 0.2; exit 4' {payload}", timeout=0.5))
    task = asyncio.create_task(runner.run("p", tmp_path / "out.log", tmp_path))
    await _appears(tmp_path / "started")
    # the loop is stuck past the deadline (as in a paused worker); the payload exits meanwhile
    time.sleep(1.0)  # noqa: ASYNC251
    outcome = await task
    assert (outcome.status, outcome.exit_code, outcome.error) == ("failed", 4, "exit code 4")


async def test_timeout_still_kills_a_payload_that_runs_on(tmp_path: Path) -> None:
    runner = CommandRunner(cmd("sh -c 'echo > started; sleep 5' {payload}", timeout=0.3))
    task = asyncio.create_task(runner.run("p", tmp_path / "out.log", tmp_path))
    await _appears(tmp_path / "started")
    time.sleep(0.5)  # noqa: ASYNC251 - the timer is due when the loop runs again, and the payload runs on
    outcome = await task
    assert (outcome.status, outcome.exit_code) == ("failed", None)
    assert outcome.error == "timed out after 0.3 s"
