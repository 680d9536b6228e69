#!/usr/bin/env python3
"""The real PanDA pilot's EventService executor (``WorkExecutor``, executor_type
'generic', PILOT_USER=generic) run for one job against ``$PANDA_SERVER_URL``, as the
pilot's own job flow (``pilot/control/payloads/eventservice.py``) runs it: getJob, the
pilot's ``create_job``, updateJob running, the executor (getEventRanges, the payload over
yampl, updateEventRanges at every stage-out), updateJob with the final state.

    python run_pilot.py RUN_DIR

RUN_DIR becomes $PILOT_HOME (the pilot's curl config files, its queue and storage
descriptions, the job's work directory). Exits 0 when the executor did, 3 when the
dispatcher had no job. The queue and storage come from local files, as a site without
CRIC would give them: the events' outputs are "staged out" with the pilot's mv copytool
into RUN_DIR/storage, and zip_time_gap (1 s) makes the pilot report every second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
QUEUE, SITE, DDM = "DISPATCHER_TEST", "DISPATCHER_SITE", "DISPATCHER_ES_DISK"


def write_json(path: str, data: object) -> None:
    with open(path, "w") as f:
        json.dump(data, f)


def describe_site(home: str) -> str:
    """The queue and its storage as files (no CRIC); returns the storage file."""
    queue = {
        "name": QUEUE,
        "nickname": QUEUE,
        "state": "ACTIVE",
        "status": "online",
        "site": SITE,
        "copytools": {"mv": {}},
        "acopytools": {"es_events": ["mv"], "default": ["mv"]},
        "astorages": {"es_events": [DDM]},
        "zip_time_gap": 1,  # the pilot's stage-out (and report) interval: 7200 s when unset
        "corecount": 1,
    }
    write_json(os.path.join(home, "queuedata.json"), queue)
    write_json(os.path.join(home, "cric_pandaqueues.json"), {QUEUE: queue})
    storage = os.path.join(home, "storage")
    os.makedirs(storage, exist_ok=True)
    protocol = [{"endpoint": "file://localhost", "path": storage, "flavour": "POSIX", "id": 1}]
    ddm = {
        "name": DDM,
        "id": 4242,
        "site": SITE,
        "state": "ACTIVE",
        "is_deterministic": True,
        "arprotocols": {"write_wan": protocol, "write_lan": protocol},
        "rprotocols": {},
    }
    write_json(os.path.join(home, "ddmendpoints.json"), {DDM: ddm})
    return os.path.join(home, "ddmendpoints.json")


def main() -> int:
    home = os.path.abspath(sys.argv[1])
    os.makedirs(home, exist_ok=True)
    logging.basicConfig(
        filename=os.path.join(home, "pilot.log"),
        level=logging.DEBUG,
        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    server = os.environ["PANDA_SERVER_URL"]
    os.environ.update(
        PILOT_HOME=home,
        PILOT_USER="generic",
        PILOT_ES_EXECUTOR_TYPE="generic",
        STORAGEDATA_SERVER_URL=describe_site(home),  # else CRIC, over the network
        YAMPL_SOCKET_DIR=home,
        PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])),  # the payload's yampl
    )
    sys.path.insert(0, HERE)  # ... and the pilot's

    from pilot.control.job import create_job
    from pilot.eventservice.workexecutor.workexecutor import WorkExecutor
    from pilot.info import infosys
    from pilot.user.generic.common import get_payload_command
    from pilot.util import https

    https.https_setup(None, None)
    infosys.init(QUEUE)
    answer = https.request(f"{server}/server/panda/getJob", data={"siteName": QUEUE, "node": "wn-test"})
    if not answer or answer.get("StatusCode") != 0:
        print(f"no job: {answer}", flush=True)
        return 3
    job = create_job(answer, QUEUE)
    job.workdir = os.path.join(home, f"PanDA_Pilot-{job.jobid}")
    os.makedirs(job.workdir)
    # the payload, as the pilot would have downloaded it; and the label's mapping, which
    # a Rubin site's pilot gets as RUBIN_ES_MAP_FILE
    shutil.copy(os.path.join(HERE, "es_payload.py"), job.workdir)
    with urllib.request.urlopen(f"{server}/server/panda/esmap?taskID={job.taskid}") as r:
        mapping = os.path.join(home, "esmap.json")
        with open(mapping, "wb") as f:
            f.write(r.read())
    os.environ["RUBIN_ES_MAP_FILE"] = mapping

    def update_job(state: str, **extra: object) -> None:
        https.request(f"{server}/server/panda/updateJob", data={"jobId": job.jobid, "state": state, **extra})

    update_job("running")
    executor = WorkExecutor(args={"executor_type": "generic"})
    executor.set_payload(
        {
            "executable": get_payload_command(job),
            "workdir": job.workdir,
            "job": job,
            "output_file": "payload.stdout",
            "error_file": "payload.stderr",
        }
    )
    cwd = os.getcwd()
    try:
        executor.start()
        while executor.is_alive():
            time.sleep(0.2)
    finally:
        os.chdir(cwd)  # set_payload went into the work directory
    code = executor.get_exit_code()
    update_job("finished" if code == 0 else "failed", nEvents=job.nevents, transExitCode=code or 0)
    print(f"executor exit code {code}, {job.nevents} events", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
