"""Text rendering of workflow status (``dispatcher status`` and ``submit --wait``)."""

from __future__ import annotations

from typing import Any

EVENT_STATES = ("ready", "queued", "running", "finished", "failed", "cancelled")
TERMINAL_WORKFLOW = ("finished", "failed", "cancelled")


def progress(status: dict[str, Any]) -> tuple[int, int]:
    """(terminal events, all events) of a workflow."""
    done = sum(t["events"].get(s, 0) for t in status["tasks"] for s in ("finished", "failed", "cancelled"))
    return done, int(status["n_events"])


def render(status: dict[str, Any]) -> str:
    done, total = progress(status)
    lines = [f"workflow {status['id']} {status['name']!r}: {status['status']}  {done}/{total} events done"]
    width = max(len(t["label"]) for t in status["tasks"])
    for t in status["tasks"]:
        events = " ".join(f"{s}={t['events'][s]}" for s in EVENT_STATES if t["events"].get(s))
        jobs = " ".join(f"{s}={n}" for s, n in sorted(t["jobs"].items()))
        es = f"ES x{t['max_payloads_per_job']}" if t["event_service"] else "no ES"
        lines.append(f"  {t['label']:<{width}}  {t['status']:<9} {es:<8} events: {events or '-'}  jobs: {jobs or '-'}")
    return "\n".join(lines)


def progress_line(status: dict[str, Any]) -> str:
    done, total = progress(status)
    counts: dict[str, int] = {}
    for t in status["tasks"]:
        for s, n in t["events"].items():
            counts[s] = counts.get(s, 0) + n
    width = 30
    filled = int(width * done / total) if total else width
    detail = " ".join(f"{s}={counts[s]}" for s in EVENT_STATES if counts.get(s))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {status['status']} ({detail})"
