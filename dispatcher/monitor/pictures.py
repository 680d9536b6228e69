"""The monitor's pictures, drawn on the server as SVG (no script, no chart library): they
are part of the page, so they update live with it.

``job_timeline``: a job's event attempts, one lane per worker slot (slots are what a
worker runs at once: its attempts laid out so that none overlaps another in a lane), one
bar per attempt coloured by outcome, and each worker's set-up and tear-down. Idle slots
and scheduling gaps are the white between the bars.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from html import escape

from markupsafe import Markup

WIDTH = 960  # the drawing, in px
LABELS = 190  # the worker names' column
LANE = 14
GAP = 3
AXIS = 22
MAX_BARS = 5000  # the newest attempts of a job drawn; the page says how many were left out

COLOURS = {
    "finished": "#2e8b57",
    "failed": "#c0392b",
    "retried": "#e67e22",  # failed, and a later attempt was issued
    "running": "#2f80ed",
    "set-up": "#8a8f98",
    "tear-down": "#5b6068",
}


@dataclass(frozen=True)
class Bar:
    """One attempt of one event, or a worker's set-up or tear-down."""

    worker: str
    kind: str  # finished, failed, retried, running, set-up, tear-down
    start: float  # seconds since the epoch
    end: float
    title: str


def lanes(bars: list[Bar]) -> dict[str, list[list[Bar]]]:
    """Each worker's bars in as few lanes as hold them without overlap (its slots), the
    set-ups and tear-downs in a lane of their own above them."""
    by_worker: dict[str, list[list[Bar]]] = {}
    for bar in sorted(bars, key=lambda b: (b.start, b.end)):
        rows = by_worker.setdefault(bar.worker, [[]])
        if bar.kind in ("set-up", "tear-down"):
            rows[0].append(bar)
            continue
        for row in rows[1:]:
            if row[-1].end <= bar.start:
                row.append(bar)
                break
        else:
            rows.append([bar])
    return by_worker


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def job_timeline(bars: list[Bar], *, left_out: int = 0) -> Markup:
    """The SVG of a job's timeline (a placeholder text when nothing ran yet)."""
    if not bars:
        return Markup('<p class="muted">No event has started yet.</p>')
    t0 = min(b.start for b in bars)
    t1 = max(max(b.end for b in bars), t0 + 1e-3)
    span = t1 - t0
    scale = (WIDTH - LABELS - 10) / span
    rows = lanes(bars)
    n_lanes = sum(len(r) for r in rows.values())
    height = AXIS + n_lanes * (LANE + GAP) + 6
    out = [
        f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="job timeline">',
        "<style>text{font:11px sans-serif;fill:#333}.tick{stroke:#ddd}</style>",
    ]
    for i in range(6):  # the time axis, from the first start
        x = LABELS + i * (WIDTH - LABELS - 10) / 5
        out.append(f'<line class="tick" x1="{x:.1f}" y1="{AXIS - 4}" x2="{x:.1f}" y2="{height}"/>')
        out.append(f'<text x="{x:.1f}" y="12" text-anchor="middle">{_seconds(span * i / 5)}</text>')
    y = AXIS
    for worker, worker_rows in rows.items():
        for i, row in enumerate(worker_rows):
            if i == 0 and not row:
                continue  # no set-up or tear-down recorded for this worker
            name = f"{worker} (job)" if i == 0 else f"{worker} slot {i}"
            out.append(f'<text x="{LABELS - 6}" y="{y + LANE - 3}" text-anchor="end">{escape(name[-32:])}</text>')
            for bar in row:
                x = LABELS + (bar.start - t0) * scale
                w = max((bar.end - bar.start) * scale, 1.0)
                out.append(
                    f'<rect class="{bar.kind}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{LANE}" '
                    f'fill="{COLOURS[bar.kind]}"><title>{escape(bar.title)}</title></rect>'
                )
            y += LANE + GAP
    out.append("</svg>")
    legend = " ".join(f'<span class="key" style="background:{c}"></span>{k}' for k, c in COLOURS.items())
    note = f" · the {MAX_BARS} newest attempts drawn, {left_out} older left out" if left_out else ""
    return Markup("".join(out) + f'<p class="legend">{legend}{note}</p>')


def attempt_bars(rows: list[dict[str, object]], now: datetime) -> list[Bar]:
    """A job's attempts (number, attempt, status, worker, started_at, ended_at, retried) as bars."""
    bars = []
    for r in rows:
        started = r["started_at"]
        if not isinstance(started, datetime):
            continue
        ended = r["ended_at"] if isinstance(r["ended_at"], datetime) else now
        status = str(r["status"])
        kind = "retried" if status == "failed" and r["retried"] else status
        took = (ended - started).total_seconds()
        title = f"event {r['number']} attempt {r['attempt']}: {kind}, {took:.3f} s on {r['worker']}"
        bars.append(Bar(str(r["worker"]), kind, started.timestamp(), ended.timestamp(), title))
    return bars
