"""Finisher: a job, task or workflow ends when every event under it is terminal.

Finalizing is idempotent (conditional updates in one transaction), so any number of
control planes may check the same job. A finished job's queue is deleted; a finished
task wakes the releaser for the tasks that depend on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

from dispatcher.store import Finished, Store
from transport.interface import Transport
from transport.outage import patiently

log = logging.getLogger(__name__)


class Finisher:
    def __init__(self, store: Store, broker: Transport, on_task_end: Callable[[], None]) -> None:
        self.store = store
        self.broker = broker
        self.on_task_end = on_task_end

    async def check(self, job_ids: Iterable[int]) -> Finished:
        ids = list(job_ids)
        if not ids:
            return Finished([], [], [])
        done = await self.store.finish(ids)
        for job_id, status in done.jobs:
            # waited out here, not by retrying the whole check: the job is finished in
            # Postgres already, so a second check would not find it to delete its queue
            delete = partial(self.broker.delete_queue, self.broker.names.job(job_id))
            await patiently(delete, what="deleting a job queue")
            log.debug("job ended", extra={"job": job_id, "status": status})
        for task_id, status in done.tasks:
            log.info("task ended", extra={"task_id": task_id, "status": status})
        for wf_id, status in done.workflows:
            log.info("workflow ended", extra={"workflow": wf_id, "status": status})
        if done.jobs:
            # a job left the release window (and a task may have ended): release more
            self.on_task_end()
        return done
