"""The monitor's pictures, drawn on the server as SVG (no script, no chart library): they
are part of the page, so they update live with it.

``progress``, ``states`` and ``durations`` (the workflow and task pages): events ended
per second over the run, events by state stacked over the run, and a histogram of how
long attempts ran, finished and failed apart; all three from counters (see below).

``job_timeline``: a job's event attempts, one lane per worker slot (slots are what a
worker runs at once: its attempts laid out so that none overlaps another in a lane), one
bar per attempt coloured by outcome, and each worker's set-up and tear-down. Idle slots
and scheduling gaps are the white between the bars.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import datetime
from html import escape
from itertools import pairwise

from markupsafe import Markup

WIDTH = 960  # the drawing, in px
LABELS = 190  # the worker names' column
LANE = 14
GAP = 3
AXIS = 22
# the newest attempts of a job drawn; the page says how many were left out (each bar is
# ~160 bytes of a page that refreshes every 2 s)
MAX_BARS = 2000

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
    set-ups and tear-downs in a lane of their own above them. Each bar goes to the lane
    that freed up first (a heap of the lanes' ends: a job of 100,000 attempts on many
    slots is laid out in n log n, not n x slots)."""
    by_worker: dict[str, list[list[Bar]]] = {}
    free: dict[str, list[tuple[float, int]]] = {}  # per worker: (end of its last bar, lane)
    for bar in sorted(bars, key=lambda b: (b.start, b.end)):
        rows = by_worker.setdefault(bar.worker, [[]])
        if bar.kind in ("set-up", "tear-down"):
            rows[0].append(bar)
            continue
        ends = free.setdefault(bar.worker, [])
        if ends and ends[0][0] <= bar.start:
            lane = heapq.heappop(ends)[1]
        else:
            lane = len(rows)
            rows.append([])
        rows[lane].append(bar)
        heapq.heappush(ends, (bar.end, lane))
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


# -- a task's or a workflow's progress, and its events' durations ----------------------
#
# Drawn from counters, never from the events: the watchdog samples each task's counts by
# state as it folds the counters (tasks whose counts changed), and the attempts' durations
# are counted in buckets by a trigger (migration 0011). A picture costs the same at a
# thousand events and at a million.

CHART_W, CHART_H, MARGIN = 460, 150, 40
BINS = 40
MAX_SAMPLES = 400  # of each task, evenly spaced over its run
# the stacking order, bottom first, and each state's colour
STATE_COLOURS = {
    "finished": "#2e8b57",
    "failed": "#c0392b",
    "cancelled": "#7f8c8d",
    "retrying": "#e67e22",
    "running": "#2f80ed",
    "queued": "#9ec5fe",
    "ready": "#dfe6ee",
}


@dataclass(frozen=True)
class Sample:
    """The events by state at a moment, summed over the tasks drawn."""

    at: float  # seconds since the epoch
    counts: dict[str, int]


def totals(rows: list[dict[str, object]]) -> list[Sample]:
    """Samples of several tasks (task_id, at, counts) summed at each moment one was taken:
    a task without a sample then (its counts did not change) counts as at its last."""
    last: dict[object, dict[str, int]] = {}
    out: list[Sample] = []
    for r in rows:  # ordered by time
        at = r["at"]
        counts = r["counts"]
        if not isinstance(at, datetime) or not isinstance(counts, dict):
            continue
        last[r["task_id"]] = {str(k): int(v) for k, v in counts.items()}
        summed: dict[str, int] = {}
        for task_counts in last.values():
            for state, n in task_counts.items():
                summed[state] = summed.get(state, 0) + n
        if out and out[-1].at == at.timestamp():
            out[-1] = Sample(at.timestamp(), summed)
        else:
            out.append(Sample(at.timestamp(), summed))
    return out


def _svg_open(title: str) -> list[str]:
    return [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{escape(title)}">',
        "<style>text{font:11px sans-serif;fill:#333}</style>",
        f'<text x="{MARGIN}" y="12">{escape(title)}</text>',
    ]


def _y_axis(top: float, base: float, label: str) -> str:
    return (
        f'<text x="{MARGIN - 4}" y="26" text-anchor="end">{escape(label)}</text>'
        f'<text x="{MARGIN - 4}" y="{base}" text-anchor="end">0</text>'
    )


def _x_axis(left: str, right: str) -> str:
    return (
        f'<text x="{MARGIN}" y="{CHART_H - 6}">{escape(left)}</text>'
        f'<text x="{CHART_W - 6}" y="{CHART_H - 6}" text-anchor="end">{escape(right)}</text>'
    )


def _count(n: float) -> str:
    return f"{n:,.0f}" if n >= 10 else f"{n:.2g}"


