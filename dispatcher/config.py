"""Settings, from the environment (``DISPATCHER_*``) and overridable by CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from transport.names import Names, job_log_path
from transport.urls import redact

__all__ = ["Names", "Settings", "job_log_path", "redact"]

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Settings:
    amqp_url: str = DEFAULT_AMQP_URL
    database_url: str = DEFAULT_DATABASE_URL
    names: Names = field(default_factory=Names)
    work_dir: Path = Path("var/work")
    log_dir: Path = Path("var/logs")
    # jobs with a queue at one time: keeps RabbitMQ small however large the workflow
    release_window: int = 200
    # bookkeeper: how many updates one transaction applies, and how long it waits to fill one
    batch_size: int = 2000
    batch_linger: float = 0.05
    # workers report every heartbeat_interval; one silent for 3 intervals is lost
    heartbeat_interval: float = 5.0
    # the monitor: loopback unless told otherwise; actions need the token
    monitor_host: str = "127.0.0.1"
    monitor_port: int = 8321
    monitor_token: str | None = None
    monitor_read_token: str | None = None
    # Host header names the monitor answers to, any port (empty: monitor_host and loopback)
    monitor_hosts: tuple[str, ...] = ()
    # durable queues: quorum (replicated on a cluster, survive a node) or classic
    queue_type: str = "quorum"
    # PanDA pilots (the monitor's /server/panda): token and Origin they must send when
    # set; how long one holds what it was handed after its last call (a pilot calls
    # updateJob every 30 min at least), and how long getEventRanges waits for work
    pilot_token: str | None = None
    pilot_origin: str | None = None
    pilot_lease: float = 3600.0
    pilot_wait: float = 60.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        work_dir = Path(env.get("DISPATCHER_WORK_DIR", "var/work"))
        return cls(
            amqp_url=env.get("DISPATCHER_AMQP_URL", DEFAULT_AMQP_URL),
            database_url=env.get("DISPATCHER_DATABASE_URL", DEFAULT_DATABASE_URL),
            names=Names(env.get("DISPATCHER_QUEUE_PREFIX", "")),
            work_dir=work_dir,
            log_dir=Path(env.get("DISPATCHER_LOG_DIR", str(work_dir.parent / "logs"))),
            release_window=int(env.get("DISPATCHER_RELEASE_WINDOW", "200")),
            heartbeat_interval=float(env.get("DISPATCHER_HEARTBEAT_INTERVAL", "5")),
            monitor_host=env.get("DISPATCHER_MONITOR_HOST", "127.0.0.1"),
            monitor_port=int(env.get("DISPATCHER_MONITOR_PORT", "8321")),
            monitor_token=env.get("DISPATCHER_MONITOR_TOKEN") or None,
            monitor_read_token=env.get("DISPATCHER_MONITOR_READ_TOKEN") or None,
            monitor_hosts=tuple(h.strip() for h in env.get("DISPATCHER_MONITOR_HOSTS", "").split(",") if h.strip()),
            queue_type=env.get("DISPATCHER_QUEUE_TYPE", "quorum"),
            pilot_token=env.get("DISPATCHER_PILOT_TOKEN") or None,
            pilot_origin=env.get("DISPATCHER_PILOT_ORIGIN") or None,
            pilot_lease=float(env.get("DISPATCHER_PILOT_LEASE", "3600")),
            pilot_wait=float(env.get("DISPATCHER_PILOT_WAIT", "60")),
        )

    def override(self, **changes: object) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
