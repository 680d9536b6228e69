"""The BPS plugin (``dispatcher.bps``) with the real ``lsst-ctrl-bps``: a GenericWorkflow
as our submission; ``bps submit`` of a real QuantumGraph run by ``dispatcher start`` and a
``dispatcher worker`` (the real ``pipetask pre-exec-init-qbb`` / ``run-qbb`` and the final
``butler aggregate-graph``), its outputs in the Butler and ``bps report`` at 100 %; and
``bps submitcmd``, ``cancel``, ``status`` and ``restart``. Skipped without the extra
(``pip install -e '.[bps]'``; ``.ci/run`` installs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lsst.ctrl.bps", reason="the BPS extra is not installed (pip install -e '.[bps]')")

from lsst.ctrl.bps import GenericWorkflowFile
from lsst.ctrl.bps.tests.gw_test_utils import make_3_label_workflow

from dispatcher.bps import to_submission
from dispatcher.config import Settings
from dispatcher.store import Store
from schemas.submission import load_submission, plan
from tests.helpers import eventually
from tests.test_crashes import Processes

BIN = Path(sys.executable).parent
PREFIX = str(BIN.parent)  # where pip put pipetask and butler: EUPS's CTRL_MPEXEC_DIR and DAF_BUTLER_DIR


def test_a_generic_workflow_becomes_a_submission_of_labels_events_and_a_final_label(tmp_path: Path) -> None:
    gwf = make_3_label_workflow("gw", final=True)
    qgraph = GenericWorkflowFile("runQgraphFile", src_uri="/data/run.qg", wms_transfer=True, job_shared=True)
    gwf.add_file(qgraph)
    for name in gwf:
        job = gwf.get_job(name)
        job.arguments = "run-qbb {butlerConfig} <FILE:runQgraphFile> --qgraph-node-id {qgraphNodeId}"
        job.cmdvals = {"butlerConfig": "/repo", "qgraphNodeId": f"node-{name}"}
        job.environment = {"SCRATCH": "<ENV:HOME>/scratch", "QUOTE": 'a "b"'}
        job.number_of_retries = 4 if job.label == "label2" else None
        gwf.add_job_inputs(name, [qgraph])
    gwf.get_final().arguments = "<FILE:runQgraphFile> /repo"
    gwf.add_job_inputs(gwf.get_final().name, [qgraph])

    submission, mapping = to_submission(gwf)
    tasks = submission["pipetask"]
    assert list(tasks) == ["pipetaskInit", "label1", "label2", "label3", "finalJob"]
    assert {k: v.get("dependsOn", []) for k, v in tasks.items()} == {
        "pipetaskInit": [],
        "label1": ["pipetaskInit"],  # job edges become label edges (a barrier)
        "label2": ["label1"],
        "label3": ["label2"],
        "finalJob": ["pipetaskInit", "label1", "label2", "label3"],
    }
    assert tasks["finalJob"]["runAlways"] is True
    assert tasks["label2"]["numberOfRetries"] == 4
    # the jobs of a label, in BPS's order, are its events; each one's quanta is its payload
    assert mapping["label1"] == {str(i): f"node-{j.name}" for i, j in enumerate(gwf.get_jobs_by_label("label1"))}
    # constant values, files and ${X} resolved, the environment exported (only ${X} expands)
    assert tasks["label1"]["payloadCommand"] == (
        'export QUOTE="a \\"b\\""; export SCRATCH="${HOME}/scratch"; '
        "/usr/bin/uptime run-qbb /repo /data/run.qg --qgraph-node-id {payload}"
    )
    assert tasks["label1"]["payloadShell"] is True  # the payload reaches the shell as "$1", never as code
    assert tasks["finalJob"]["payloadCommand"].endswith("finalJob.bash /data/run.qg /repo")

    # and it is a submission the dispatcher takes
    (tmp_path / "dispatcher_mapping.json").write_text(json.dumps(mapping))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(submission))
    plans = {p.label: p for p in plan(load_submission(tmp_path / "wf.yaml")[0])}
    assert plans["finalJob"].run_always and not plans["label1"].run_always
    assert plans["label2"].max_attempts == 4 and plans["label1"].max_attempts == 3


# -- the real thing ---------------------------------------------------------------------------


def bps_env(procs: Processes) -> dict[str, str]:
    return procs.env | {
        "CTRL_MPEXEC_DIR": PREFIX,
        "DAF_BUTLER_DIR": PREFIX,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }


def bps(procs: Processes, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # PWD too: BPS's default submitPath is ${PWD}/submit/..., read from the environment,
    # and the inherited one (the checkout) filled it with every run's submit directory
    env = bps_env(procs) | {"BPS_WMS_SERVICE_CLASS": "dispatcher.bps.DispatcherService", "PWD": str(cwd)}
    out = subprocess.run([str(BIN / "bps"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def run_id(out: subprocess.CompletedProcess[str]) -> int:
    line = next(line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Run Id:"))
    return int(line.split(":", 1)[1])


async def ended(store: Store, wf: int, timeout: float = 120) -> str:
    async def check() -> str | None:
        status = await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf)
        return status if status not in (None, "running") else None

    status: str = await eventually(check, timeout=timeout, what=f"workflow {wf} to end")
    return status


def report_totals(out: subprocess.CompletedProcess[str]) -> dict[str, int]:
    lines = out.stdout.splitlines()
    header = next(line for line in lines if "SUCCEEDED" in line and "EXPECTED" in line).split()
    total = next(line for line in lines if line.startswith("TOTAL")).split()[1:]
    return dict(zip(header, map(int, total), strict=True))


@pytest.mark.slow
async def test_bps_submit_runs_a_quantum_graph_and_its_outputs_are_in_the_butler(
    settings: Settings, store: Store, procs: Processes, tmp_path: Path
) -> None:
    from lsst.pipe.base.tests.simpleQGraph import makeSimplePipeline, makeSimpleQGraph

    repo = tmp_path / "repo"
    makeSimpleQGraph(nQuanta=3, root=str(repo), run="test", inMemory=False, makeDatastoreRecords=True)
    makeSimplePipeline(3).write_to_uri(str(tmp_path / "pipeline.yaml"))
    config = {
        "wmsServiceClass": "dispatcher.bps.DispatcherService",  # the user's line
        "pipelineYaml": str(tmp_path / "pipeline.yaml"),
        "project": "dev",
        "campaign": "dispatcher-test",
        "computeSite": "local",
        "payload": {
            "payloadName": "simpleqg",
            "butlerConfig": str(repo),
            "inCollection": "test",
            "dataQuery": "instrument = 'INSTR'",
        },
        "finalJob": {"requestCpus": 1},  # aggregate-graph on 1 core, not 16
    }
    (tmp_path / "submit.yaml").write_text(yaml.safe_dump(config))
    procs.env = bps_env(procs)
    procs.start("start")
    procs.start("worker", "--slots", "2")
    wf = run_id(bps(procs, tmp_path, "submit", "submit.yaml"))
    assert await ended(store, wf) == "finished", procs.logs()
    labels = [r["label"] for r in await store.pool.fetch("SELECT label FROM tasks ORDER BY id")]
    assert labels == ["pipetaskInit", "task0", "task1", "task2", "finalJob"]
    # the quanta's outputs, registered by the final job
    found = subprocess.run(
        [str(BIN / "butler"), "query-datasets", str(repo), "--collections", "u/*/simpleqg/*"],
        capture_output=True,
        text=True,
        timeout=120,
        env=bps_env(procs),
    )
    assert found.returncode == 0, found.stderr
    for dataset in ("add_dataset1", "add_dataset2", "add_dataset3", "add2_dataset3"):
        assert dataset in found.stdout, found.stdout
    report = bps(procs, tmp_path, "report", "--id", str(wf))
    totals = report_totals(report)
    assert totals["SUCCEEDED"] == totals["EXPECTED"] == 5, report.stdout
    assert "dispatcher-test" in report.stdout or "simpleqg" in report.stdout  # BPS's run attributes
    assert "task1: requestMemory 2048, requestCpus 1" in report.stdout  # kept, and shown
    status = bps(procs, tmp_path, "status", "--id", str(wf), check=False)
    assert status.returncode == 0  # SUCCEEDED


def custom_job(tmp_path: Path, script: str, **extra: Any) -> Path:
    exe = tmp_path / "job.sh"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)
    config = {
        "wmsServiceClass": "dispatcher.bps.DispatcherService",
        "project": "dev",
        "campaign": "custom",
        "computeSite": "local",
        "customJob": {"executable": str(exe), "arguments": str(tmp_path / "marker")},
        **extra,
    }
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
async def test_bps_submitcmd_cancel_status_and_restart(
    settings: Settings, store: Store, procs: Processes, tmp_path: Path
) -> None:
    procs.env = bps_env(procs)
    procs.start("start")
    procs.start("worker", "--slots", "2")
    # a custom job that runs until cancelled
    long = tmp_path / "long"
    long.mkdir()
    wf = run_id(bps(procs, long, "submitcmd", str(custom_job(long, "sleep 120"))))
    await eventually(
        lambda: store.pool.fetchval("SELECT count(*) = 1 FROM events WHERE status = 'running'"),
        timeout=30,
        what="the custom job running",
    )
    assert bps(procs, long, "status", "--id", str(wf), check=False).returncode == 15  # RUNNING
    bps(procs, long, "cancel", "--id", str(wf))
    assert await ended(store, wf) == "cancelled"
    assert bps(procs, long, "status", "--id", str(wf), check=False).returncode == 16  # DELETED

    # a custom job that fails until its marker exists: out of attempts, then restarted
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    path = custom_job(flaky, 'test -e "$1"', numberOfRetries=1)
    wf = run_id(bps(procs, flaky, "submitcmd", str(path)))
    assert await ended(store, wf) == "failed"
    await eventually(
        lambda: store.pool.fetchval(
            "SELECT dead_at IS NOT NULL FROM events e JOIN jobs j ON j.id = e.job_id WHERE j.workflow_id = $1", wf
        ),
        what="its dead letter",
    )
    assert bps(procs, flaky, "status", "--id", str(wf), check=False).returncode == 19  # FAILED
    (flaky / "marker").write_text("fixed\n")
    restarted = bps(procs, flaky, "restart", "--id", str(wf))
    assert f"Run Id: {wf}" in restarted.stdout  # the same workflow, its failed events run again
    assert await ended(store, wf) == "finished"
    attempts = await store.pool.fetch(
        "SELECT a.status FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.workflow_id = $1 ORDER BY attempt", wf
    )
    assert [r["status"] for r in attempts] == ["failed", "finished"]
