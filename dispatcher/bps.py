"""BPS's WMS plugin: ``bps submit`` with ``wmsServiceClass: dispatcher.bps.DispatcherService``
runs a workflow on the dispatcher, and ``bps report``, ``status``, ``cancel``, ``restart``
and ``ping`` speak of it. Needs the extra ``es-dispatcher[bps]`` (``lsst-ctrl-bps``);
nothing else in the project imports ``lsst``.

A BPS GenericWorkflow becomes one of our submissions, written into BPS's submit directory
(``dispatcher_submission.yaml`` and its mapping file):
- a label is a task; its jobs, in ``get_jobs_by_label`` order, are its events 0..n-1
  (PanDA's order-id map numbers them the same way);
- the command value that varies between a label's jobs (``qgraphNodeId``) is the event's
  payload; the constant ones, ``<FILE:…>`` and ``<ENV:X>`` (as ``${X}``) are resolved into
  the label's ``payloadCommand``, which runs under ``/bin/sh`` with the payload as ``"$1"``
  (never as shell code); a job's ``environment`` is exported before it;
- job-to-job edges become label-to-label ones: a label starts once every label its jobs
  depend on has finished (a barrier: no pipelining across labels, and a failed event holds
  back all of the downstream labels; docs/bps.md);
- the final job is a label of one event that runs once every other label has ended,
  whatever their outcome (``runAlways``), as BPS's finalJob does;
- a job's ``number_of_retries`` is the label's ``numberOfRetries`` (attempts in all, as
  ctrl_bps_panda reads it), ``request_walltime`` its ``requestWalltime`` (seconds, as in
  ctrl_bps_panda), and memory, cores, ``retry_unless_exit`` and the compute site are kept
  with the label's settings; the BPS run attributes (project, campaign, operator,
  payload) are kept with the workflow and reported by ``bps report``.

The dispatcher it talks to is the one of ``DISPATCHER_*`` (``Settings.from_env``).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from lsst.ctrl.bps import (
    BaseWmsService,
    BaseWmsWorkflow,
    GenericWorkflow,
    GenericWorkflowJob,
    WmsRunReport,
    WmsSpecificInfo,
    WmsStates,
)

from dispatcher.cli import one_shot
from dispatcher.config import Settings
from dispatcher.replay import Selector, cancel, replay
from dispatcher.store import Store
from dispatcher.submit import submit
from transport.interface import Transport

log = logging.getLogger(__name__)

SUBMISSION = "dispatcher_submission.yaml"
MAPPING = "dispatcher_mapping.json"
RUN_ID = "dispatcher_run_id"
QGRAPH_NODE = "qgraphNodeId"
KEPT = ("requestMemory", "requestCpus", "retryUnlessExit", "computeSite")  # recorded, not acted on
# events of a task, by state, as BPS counts jobs
EVENT_STATES: dict[str, WmsStates] = {
    "ready": WmsStates.READY,
    "queued": WmsStates.READY,
    "running": WmsStates.RUNNING,
    "retrying": WmsStates.PENDING,
    "finished": WmsStates.SUCCEEDED,
    "failed": WmsStates.FAILED,
    "cancelled": WmsStates.PRUNED,  # DELETED when the workflow was cancelled
}
RUN_STATES: dict[str, WmsStates] = {
    "running": WmsStates.RUNNING,
    "finished": WmsStates.SUCCEEDED,
    "failed": WmsStates.FAILED,
    "cancelled": WmsStates.DELETED,
}
T = TypeVar("T")


class BpsError(ValueError):
    """A GenericWorkflow the dispatcher cannot run as it is (the message says why)."""


# -- GenericWorkflow -> our submission ----------------------------------------------------


def _env_syntax(text: str) -> str:
    return re.sub(r"<ENV:([A-Za-z_][A-Za-z0-9_]*)>", r"${\1}", text)


def _double_quoted(value: str) -> str:
    """A value for ``export K="…"``: ``${X}`` still expands (BPS's <ENV:X>), nothing else does."""
    return '"' + re.sub(r'(["\\`])', r"\\\1", value) + '"'


def _resolve(gwf: GenericWorkflow, job: GenericWorkflowJob, varying: str | None) -> str:
    """The job's command line for /bin/sh, its varying value left as ``{payload}``."""
    values = dict(job.cmdvals or {})
    if varying is not None:
        values[varying] = "{payload}"
    try:
        args = (job.arguments or "").format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise BpsError(f"job {job.name}: its arguments name a value it has not ({exc})") from None
    for name in re.findall(r"<FILE:([^>]+)>", args):
        args = args.replace(f"<FILE:{name}>", gwf.get_file(name).src_uri)
    command = _env_syntax(f"{job.executable.src_uri} {args}".strip())
    exports = "".join(
        f"export {k}={_double_quoted(_env_syntax(str(v).format(**(job.cmdvals or {}))))}; "
        for k, v in sorted((job.environment or {}).items())
    )
    if varying is None:  # one command for every event: the payload (the job's name) is not used
        return f"{exports}: {{payload}}; {command}"
    return exports + command


def _varying(label: str, jobs: list[GenericWorkflowJob]) -> str | None:
    """The command value that is each job's own: ``qgraphNodeId`` (the quanta a pipetask
    job runs) where the jobs have one, else the one value that differs between them (None:
    they all run one command)."""
    keys = sorted({k for j in jobs for k in (j.cmdvals or {})})
    differ = [k for k in keys if len({str((j.cmdvals or {}).get(k)) for j in jobs}) > 1]
    if set(differ) <= {QGRAPH_NODE} and all(QGRAPH_NODE in (j.cmdvals or {}) for j in jobs):
        return QGRAPH_NODE
    if len(differ) > 1:
        raise BpsError(f"label {label}: its jobs differ in {', '.join(differ)}; one varying value is supported")
    return differ[0] if differ else None


def _label_settings(job: GenericWorkflowJob) -> dict[str, Any]:
    """What BPS says of a label's jobs, as our label settings (the first job's, as
    ctrl_bps_panda takes them); what we do not act on is kept with the workflow."""
    settings: dict[str, Any] = {}
    if job.number_of_retries:
        settings["numberOfRetries"] = int(job.number_of_retries)
    if job.request_walltime:
        settings["requestWalltime"] = float(job.request_walltime)
    for key, value in zip(
        KEPT, (job.request_memory, job.request_cpus, job.retry_unless_exit, job.compute_site), strict=True
    ):
        if value is not None:
            settings[key] = value
    return settings


def to_submission(
    gwf: GenericWorkflow, config: Any = None, submit_path: str | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """The submission (YAML as a dict) and the mapping of a GenericWorkflow."""
    pipetask: dict[str, dict[str, Any]] = {}
    mapping: dict[str, dict[str, str]] = {}
    labels = list(gwf.labels)
    for label in labels:
        jobs = list(gwf.get_jobs_by_label(label))
        if not jobs:
            continue
        varying = _varying(label, jobs)
        commands = {_resolve(gwf, j, varying) for j in jobs}
        if len(commands) > 1:
            raise BpsError(f"label {label}: its jobs run different commands beyond one value")
        parents = sorted(
            {gwf.get_job(p).label for j in jobs for p in gwf.predecessors(j.name)} - {label},
            key=labels.index,
        )
        pipetask[label] = {
            "payloadCommand": commands.pop(),
            "payloadShell": True,
            **({"dependsOn": parents} if parents else {}),
            **_label_settings(jobs[0]),
        }
        mapping[label] = {str(i): str(j.cmdvals[varying]) if varying else j.name for i, j in enumerate(jobs)}
    final = gwf.get_final()
    if isinstance(final, GenericWorkflowJob):
        pipetask[final.label] = {
            "payloadCommand": _resolve(gwf, final, None),
            "payloadShell": True,
            "dependsOn": list(pipetask),
            "runAlways": True,  # BPS's finalJob runs whatever the others' outcome
            **_label_settings(final),
        }
        mapping[final.label] = {"0": final.name}
    elif final is not None:
        raise BpsError("a final workflow (not a job) is not supported")
    attrs = dict(gwf.run_attrs or {})
    submission: dict[str, Any] = {
        "name": gwf.name,
        "mapping": MAPPING,
        "pipetask": pipetask,
        # kept with the workflow for bps report
        "bpsRunAttributes": {k: str(v) for k, v in attrs.items()},
        **({"bpsSubmitPath": str(submit_path)} if submit_path else {}),
    }
    for key in ("enableEventService", "maxPayloadsPerPandaJob", "maxWmsJobWalltime", "numberOfRetries"):
        found, value = config.search(key) if config is not None else (False, None)
        if found and value not in (None, ""):
            submission[key] = value
    return submission, mapping


# -- the plugin ---------------------------------------------------------------------------


def _run(call: Callable[[Store, Transport], Awaitable[T]]) -> T:
    """One call to the dispatcher's services, from BPS's synchronous world."""

    async def go() -> T:
        async with one_shot(Settings.from_env(), "bps", pool=2) as (store, broker):
            return await call(store, broker)

    return asyncio.run(go())


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a value BPS shares between labels is written out at each


class DispatcherWorkflow(BaseWmsWorkflow):  # type: ignore[misc]
    """A GenericWorkflow as our submission, in BPS's submit directory."""

    def __init__(self, name: str, config: Any) -> None:
        super().__init__(name, config)
        self.submission: dict[str, Any] = {}
        self.mapping: dict[str, dict[str, str]] = {}

    @classmethod
    def from_generic_workflow(
        cls, config: Any, generic_workflow: GenericWorkflow, out_prefix: str, service_class: str
    ) -> DispatcherWorkflow:
        workflow = cls(generic_workflow.name, config)
        workflow.service_class = service_class
        workflow.submit_path = out_prefix
        workflow.submission, workflow.mapping = to_submission(generic_workflow, config, out_prefix)
        return workflow

    def write(self, out_prefix: str) -> None:
        path = Path(out_prefix)
        path.mkdir(parents=True, exist_ok=True)
        (path / MAPPING).write_text(json.dumps(self.mapping))
        (path / SUBMISSION).write_text(yaml.dump(self.submission, Dumper=_Dumper, sort_keys=False))


class DispatcherService(BaseWmsService):  # type: ignore[misc]
    """The dispatcher as a BPS WMS. BPS makes one with its config to prepare and submit,
    and with an empty one for report, status, cancel, restart and ping."""

    def run_submission_checks(self) -> None:
        code, message = self.ping(None)
        if code:
            raise RuntimeError(message)

    def prepare(
        self, config: Any, generic_workflow: GenericWorkflow, out_prefix: str | None = None
    ) -> DispatcherWorkflow:
        assert out_prefix is not None
        workflow = DispatcherWorkflow.from_generic_workflow(
            config, generic_workflow, out_prefix, f"{type(self).__module__}.{type(self).__name__}"
        )
        workflow.write(out_prefix)
        return workflow

    def submit(self, workflow: DispatcherWorkflow, **kwargs: Any) -> DispatcherWorkflow:
        path = Path(workflow.submit_path) / SUBMISSION
        workflow_id = _run(lambda store, _: submit(store, path))
        workflow.run_id = str(workflow_id)
        (Path(workflow.submit_path) / RUN_ID).write_text(f"{workflow_id}\n")
        log.info("submitted to the dispatcher", extra={"workflow": workflow_id})
        return workflow

    def list_submitted_jobs(
        self,
        wms_id: str | None = None,
        user: str | None = None,
        require_bps: bool = True,
        pass_thru: str | None = None,
        is_global: bool = False,
    ) -> list[str]:
        async def find(store: Store, _: Transport) -> list[str]:
            if wms_id is not None:
                wf = await store.workflow_status(_workflow_id(wms_id))
                return [str(wf["id"])] if wf is not None and wf["status"] == "running" else []
            return [str(w) for w in await store.running_workflows()]

        return _run(find)

    def report(
        self,
        wms_workflow_id: str | None = None,
        user: str | None = None,
        hist: float = 0,
        pass_thru: str | None = None,
        is_global: bool = False,
        return_exit_codes: bool = False,
    ) -> tuple[list[WmsRunReport], str]:
        async def reports(store: Store, _: Transport) -> tuple[list[WmsRunReport], str]:
            if wms_workflow_id is not None:
                ids = [_workflow_id(wms_workflow_id)]
            else:
                ids = await store.running_workflows()
            found = []
            for workflow_id in ids:
                status = await store.workflow_status(workflow_id)
                if status is not None:
                    found.append(_report(status, await store.workflow_spec(workflow_id)))
            message = "" if found or wms_workflow_id is None else f"no workflow {wms_workflow_id} in the dispatcher"
            return found, message

        return _run(reports)

    def get_status(self, wms_workflow_id: str, hist: float = 1, is_global: bool = False) -> tuple[WmsStates, str]:
        async def status(store: Store, _: Transport) -> tuple[WmsStates, str]:
            wf = await store.workflow_status(_workflow_id(wms_workflow_id))
            if wf is None:
                return WmsStates.UNKNOWN, f"no workflow {wms_workflow_id} in the dispatcher"
            return RUN_STATES[wf["status"]], ""

        return _run(status)

    def cancel(self, wms_id: str, pass_thru: str | None = None) -> tuple[bool, str]:
        async def stop(store: Store, broker: Transport) -> tuple[bool, str]:
            jobs = await cancel(store, broker, _workflow_id(wms_id))
            if jobs is None:
                return False, f"workflow {wms_id} is not running"
            return True, f"cancelled workflow {wms_id}: {len(jobs)} job(s) stopped"

        return _run(stop)

    def restart(self, wms_workflow_id: str) -> tuple[str | None, str | None, str]:
        """Run the failed events of the workflow again (from the dead-letter queue)."""

        async def again(store: Store, broker: Transport) -> tuple[str | None, str | None, str]:
            workflow_id = _workflow_id(wms_workflow_id)
            wf = await store.workflow_status(workflow_id)
            if wf is None:
                return None, None, f"no workflow {wms_workflow_id} in the dispatcher"
            outcomes = await replay(store, broker, Selector(workflow=workflow_id))
            n = sum(o.action == "replayed" for o in outcomes)
            if not n:
                return None, wf["name"], f"workflow {workflow_id} has no failed event to run again"
            return str(workflow_id), wf["name"], f"{n} failed event(s) of workflow {workflow_id} run again"

        return _run(again)

    def ping(self, pass_thru: str | None) -> tuple[int, str]:
        async def check(store: Store, broker: Transport) -> tuple[int, str]:
            await store.schema_version()
            await broker.check_topology()
            return 0, ""

        try:
            return _run(check)
        except Exception as exc:  # BPS shows the message
            return 1, f"the dispatcher's services do not answer: {type(exc).__name__}: {exc}"


def _workflow_id(wms_id: str) -> int:
    """A run id as BPS passes it: our workflow id, or the submit directory holding it."""
    text = str(wms_id).strip()
    path = Path(text)
    if (path / RUN_ID).is_file():
        text = (path / RUN_ID).read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{wms_id!r} is not a dispatcher workflow id (or a submit directory holding one)")
    return int(text)


def _report(status: dict[str, Any], spec: dict[str, Any] | None) -> WmsRunReport:
    attrs = (spec or {}).get("bpsRunAttributes", {})
    path = (spec or {}).get("bpsSubmitPath")
    cancelled = status["status"] == "cancelled"
    summary: dict[str, dict[WmsStates, int]] = {}
    for task in status["tasks"]:
        counts = dict.fromkeys(WmsStates, 0)
        for state, n in task["events"].items():
            wms = WmsStates.DELETED if state == "cancelled" and cancelled else EVENT_STATES[state]
            if state == "ready" and task["status"] == "waiting":
                wms = WmsStates.UNREADY
            counts[wms] += n
        summary[task["label"]] = counts
    totals = dict.fromkeys(WmsStates, 0)
    for counts in summary.values():
        for state, n in counts.items():
            totals[state] += n
    return WmsRunReport(
        wms_id=str(status["id"]),
        global_wms_id=str(status["id"]),
        path=path,
        label=attrs.get("bps_run"),
        run=status["name"],
        project=attrs.get("bps_project"),
        campaign=attrs.get("bps_campaign"),
        payload=attrs.get("bps_payload"),
        operator=attrs.get("bps_operator") or getpass.getuser(),
        run_summary=";".join(f"{label}:{sum(c.values())}" for label, c in summary.items()),
        state=RUN_STATES[status["status"]],
        jobs=None,
        total_number_jobs=sum(totals.values()),
        job_state_counts=totals,
        job_summary=summary,
        exit_code_summary={},
        specific_info=_label_requests(spec),
    )


def _label_requests(spec: dict[str, Any] | None) -> WmsSpecificInfo | None:
    """What BPS asked for each label (kept, not acted on), shown by ``bps report --id``."""
    info = WmsSpecificInfo()
    for i, (label, settings) in enumerate(((spec or {}).get("pipetask") or {}).items()):
        asked = {
            k: settings[k] for k in ("requestMemory", "requestCpus", "retryUnlessExit", "computeSite") if k in settings
        }
        if asked:
            text = ", ".join(f"{k} {{{k}{i}}}" for k in asked)
            info.add_message(f"{{label{i}}}: {text}", {f"label{i}": label, **{f"{k}{i}": v for k, v in asked.items()}})
    return info or None
