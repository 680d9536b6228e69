"""The BPS keys mean what ctrl_bps_panda means by them: one table of configurations, read by
our ``plan`` and, when ``lsst-ctrl-bps-panda`` is installed, by ctrl_bps_panda's own
``add_idds_work`` on a GenericWorkflow of the same labels (skipped otherwise, with the
reason). Where ctrl_bps_panda crashes we keep a friendlier reading, and the table says so.

The labels: ``label1`` (requestWalltime 60 s), ``label2`` (600 s, numberOfRetries 4) and
``label3`` (no walltime). Per label, the table gives (EventService, payloads per job,
attempts, a full job's walltime in seconds or None).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest

from schemas.submission import Submission, plan

LABELS: dict[str, dict[str, Any]] = {
    "label1": {"requestWalltime": 60},
    "label2": {"requestWalltime": 600, "numberOfRetries": 4},
    "label3": {},
}
Sizing = tuple[bool, int, int, float | None]
OFF1, OFF2, OFF3 = (False, 1, 3, 60), (False, 1, 4, 600), (False, 1, 3, None)


@dataclass(frozen=True)
class Row:
    config: dict[str, Any]
    ours: dict[str, Sizing]
    panda: dict[str, Sizing] | None = field(default=None)  # where it differs: our extension
    panda_crashes: bool = False


ROWS: dict[str, Row] = {
    "defaults": Row({}, {"label1": OFF1, "label2": OFF2, "label3": OFF3}),
    # numberOfRetries is the total number of attempts, 3 when 0 or unset
    "numberOfRetries-0": Row({"numberOfRetries": 0}, {"label1": OFF1, "label2": OFF2, "label3": OFF3}),
    "numberOfRetries-5": Row(
        {"numberOfRetries": 5}, {"label1": (False, 1, 5, 60), "label2": OFF2, "label3": (False, 1, 5, None)}
    ),
    "numberOfRetries-1": Row(
        {"numberOfRetries": 1}, {"label1": (False, 1, 1, 60), "label2": OFF2, "label3": (False, 1, 1, None)}
    ),
    # a label's own cap; maxPayloadsPerPandaJob (10) otherwise; walltime x payloads
    "caps": Row(
        {"enableEventService": "label1,label2:3"},
        {"label1": (True, 10, 3, 600), "label2": (True, 3, 4, 1800), "label3": OFF3},
    ),
    # one payload a job is still EventService: "below 2 turns it off" needs both walltimes
    "maxPayloadsPerPandaJob-1": Row(
        {"enableEventService": "label1", "maxPayloadsPerPandaJob": 1},
        {"label1": (True, 1, 3, 60), "label2": OFF2, "label3": OFF3},
    ),
    "label-cap-1": Row(
        {"enableEventService": "label2:1"}, {"label1": OFF1, "label2": (True, 1, 4, 600), "label3": OFF3}
    ),
    # both walltimes: int(maxWmsJobWalltime / requestWalltime), and below 2 EventService is off
    "both-walltimes": Row(
        {"enableEventService": "label1,label2", "maxWmsJobWalltime": 1000},
        {"label1": (True, 16, 3, 960), "label2": OFF2, "label3": OFF3},
    ),
    # only maxWmsJobWalltime: the job gets all of it
    "only-maxWmsJobWalltime": Row(
        {"enableEventService": "label3", "maxWmsJobWalltime": 7200},
        {"label1": OFF1, "label2": OFF2, "label3": (True, 10, 3, 7200)},
    ),
    # a string is a list of labels: "True" names a label that is not there
    "enableEventService-True-string": Row(
        {"enableEventService": "True"}, {"label1": OFF1, "label2": OFF2, "label3": OFF3}
    ),
    # ours: maxEventsPerJob (no released ctrl_bps_panda reads it) caps a job like maxPayloadsPerPandaJob
    "maxEventsPerJob": Row(
        {"enableEventService": "label1", "maxEventsPerJob": 20},
        {"label1": (True, 20, 3, 1200), "label2": OFF2, "label3": OFF3},
        panda={"label1": (True, 10, 3, 600), "label2": OFF2, "label3": OFF3},
    ),
    # ours: a YAML boolean or list, on which ctrl_bps_panda crashes
    "enableEventService-true-bool": Row(
        {"enableEventService": True},
        {"label1": (True, 10, 3, 600), "label2": (True, 10, 4, 6000), "label3": (True, 10, 3, None)},
        panda_crashes=True,
    ),
    "enableEventService-list": Row(
        {"enableEventService": ["label1", "label3:5"]},
        {"label1": (True, 10, 3, 600), "label2": OFF2, "label3": (True, 5, 3, None)},
        panda_crashes=True,
    ),
}


def submission(config: dict[str, Any]) -> Submission:
    pipetask = {label: {"payloadCommand": "echo {payload}", **cfg} for label, cfg in LABELS.items()}
    return Submission.model_validate({"mapping": "m.json", **config, "pipetask": pipetask})


@pytest.mark.parametrize("name", list(ROWS))
def test_our_plan_reads_the_bps_keys(name: str) -> None:
    row = ROWS[name]
    got = {}
    for p in plan(submission(row.config)):
        walltime = p.job_walltime if p.job_walltime is not None else p.request_walltime
        if p.event_service and p.job_walltime is None and p.request_walltime is not None:
            walltime = p.request_walltime * p.max_payloads_per_job  # a full job's
        got[p.label] = (p.event_service, p.max_payloads_per_job, p.max_attempts, walltime)
    assert got == row.ours


def _panda_sizing(config: dict[str, Any], tmp: str) -> dict[str, Sizing]:
    """ctrl_bps_panda's own reading: add_idds_work on a GenericWorkflow of our labels, each
    job given its label's walltime and retries as BPS's transform would."""
    from idds.workflowv2.workflow import Workflow
    from lsst.ctrl.bps import (
        BPS_DEFAULTS,
        BPS_SEARCH_ORDER,
        BpsConfig,
        GenericWorkflow,
        GenericWorkflowExec,
        GenericWorkflowFile,
        GenericWorkflowJob,
    )
    from lsst.ctrl.bps.panda.utils import add_idds_work

    gwf = GenericWorkflow("keys")
    qgraph = GenericWorkflowFile("runQgraphFile", src_uri=f"{tmp}/x.qg", wms_transfer=True, job_shared=True)
    gwf.add_file(qgraph)
    for label, cfg in LABELS.items():
        for i in range(3):
            job = GenericWorkflowJob(f"{label}_{i}", label=label)
            job.executable = GenericWorkflowExec("pipetask", "pipetask", False)
            job.arguments = "run-qbb <FILE:runQgraphFile> --qgraph-node-id {qgraphNodeId}"
            job.cmdvals = {"qgraphNodeId": f"{label}-{i}"}
            job.request_walltime = cfg.get("requestWalltime")
            job.number_of_retries = cfg.get("numberOfRetries", config.get("numberOfRetries"))
            gwf.add_job(job)
            gwf.add_job_inputs(job.name, [qgraph])
    bps = BpsConfig(
        {
            "submitPath": tmp,
            "computeSite": "SITE",
            "runnerCommand": "decode _cmd_line_",
            "fileDistributionEndPoint": f"file://{tmp}/",
            **config,
        },
        search_order=BPS_SEARCH_ORDER,
        defaults=BPS_DEFAULTS,
        wms_service_class_fqn="lsst.ctrl.bps.panda.PanDAService",
    )
    workflow = Workflow(name=gwf.name)
    add_idds_work(bps, gwf, workflow)
    sizing: dict[str, Sizing] = {}
    for work in workflow.get_all_works():
        label = next(lb for lb in LABELS if lb in work.task_name)
        es = bool(work.es)
        walltime = None if not es and LABELS[label].get("requestWalltime") is None else work.maxWalltime
        sizing[label] = (es, work.max_events_per_job if es else 1, work.maxAttempt, walltime)
    return sizing


@pytest.mark.parametrize("name", list(ROWS))
def test_ctrl_bps_panda_reads_them_the_same(name: str, tmp_path: Any) -> None:
    os.environ.setdefault("PANDA_BEHIND_REAL_LB", "1")  # pandaclient looks a host up at import otherwise
    pytest.importorskip("lsst.ctrl.bps.panda", reason="lsst-ctrl-bps-panda is not installed")
    row = ROWS[name]
    if row.panda_crashes:
        with pytest.raises(Exception):  # noqa: B017 (whatever it raises: it cannot read it)
            _panda_sizing(row.config, str(tmp_path))
        return
    assert _panda_sizing(row.config, str(tmp_path)) == (row.panda or row.ours)
