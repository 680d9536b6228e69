"""The states of workflows, tasks, jobs, events, attempts and workers: the one list of
each, and which of them end. The tables' CHECK constraints and SQL's ``es_status_rank``
say the same (``tests/test_states.py`` compares them in Postgres).

The wire vocabulary of what a worker reports (``schemas.messages.EventStatus``) is a
different one: it adds ``returned`` and ``stopped``, which no event is ever in, and
``fatal``, a failed attempt that gets no next one.
"""

from __future__ import annotations

from typing import Literal, get_args

# Literals, so that the monitor's state filters are enums in its OpenAPI (an unknown state
# is a 422, never a query Postgres refuses). Events list 'retrying' last: the order the
# pages, metrics and the OpenAPI enum have always shown them in.
EventState = Literal["ready", "queued", "running", "finished", "failed", "cancelled", "retrying"]
JobState = Literal["pending", "releasing", "queued", "running", "finished", "failed", "cancelled"]
TaskState = Literal["waiting", "released", "running", "finished", "failed", "cancelled"]
WorkflowState = Literal["running", "finished", "failed", "cancelled"]
AttemptState = Literal["running", "finished", "failed"]
WorkerState = Literal["live", "stopping", "stopped", "lost"]

EVENT_STATES: tuple[EventState, ...] = get_args(EventState)
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
TASK_STATES: tuple[TaskState, ...] = get_args(TaskState)
WORKFLOW_STATES: tuple[WorkflowState, ...] = get_args(WorkflowState)
ATTEMPT_STATES: tuple[AttemptState, ...] = get_args(AttemptState)
WORKER_STATES: tuple[WorkerState, ...] = get_args(WorkerState)

# The end states, the same for events, jobs, tasks and workflows: nothing leaves them
# (but a replay, which gives an event a new attempt)
TERMINAL: tuple[Literal["finished", "failed", "cancelled"], ...] = ("finished", "failed", "cancelled")

# How far along an event (or one attempt of it) is, as SQL's es_status_rank says: an update
# only moves a row to a higher rank. 'retrying' ranks with the end states: its attempt
# ended (the next attempt is a higher number, not a higher rank).
EVENT_RANK: dict[str, int] = {
    "ready": 0,
    "queued": 1,
    "running": 2,
    "retrying": 3,
    "finished": 3,
    "failed": 3,
    "cancelled": 3,
}


def terminal(counts: dict[str, int]) -> int:
    """How many of these counts by state are in an end state (will not run again)."""
    return sum(counts.get(s, 0) for s in TERMINAL)
