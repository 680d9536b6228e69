"""Hostile submissions: each must be refused (exit 2, one message naming the field, file or
label), within seconds and a bounded amount of memory, and write nothing.

One table: a case writes its files into a directory and names the file to submit. Cases
that could hang or exhaust memory run the real CLI as a subprocess under an address-space
limit, with a timeout, and their peak RSS is measured; the rest call ``submit`` in-process
against the same database, which is what the CLI does after parsing its arguments.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.submission import SubmissionError
from tests.test_submit_errors import BASE_MAPPING, BASE_WORKFLOW, TABLES, row_counts

CLI_TIMEOUT = 10.0  # a refusal takes about a second; a hang is what this catches
ADDRESS_SPACE = 1 << 30  # RLIMIT_AS of the CLI: 1 GiB
MAX_RSS_KIB = 300 * 1024  # peak resident memory a refusal may use


# -- writing the files of a case ------------------------------------------------------------


def _workflow(d: Path, edit: Callable[[dict[str, Any]], None] | None = None, text: str | bytes | None = None) -> Path:
    """Write workflow.yaml (the base, edited, or ``text``) and the base mapping.json."""
    data = copy.deepcopy(BASE_WORKFLOW)
    if edit is not None:
        edit(data)
    body = text if text is not None else yaml.safe_dump(data)
    path = d / "workflow.yaml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass"))
    if not (d / "mapping.json").exists():
        (d / "mapping.json").write_text(json.dumps(BASE_MAPPING))
    return path


def _set(*keys: str, value: Any) -> Callable[[Path], Path]:
    def edit(data: dict[str, Any]) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return lambda d: _workflow(d, edit)


def _with_yaml(extra: str) -> Callable[[Path], Path]:
    """The base workflow with raw YAML text appended at the top level."""
    return lambda d: _workflow(d, text=yaml.safe_dump(BASE_WORKFLOW) + extra)


def _mapping(body: bytes) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        (d / "mapping.json").write_bytes(body)
        return _workflow(d)

    return write


def _includes(*names: str, prepare: Callable[[Path], None] | None = None) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        if prepare is not None:
            prepare(d)
        return _workflow(d, lambda data: data.update(includeConfigs=list(names)))

    return write


_LOL = "[" + ", ".join(["lol"] * 9) + "]"
_BOMB_DEFS = "".join(
    f"  l{i}: &l{i} " + ("[" + ", ".join([f"*l{i - 1}"] * 9) + "]" if i else _LOL) + "\n" for i in range(9)
)


def _alias_bomb(where: str) -> Callable[[Path], Path]:
    """Billion laughs: 9 levels of 9 aliases, 9**9 strings once expanded."""
    if where == "extra":  # anchors only, in a key the dispatcher keeps but does not read
        return _with_yaml("x-defs:\n" + _BOMB_DEFS)
    return lambda d: _workflow(
        d,
        text=(
            "x-defs:\n" + _BOMB_DEFS + "name: bomb\nmapping: mapping.json\nenableEventService: isr\n"
            "pipetask:\n  isr:\n    payloadCommand: 'echo {payload}'\n    dependsOn: *l8\n"
        ),
    )


def _fan_out(d: Path) -> Path:
    """Each file includes the next one 8 times: 8**6 loads of a tree without a loop."""
    for level in range(6):
        (d / f"inc{level}.yaml").write_text(yaml.safe_dump({"includeConfigs": [f"inc{level + 1}.yaml"] * 8}))
    (d / "inc6.yaml").write_text("maxPayloadsPerPandaJob: 3\n")
    return _workflow(d, lambda data: data.update(includeConfigs="inc0.yaml"))


def _chain(d: Path) -> Path:
    """1,500 labels, each depending on the previous one, the first on the last: a cycle."""
    n = 1500
    tasks = {f"t{i}": {"payloadCommand": "echo {payload}", "dependsOn": f"t{(i - 1) % n}"} for i in range(n)}
    (d / "mapping.json").write_text(json.dumps({label: {"0": "p"} for label in tasks}))
    return _workflow(d, lambda data: data.update(pipetask=tasks))


def _labels_with_mapping(d: Path, labels: dict[str, Any]) -> Path:
    return _workflow(d, lambda data: data.update(pipetask=labels, enableEventService=False))


@dataclass(frozen=True)
class Case:
    write: Callable[[Path], Path]  # writes the files into a directory, returns the one to submit
    expect: tuple[str, ...]  # substrings of the error message
    cli: bool = False  # run the real CLI: memory, hangs, recursion


CASES: dict[str, Case] = {
    # -- YAML: memory, time, recursion ----------------------------------------------------------
    "yaml-alias-bomb-in-unused-key": Case(_alias_bomb("extra"), ("workflow.yaml", "alias"), cli=True),
    "yaml-alias-bomb-in-dependsOn": Case(_alias_bomb("dependsOn"), ("workflow.yaml", "alias"), cli=True),
    "yaml-self-referencing-alias": Case(_with_yaml("x-loop: &loop [*loop]\n"), ("workflow.yaml", "loop")),
    "yaml-lists-5000-deep": Case(
        _with_yaml("x-deep: " + "[" * 5000 + "]" * 5000 + "\n"), ("workflow.yaml", "nest"), cli=True
    ),  # libyaml stops at 1000 levels
    "yaml-mappings-100-deep": Case(
        _with_yaml("x-deep: " + "{a: " * 100 + "1" + "}" * 100 + "\n"), ("workflow.yaml", "nested deeper than")
    ),
    "yaml-file-too-large": Case(
        _with_yaml("x-big: '" + "x" * (2 << 20) + "'\n"), ("workflow.yaml", "larger"), cli=True
    ),
    "yaml-integer-of-5000-digits": Case(_with_yaml("x-n: " + "7" * 5000 + "\n"), ("x-n", "digits"), cli=True),
    "yaml-invalid-date": Case(_with_yaml("x-when: 2024-13-45\n"), ("x-when", "2024-13-45")),
    "yaml-binary-value": Case(_with_yaml("x-bin: !!binary /w==\n"), ("x-bin", "bytes")),
    # -- includeConfigs ----------------------------------------------------------------------
    "include-dev-zero": Case(_includes("/dev/zero"), ("/dev/zero", "not a regular file"), cli=True),
    "include-fifo": Case(
        _includes("fifo.yaml", prepare=lambda d: os.mkfifo(d / "fifo.yaml")),
        ("fifo.yaml", "not a regular file"),
        cli=True,
    ),
    "include-directory": Case(_includes("sub", prepare=lambda d: (d / "sub").mkdir()), ("sub", "not a regular file")),
    "include-fan-out": Case(_fan_out, ("includeConfigs", "files"), cli=True),
    "submit-dev-zero": Case(lambda d: Path("/dev/zero"), ("/dev/zero", "not a regular file"), cli=True),
    # -- mapping file ------------------------------------------------------------------------
    "mapping-payload-100000-deep": Case(
        _mapping(b'{"isr": {"0": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"), ("isr", "must be a string"), cli=True
    ),
    "mapping-unknown-label-100000-deep": Case(
        _mapping(b'{"other": {"0": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"), ("other", "must be a string"), cli=True
    ),
    "mapping-is-a-fifo": Case(
        lambda d: (_workflow(d), (d / "mapping.json").unlink(), os.mkfifo(d / "mapping.json"))[0],
        ("mapping.json", "not a regular file"),
        cli=True,
    ),
    "mapping-is-a-directory": Case(
        lambda d: (_workflow(d), (d / "mapping.json").unlink(), (d / "mapping.json").mkdir())[0],
        ("mapping.json", "not a regular file"),
    ),
    "mapping-event-number-with-newline": Case(
        _mapping(json.dumps({**BASE_MAPPING, "isr": {"1\n": "x"}}).encode()), ("isr", "'1\\n'")
    ),
    "mapping-event-number-of-5000-digits": Case(
        _mapping(json.dumps({**BASE_MAPPING, "isr": {"9" * 5000: "x"}}).encode()), ("isr", "event number"), cli=True
    ),
    "mapping-payload-lone-high-surrogate": Case(
        _mapping(b'{"pipeinit": {"0": "a"}, "isr": {"0": "x\\ud800y"}, "final": {"0": "b"}}'), ("isr", "surrogate")
    ),
    "mapping-payload-lone-low-surrogate": Case(
        _mapping(b'{"pipeinit": {"0": "a"}, "isr": {"7": "x\\udc00"}, "final": {"0": "b"}}'), ("isr", "7", "surrogate")
    ),
    "mapping-payload-not-utf8": Case(
        _mapping(b'{"pipeinit": {"0": "a"}, "isr": {"0": "caf\xe9"}, "final": {"0": "b"}}'), ("mapping.json", "UTF-8")
    ),
    "mapping-label-with-nul": Case(_mapping(b'{"is\\u0000r": {"0": "a"}}'), ("mapping.json", "NUL")),
    # -- dependencies --------------------------------------------------------------------------
    "dependency-chain-of-1500-labels": Case(_chain, ("dependency cycle", "t0"), cli=True),
    # -- integers beyond their Postgres columns, booleans for integers -----------------------
    "numberOfRetries-1e30": Case(_with_yaml("numberOfRetries: 1.0e+30\n"), ("numberOfRetries",)),
    "numberOfRetries-beyond-int4": Case(_set("numberOfRetries", value=2**31), ("numberOfRetries",)),
    "label-numberOfRetries-beyond-int4": Case(
        _set("pipetask", "isr", "numberOfRetries", value=2**40), ("pipetask.isr.numberOfRetries",)
    ),
    "maxPayloadsPerPandaJob-10**12": Case(_set("maxPayloadsPerPandaJob", value=10**12), ("maxPayloadsPerPandaJob",)),
    "maxEventsPerJob-beyond-int4": Case(_set("maxEventsPerJob", value=2**31), ("maxEventsPerJob",)),
    "eventsPerRange-beyond-int4": Case(_set("eventsPerRange", value=2**31), ("eventsPerRange",)),
    "label-eventsPerRange-beyond-int4": Case(
        _set("pipetask", "isr", "eventsPerRange", value=2**31), ("pipetask.isr.eventsPerRange",)
    ),
    "eventsPerRange-true": Case(_set("eventsPerRange", value=True), ("eventsPerRange",)),
    "maxPayloadsPerPandaJob-true": Case(_set("maxPayloadsPerPandaJob", value=True), ("maxPayloadsPerPandaJob",)),
    "enableEventService-cap-beyond-int4": Case(
        _set("enableEventService", value="isr:4294967296"), ("enableEventService",)
    ),
    "enableEventService-cap-of-5000-digits": Case(
        _set("enableEventService", value="isr:" + "9" * 5000), ("enableEventService", "isr")
    ),
    # -- non-finite and unbounded numbers ------------------------------------------------------
    "retryDelay-inf": Case(_with_yaml("retryDelay: .inf\n"), ("retryDelay",)),
    "retryDelay-nan": Case(_with_yaml("retryDelay: .nan\n"), ("retryDelay",)),
    "retryDelay-beyond-a-day": Case(_set("retryDelay", value=86401), ("retryDelay",)),
    "label-retryDelay-inf": Case(
        _set("pipetask", "isr", "retryDelay", value=float("inf")), ("pipetask.isr.retryDelay",)
    ),
    "requestWalltime-inf": Case(_set("pipetask", "isr", "requestWalltime", value=float("inf")), ("requestWalltime",)),
    "maxWmsJobWalltime-nan": Case(_with_yaml("maxWmsJobWalltime: .nan\n"), ("maxWmsJobWalltime",)),
    "maxWmsJobWalltime-beyond-30-days": Case(_set("maxWmsJobWalltime", value=1e12), ("maxWmsJobWalltime",)),
    "payloadTimeout-inf": Case(_set("pipetask", "final", "payloadTimeout", value=float("inf")), ("payloadTimeout",)),
    "retryDelay-true": Case(_set("retryDelay", value=True), ("retryDelay",)),
    "unused-key-inf": Case(_with_yaml("x-limit: -.inf\n"), ("x-limit", "finite")),
    # -- NUL and lone surrogates ----------------------------------------------------------------
    "name-with-nul": Case(_set("name", value="wf\x00"), ("name", "NUL")),
    "label-with-nul": Case(
        lambda d: _labels_with_mapping(d, {"is\x00r": {"payloadCommand": "echo {payload}"}}), ("pipetask", "NUL")
    ),
    "payloadCommand-with-nul": Case(
        _set("pipetask", "isr", "payloadCommand", value="echo \x00 {payload}"), ("pipetask.isr.payloadCommand", "NUL")
    ),
    "dependsOn-with-nul": Case(_set("pipetask", "final", "dependsOn", value="isr,\x00"), ("dependsOn", "NUL")),
    "yaml-lone-surrogate-escape": Case(
        _with_yaml('x-setup: "a\\ud800"\n'),
        ("workflow.yaml",),  # libyaml refuses the escape itself
    ),
    "includeConfigs-with-nul": Case(_set("includeConfigs", value="a\x00.yaml"), ("includeConfigs", "NUL")),
}


def _params(cli: bool) -> list[Any]:
    return [pytest.param(name, case, id=name) for name, case in CASES.items() if case.cli == cli]


def _no_rows(counts: dict[str, int]) -> None:
    assert counts == dict.fromkeys(TABLES, 0)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_kib: int
    timed_out: bool


def _limit_memory() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_cli(path: Path, dsn: str, cwd: Path) -> Run:
    """``dispatcher submit PATH``, killed after CLI_TIMEOUT; its own rusage from wait4."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_DATABASE_URL"] = dsn
    out_path, err_path = cwd / "cli.stdout", cwd / "cli.stderr"
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "submit", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            env=env,
            preexec_fn=_limit_memory,
        )
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(CLI_TIMEOUT, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Run(
        code=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        seconds=time.monotonic() - started,
        max_rss_kib=usage.ru_maxrss,
        timed_out=killed.is_set(),
    )


@pytest.mark.parametrize(("name", "case"), _params(cli=True))
async def test_hostile_submission_is_refused_by_the_cli(name: str, case: Case, database: str, tmp_path: Path) -> None:
    import asyncio

    path = case.write(tmp_path)
    res = await asyncio.to_thread(run_cli, path, database, tmp_path)
    assert not res.timed_out, f"{name}: still running after {CLI_TIMEOUT} s"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.code == 2, f"exit {res.code}\nstdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-3000:]}"
    assert "error: " in res.stderr, res.stderr[-3000:]
    for text in case.expect:
        assert text in res.stderr, f"{text!r} not in stderr:\n{res.stderr[-3000:]}"
    assert len(res.stderr) < 4000, "one message, not a dump of the input"
    assert res.stdout.strip() == ""
    assert res.max_rss_kib < MAX_RSS_KIB, f"peak RSS {res.max_rss_kib // 1024} MiB"
    _no_rows(await row_counts(database))


@pytest.mark.parametrize(("name", "case"), _params(cli=False))
async def test_hostile_submission_is_refused(
    name: str, case: Case, store: Store, database: str, tmp_path: Path
) -> None:
    path = case.write(tmp_path)
    with pytest.raises(SubmissionError) as info:
        await submit(store, path)
    message = str(info.value)
    for text in case.expect:
        assert text in message, f"{text!r} not in: {message}"
    assert len(message) < 4000, "one message, not a dump of the input"
    _no_rows(await row_counts(database))


@pytest.mark.parametrize("buf_size", [1, 2, 5, 7, 11, 13, 64])
def test_escapes_cut_by_any_read_are_read_right(buf_size: int) -> None:
    """The check of lone surrogates reads the file in chunks: a surrogate pair, an escaped
    backslash before "ud800", or a lone surrogate cut at any point must come out right."""
    import io

    import ijson

    from schemas.mapping import _CheckedReader

    good = ["a\\ud83d\\ude00b", "\\\\ud800", "x\\\\\\ud83d\\ude00", '\\u00e9\\n\\"', "plain"]
    body = ('{"isr": {' + ", ".join(f'"{i}": "{p}"' for i, p in enumerate(good)) + "}}").encode()
    reader = _CheckedReader(io.BytesIO(body))
    strings = [v for e, v in ijson.basic_parse(reader, buf_size=buf_size) if e == "string"]
    assert strings == list(json.loads(body)["isr"].values())
    assert reader.lone_surrogates == 0
    for bad in (b'"x\\ud800"', b'"x\\udc00y"', b'"\\\\\\ud800"', b'"\\ud800\\ud800"'):
        reader = _CheckedReader(io.BytesIO(b'{"a": {"0": ' + bad + b"}}"))
        strings = [v for e, v in ijson.basic_parse(reader, buf_size=buf_size) if e == "string"]
        assert reader.lone_surrogates >= 1 and "\uffff" in strings[0], bad
