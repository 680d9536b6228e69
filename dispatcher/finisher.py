"""Finisher: a job, task or workflow ends when every event under it is terminal.

Finalizing is idempotent (conditional updates in one transaction), so any number of
control planes may check the same job. A finished job's queue is deleted; a finished
task wakes the releaser for the tasks that depend on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from functools import partial

from dispatcher.store import Finished, Store
from transport.interface import Transport
from transport.outage import patiently

log = logging.getLogger(__name__)


class Finisher:
    """Deleting a finished job's queue is left to ``delete_queues`` when the control plane
    runs it (a quorum queue's delete waits for its members, seconds while one is down:
    it must not hold up the bookkeeping), and done at once otherwise."""

    def __init__(self, store: Store, broker: Transport, on_task_end: Callable[[], None]) -> None:
        self.store = store
        self.broker = broker
        self.on_task_end = on_task_end
        self._doomed: dict[str, None] = {}  # queues to delete, oldest first
        self._wake = asyncio.Event()
        self._deleting = False  # delete_queues runs

    async def check(self, job_ids: Iterable[int]) -> Finished:
        ids = list(job_ids)
        if not ids:
            return Finished([], [], [])
        done = await self.store.finish(ids)
        for job_id, status in done.jobs:
            # the job is finished in Postgres already, so a second check would not find
            # it to delete its queue: the deletion is waited out, never dropped
            self._doomed[self.broker.names.job(job_id)] = None
            log.debug("job ended", extra={"job": job_id, "status": status})
        if self._deleting:
            self._wake.set()
        else:
            await self.delete_doomed()
        for task_id, status in done.tasks:
            log.info("task ended", extra={"task_id": task_id, "status": status})
        for wf_id, status in done.workflows:
            log.info("workflow ended", extra={"workflow": wf_id, "status": status})
        if done.jobs:
            # a job left the release window (and a task may have ended): release more
            self.on_task_end()
        return done

    async def delete_doomed(self) -> None:
        while self._doomed:
            name = next(iter(self._doomed))
            delete = partial(self.broker.delete_queue, name, wait=not self._deleting)
            await patiently(delete, what="deleting a job queue")
            self._doomed.pop(name, None)

    async def delete_queues(self) -> None:
        """Delete finished jobs' queues in the background, for as long as it runs."""
        self._deleting = True
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self.delete_doomed()
        finally:
            self._deleting = False
