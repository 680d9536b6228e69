"""How a monitor is configured: its tokens, refresh, log directory and host names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class MonitorConfig:
    token: str | None = None  # for cancel and replay
    read_token: str | None = None  # for everything, when set
    refresh_ms: int = 2000
    log_dir: Path | None = None  # job logs are served from under it only (None: not served)
    hosts: tuple[str, ...] = LOOPBACK_HOSTS  # accepted Host header names, any port ("*": any)
    # the PanDA pilot API (dispatcher.monitor.panda): its token and Origin when set, how
    # long a pilot holds what it was handed after its last call, and how long a
    # getEventRanges waits for work that may still come
    pilot_token: str | None = None
    pilot_origin: str | None = None
    pilot_lease: float = 3600.0
    pilot_wait: float = 60.0


def default_hosts(monitor_host: str) -> tuple[str, ...]:
    """The monitor's own address and the loopback names (a wildcard address names no host)."""
    own = () if monitor_host in ("", "0.0.0.0", "::") else (monitor_host,)
    return tuple(dict.fromkeys((*own, *LOOPBACK_HOSTS)))


def host_pattern(host: str) -> str:
    """A host name as TrustedHostMiddleware compares it: lower case, IPv6 in brackets."""
    host = host.strip().lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
        raise ValueError(f"monitor host {host!r}: a wildcard must be '*' or lead a domain ('*.example.org')")
    return host
