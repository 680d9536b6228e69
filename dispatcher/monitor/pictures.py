"""The monitor's pictures, drawn on the server as SVG (no script, no chart library): they
are part of the page, so they update live with it.

``progress`` and ``durations`` (the workflow page): events ended per second over the run,
and a histogram of how long events ran, each with finished and failed attempts apart.

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


# -- a workflow's progress and its events' durations -----------------------------------

CHART_W, CHART_H, MARGIN = 460, 150, 34
BINS = 40
MAX_ENDED = 20_000  # the newest attempts a workflow's pictures are drawn from


@dataclass(frozen=True)
class Ended:
    """An attempt that ended: when, after how long, and whether it finished."""

    end: float
    took: float
    finished: bool


def _columns(title: str, counts: list[tuple[int, int]], x_labels: tuple[str, str], unit: str) -> str:
    """Stacked columns (finished below, failed on top) in a small SVG chart."""
    top = max((f + x for f, x in counts), default=0) or 1
    width = (CHART_W - MARGIN - 6) / max(len(counts), 1)
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{escape(title)}">',
        "<style>text{font:11px sans-serif;fill:#333}</style>",
        f'<text x="{MARGIN}" y="12">{escape(title)}</text>',
        f'<text x="{MARGIN - 4}" y="26" text-anchor="end">{top}</text><text x="{MARGIN - 4}" y="{CHART_H - 20}" '
        f'text-anchor="end">0</text>',
    ]
    base = CHART_H - 20
    scale = (base - 22) / top
    for i, (finished, failed) in enumerate(counts):
        x = MARGIN + i * width
        for n, kind, bottom in ((finished, "finished", base), (failed, "failed", base - finished * scale)):
            if n:
                h = n * scale
                out.append(
                    f'<rect class="{kind}" x="{x:.1f}" y="{bottom - h:.1f}" width="{max(width - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="{COLOURS[kind]}"><title>{n} {kind}{unit}</title></rect>'
                )
    out.append(f'<text x="{MARGIN}" y="{CHART_H - 6}">{escape(x_labels[0])}</text>')
    out.append(f'<text x="{CHART_W - 6}" y="{CHART_H - 6}" text-anchor="end">{escape(x_labels[1])}</text>')
    out.append("</svg>")
    return "".join(out)


def progress(ended: list[Ended]) -> Markup:
    """Attempts ended per second over the workflow's run, finished and failed stacked."""
    if not ended:
        return Markup("")
    t0, t1 = min(e.end for e in ended), max(e.end for e in ended)
    step = max((t1 - t0) / BINS, 1.0)  # a second at least: a rate over less says little
    bins = min(BINS, int((t1 - t0) / step) + 1)
    counts = [[0, 0] for _ in range(bins)]
    for e in ended:
        counts[min(int((e.end - t0) / step), bins - 1)][0 if e.finished else 1] += 1
    per_second = [(round(f / step), round(x / step)) for f, x in counts]
    return Markup(_columns("events ended per second", per_second, ("0 s", _seconds(t1 - t0)), "/s"))


def durations(ended: list[Ended]) -> Markup:
    """How long events ran, finished and failed apart (up to the 99th percentile)."""
    if not ended:
        return Markup("")
    took = sorted(e.took for e in ended)
    top = max(took[min(int(len(took) * 0.99), len(took) - 1)], 1e-3)
    step = top / BINS
    counts = [[0, 0] for _ in range(BINS)]
    for e in ended:
        counts[min(int(e.took / step), BINS - 1)][0 if e.finished else 1] += 1
    return Markup(_columns("event durations", [(f, x) for f, x in counts], ("0 s", f"{top:.3g} s and more"), ""))


def ended_attempts(rows: list[dict[str, object]]) -> list[Ended]:
    out = []
    for r in rows:
        start, end = r["started_at"], r["ended_at"]
        if isinstance(start, datetime) and isinstance(end, datetime) and r["status"] in ("finished", "failed"):
            out.append(Ended(end.timestamp(), (end - start).total_seconds(), r["status"] == "finished"))
    return out