def _columns(title: str, counts: list[tuple[float, float]], x_labels: tuple[str, str], unit: str) -> str:
    """Stacked columns (finished below, failed on top) in a small SVG chart."""
    top = max((f + x for f, x in counts), default=0) or 1
    width = (CHART_W - MARGIN - 6) / max(len(counts), 1)
    base = CHART_H - 20
    out = [*_svg_open(title), _y_axis(top, base, _count(top))]
    scale = (base - 22) / top
    for i, (finished, failed) in enumerate(counts):
        x = MARGIN + i * width
        for n, kind, bottom in ((finished, "finished", base), (failed, "failed", base - finished * scale)):
            if n:
                h = n * scale
                out.append(
                    f'<rect class="{kind}" x="{x:.1f}" y="{bottom - h:.1f}" width="{max(width - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="{COLOURS[kind]}"><title>{_count(n)} {kind}{unit}</title></rect>'
                )
    out.append(_x_axis(*x_labels))
    out.append("</svg>")
    return "".join(out)


def progress(samples: list[Sample]) -> Markup:
    """Events that ended per second over the run, finished and failed stacked: the change
    in the counts from one sample to the next (up to BINS columns)."""
    if len(samples) < 2:
        return Markup("")
    t0, t1 = samples[0].at, samples[-1].at
    step = max((t1 - t0) / BINS, 1.0)
    bins = min(BINS, int((t1 - t0) / step) + 1)
    ended = [[0.0, 0.0] for _ in range(bins)]
    for before, after in pairwise(samples):
        i = min(int((after.at - t0) / step), bins - 1)
        ended[i][0] += max(after.counts.get("finished", 0) - before.counts.get("finished", 0), 0)
        ended[i][1] += max(after.counts.get("failed", 0) - before.counts.get("failed", 0), 0)
    rates = [(f / step, x / step) for f, x in ended]
    return Markup(_columns("events ended per second", rates, ("0 s", _seconds(t1 - t0)), "/s"))


def states(samples: list[Sample]) -> Markup:
    """The events by state over the run, stacked (an area per state)."""
    if len(samples) < 2:
        return Markup("")
    t0, t1 = samples[0].at, samples[-1].at
    span = max(t1 - t0, 1e-3)
    top = max(sum(s.counts.values()) for s in samples) or 1
    base = CHART_H - 20
    xscale, yscale = (CHART_W - MARGIN - 6) / span, (base - 22) / top
    out = [*_svg_open("events by state"), _y_axis(top, base, _count(top))]
    below = [0.0] * len(samples)
    for state, colour in STATE_COLOURS.items():
        above = [b + s.counts.get(state, 0) for b, s in zip(below, samples, strict=True)]
        if above != below:
            xs = [MARGIN + (s.at - t0) * xscale for s in samples]
            upper = " ".join(f"{x:.1f},{base - y * yscale:.1f}" for x, y in zip(xs, above, strict=True))
            lower = " ".join(
                f"{x:.1f},{base - y * yscale:.1f}" for x, y in zip(reversed(xs), reversed(below), strict=True)
            )
            last = samples[-1].counts.get(state, 0)
            out.append(
                f'<polygon class="{state}" points="{upper} {lower}" fill="{colour}">'
                f"<title>{state}: {last:,} now</title></polygon>"
            )
        below = above
    out.append(_x_axis("0 s", _seconds(t1 - t0)))
    out.append("</svg>")
    legend = " ".join(f'<span class="key" style="background:{c}"></span>{k}' for k, c in STATE_COLOURS.items())
    # the chart and its key side by side with the other charts
    return Markup(
        '<span style="display:inline-block;vertical-align:top">'
        + "".join(out)
        + f'<p class="legend">{legend}</p></span>'
    )


def bucket_floor(bucket: int) -> float:
    """The shortest duration, in seconds, that a duration bucket holds (see 0011)."""
    return 0.0 if bucket == 0 else 2 ** (bucket / 4) / 1000


def durations(rows: list[dict[str, object]]) -> Markup:
    """How long attempts ran (status, bucket, n: quarter-octave buckets), finished and
    failed apart, on a log scale from the shortest to the longest."""
    counts: dict[int, list[float]] = {}
    for r in rows:
        bucket, n, status = r["bucket"], r["n"], r["status"]
        if isinstance(bucket, int) and isinstance(n, int) and status in ("finished", "failed"):
            counts.setdefault(bucket, [0, 0])[0 if status == "finished" else 1] += n
    if not counts:
        return Markup("")
    lo, hi = min(counts), max(counts)
    columns = [(counts.get(b, [0, 0])[0], counts.get(b, [0, 0])[1]) for b in range(lo, hi + 1)]
    labels = (_duration(bucket_floor(lo)), f"{_duration(bucket_floor(hi + 1))} (log scale)")
    return Markup(_columns("event durations", columns, labels, ""))


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"
