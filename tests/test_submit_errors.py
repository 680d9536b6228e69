"""Acceptance tests of ``dispatcher submit`` on bad input, through the real CLI.

Every bad submission must exit 2, name its problem on stderr in one message (no traceback)
and write nothing: the workflow is accepted whole or not at all. A positive control submits
the same base workflow unchanged, so that no negative test can pass vacuously.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

BIN = Path(sys.executable).parent
TABLES = ("workflows", "tasks", "task_deps", "jobs", "events")
CLI_TIMEOUT = 60.0

# A small valid 3-label workflow: pipeinit -> isr (EventService) -> final.
BASE_WORKFLOW: dict[str, Any] = {
    "name": "errors-base",
    "enableEventService": "isr",
    "maxPayloadsPerPandaJob": 2,
    "numberOfRetries": 1,
    "mapping": "mapping.json",
    "pipetask": {
        "pipeinit": {"payloadCommand": "echo init {payload}"},
        "isr": {"dependsOn": ["pipeinit"], "requestWalltime": 60, "payloadCommand": "echo isr {payload}"},
        "final": {"dependsOn": ["isr"], "payloadCommand": "echo final {payload}"},
    },
}
BASE_MAPPING: dict[str, dict[str, str]] = {
    "pipeinit": {"0": "init_0"},
    "isr": {str(i): f"isr_{i}" for i in range(5)},
    "final": {"0": "final_0"},
}
N_EVENTS = sum(len(v) for v in BASE_MAPPING.values())


@dataclass
class Case:
    """A mutation of the base submission and the substrings its error message must contain."""

    workflow: Callable[[dict[str, Any]], None] | None = None  # edits the workflow dict in place
    workflow_text: str | bytes | None = None  # replaces the YAML file's content
    mapping: Callable[[dict[str, Any]], None] | None = None  # edits the mapping dict in place
    mapping_text: str | None = None  # replaces the JSON file's text
    no_mapping_file: bool = False
    submit_path: str | None = None  # submit this path (relative to tmp_path) instead
    expect: tuple[str, ...] = ()


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return edit


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return edit


_VALID_MAPPING_TEXT = json.dumps(BASE_MAPPING, indent=1)

CASES: dict[str, Case] = {
    "unknown-label-in-dependsOn": Case(
        workflow=_set("pipetask", "final", "dependsOn", value=["isr", "nosuchlabel"]),
        expect=("nosuchlabel", "unknown label"),
    ),
    "unknown-label-in-dependsOn-string": Case(
        workflow=_set("pipetask", "final", "dependsOn", value="isr, ghost"),
        expect=("ghost",),
    ),
    "dependency-cycle": Case(
        workflow=_set("pipetask", "pipeinit", "dependsOn", value=["isr"]),
        expect=("cycle", "pipeinit", "isr"),
    ),
    "self-dependency": Case(
        workflow=_set("pipetask", "final", "dependsOn", value=["final"]),
        expect=("cycle", "final"),
    ),
    "mapping-key-not-integer": Case(
        mapping=_set("isr", "x1", value="isr_x1"),
        expect=("x1", "isr"),
    ),
    "mapping-key-negative": Case(
        mapping=_set("isr", "-1", value="isr_m1"),
        expect=("'-1'",),
    ),
    "label-without-mapping-entry": Case(
        mapping=_drop("final"),
        expect=("no mapping entries", "final"),
    ),
    "label-with-empty-mapping": Case(
        mapping=_set("final", value={}),
        expect=("no mapping entries", "final"),
    ),
    "negative-requestWalltime": Case(
        workflow=_set("pipetask", "isr", "requestWalltime", value=-600),
        expect=("requestWalltime", "isr"),
    ),
    "zero-requestWalltime": Case(
        workflow=_set("pipetask", "isr", "requestWalltime", value=0),
        expect=("requestWalltime", "isr"),
    ),
    "zero-global-requestWalltime": Case(
        workflow=_set("requestWalltime", value=0),
        expect=("requestWalltime",),
    ),
    "zero-maxWmsJobWalltime": Case(
        workflow=_set("maxWmsJobWalltime", value=0),
        expect=("maxWmsJobWalltime",),
    ),
    "negative-maxWmsJobWalltime": Case(
        workflow=_set("maxWmsJobWalltime", value=-1),
        expect=("maxWmsJobWalltime",),
    ),
    "payloadCommand-without-placeholder": Case(
        workflow=_set("pipetask", "final", "payloadCommand", value="echo final"),
        expect=("{payload}", "final"),
    ),
    "invalid-yaml": Case(
        workflow_text="name: broken\npipetask: {isr: [payloadCommand, {payload}\n",
        expect=("invalid YAML",),
    ),
    "yaml-top-level-not-a-mapping": Case(
        workflow_text="- just\n- a list\n",
        expect=("top level",),
    ),
    "missing-mapping-file": Case(
        no_mapping_file=True,
        expect=("mapping file not found", "mapping.json"),
    ),
    "malformed-json-mapping": Case(
        mapping_text=_VALID_MAPPING_TEXT[: len(_VALID_MAPPING_TEXT) // 2],
        expect=("malformed JSON", "mapping.json"),
    ),
    "payload-not-a-string": Case(
        mapping=_set("isr", "3", value=3),
        expect=("must be a string", "isr"),
    ),
    "payload-is-an-object": Case(
        mapping=_set("isr", "3", value={"a": 1}),
        expect=("must be a string", "isr"),
    ),
    "duplicate-event-number": Case(
        mapping_text=(
            '{"pipeinit": {"0": "init_0"},\n'
            ' "isr": {"0": "isr_0", "1": "isr_1", "1": "isr_1_again"},\n'
            ' "final": {"0": "final_0"}}\n'
        ),
        expect=("repeats an event number", "isr"),
    ),
    "nonexistent-submission-file": Case(
        submit_path="no-such-workflow.yaml",
        expect=("submission file not found", "no-such-workflow.yaml"),
    ),
    # -- found by review, fixed since -----------------------------------------------------------
    "enableEventService-cap-not-integer": Case(
        workflow=_set("enableEventService", value="isr:abc"),
        expect=("enableEventService", "abc"),
    ),
    "event-number-beyond-bigint": Case(
        mapping=_set("isr", "99999999999999999999", value="isr_huge"),
        expect=("99999999999999999999",),
    ),
    "payload-with-nul-character": Case(
        mapping=_set("isr", "3", value="isr_\u0000_3"),
        expect=("isr",),
    ),
    "submission-not-utf8": Case(
        workflow_text=b"name: caf\xe9\npipetask: {}\n",
        expect=("workflow.yaml",),
    ),
    "payloadCommand-shlex-cannot-split": Case(
        workflow=_set("pipetask", "final", "payloadCommand", value='echo "{payload}'),
        expect=("payloadCommand", "final"),
    ),
}


def _params() -> list[Any]:
    return [pytest.param(case, id=name) for name, case in CASES.items()]


def write_case(tmp_path: Path, case: Case) -> Path:
    workflow = copy.deepcopy(BASE_WORKFLOW)
    if case.workflow:
        case.workflow(workflow)
    wf_file = tmp_path / "workflow.yaml"
    text = case.workflow_text if case.workflow_text is not None else yaml.safe_dump(workflow)
    wf_file.write_bytes(text if isinstance(text, bytes) else text.encode())
    if not case.no_mapping_file:
        mapping = copy.deepcopy(BASE_MAPPING)
        if case.mapping:
            case.mapping(mapping)
        text = case.mapping_text if case.mapping_text is not None else json.dumps(mapping, indent=1)
        (tmp_path / "mapping.json").write_text(text)
    return tmp_path / case.submit_path if case.submit_path else wf_file


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


async def run_submit(path: Path, dsn: str, cwd: Path) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        "submit",
        str(path),
        "--database-url",
        dsn,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=cwd,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def row_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}
    finally:
        await conn.close()


async def test_valid_base_submission_is_accepted(database: str, tmp_path: Path) -> None:
    """Positive control: the unmodified base exits 0, prints the id and writes every row."""
    path = write_case(tmp_path, Case())
    res = await run_submit(path, database, tmp_path)
    assert res.code == 0, res.stderr
    assert "Traceback" not in res.stderr
    workflow_id = int(res.stdout.strip())
    counts = await row_counts(database)
    assert counts["workflows"] == 1
    assert counts["tasks"] == 3
    assert counts["task_deps"] == 2
    assert counts["events"] == N_EVENTS
    # isr: 5 events in jobs of at most 2 -> 3 jobs; pipeinit and final: 1 job each
    assert counts["jobs"] == 5
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT id FROM workflows") == workflow_id
    finally:
        await conn.close()


@pytest.mark.parametrize("case", _params())
async def test_bad_submission_is_rejected_whole(case: Case, database: str, tmp_path: Path) -> None:
    path = write_case(tmp_path, case)
    res = await run_submit(path, database, tmp_path)
    assert res.code == 2, f"exit {res.code}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    assert "error:" in res.stderr
    for text in case.expect:
        assert text in res.stderr, f"{text!r} not in stderr:\n{res.stderr}"
    assert res.stdout.strip() == "", "a rejected submission must not print a workflow id"
    assert await row_counts(database) == dict.fromkeys(TABLES, 0)


async def test_mapping_option_naming_missing_file_is_rejected(database: str, tmp_path: Path) -> None:
    """--mapping overrides 'mapping:'; a path that does not exist is a bad input, not a crash."""
    path = write_case(tmp_path, Case())
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "dispatcher"),
        "submit",
        str(path),
        "--mapping",
        str(tmp_path / "elsewhere.json"),
        "--database-url",
        database,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    assert proc.returncode == 2, err.decode()
    assert "elsewhere.json" in err.decode()
    assert "Traceback" not in err.decode()
    assert out.decode().strip() == ""
    assert await row_counts(database) == dict.fromkeys(TABLES, 0)
