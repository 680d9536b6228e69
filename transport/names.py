"""Every name the dispatcher gives a thing it shares: queues and exchanges (under one
prefix: tests use their own) and job log files. Each is derived from ids, never taken
from a message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transport.policy import DELAY_STEPS_MS


@dataclass(frozen=True)
class Names:
    """Every RabbitMQ name the dispatcher uses, under one prefix (tests use their own)."""

    prefix: str = ""

    @property
    def jobs(self) -> str:
        return f"{self.prefix}es.jobs"

    @property
    def status(self) -> str:
        return f"{self.prefix}es.status"

    @property
    def status_exchange(self) -> str:
        """Where workers publish statuses: a fanout exchange bound to the status queue. Its
        own name so that a worker's user may write to it and to nothing else (publishing
        through the default exchange could reach any queue)."""
        return f"{self.prefix}es.status"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}es.dlq"

    @property
    def delay(self) -> str:
        """Headers exchange in front of the delay queues."""
        return f"{self.prefix}es.delay"

    def retry(self, delay_ms: int) -> str:
        return f"{self.prefix}es.retry.{delay_ms}"

    @property
    def control(self) -> str:
        """Fanout exchange to every worker (cancel)."""
        return f"{self.prefix}es.control"

    @property
    def dead_ranges(self) -> str:
        """Ranges RabbitMQ dead-lettered (delivery limit); the control plane records them."""
        return f"{self.prefix}es.dead.ranges"

    def job(self, job_id: int) -> str:
        return f"{self.prefix}es.job.{job_id}"

    def fixed_queues(self) -> list[str]:
        """Every queue but the jobs' own: declared and deleted with the topology."""
        return [self.jobs, self.status, self.dlq, self.dead_ranges, *(self.retry(step) for step in DELAY_STEPS_MS)]


def job_log_path(log_dir: Path, workflow_id: int, job_id: int) -> Path:
    """Where a job's one log is: derived from ids only, by the workers that write it and
    the monitor that serves it (never from a path a message names)."""
    return log_dir / f"workflow-{workflow_id}" / f"job-{job_id}.log"
