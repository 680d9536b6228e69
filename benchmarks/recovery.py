"""Recovery time: how soon the work of a SIGKILLed worker runs again.

    python -m benchmarks.run --only recovery [--merge] [--quick]

For each range size (eventsPerRange 1, 10, 100): one control plane and two workers
(``--slots 4``) run a workflow of async sleeps (``tests.payloads:sleepy``), every range
sleeping the same time in all (2 s: events of 2 s, 0.2 s, 0.02 s); a worker is SIGKILLed
every few seconds and a replacement started right after each kill. At a kill, the events
Postgres has ``running`` under the killed worker (``events.worker``, the worker's id
matched by its pid) are the lost work: the events it was running and those of its
ranges it had run but not reported yet. Each is back when its next attempt has started
(``attempts.started_at`` of ``attempt + 1``).

Two cases, each in a namespace of its own per range size, with jobs shaped for it:

  alone   jobs of 4 ranges (a worker's prefetch: it takes the job whole and invites
          nobody), 2 jobs released at a time: each worker on its own job. The killed
          worker's ranges go back to a queue nobody consumes, and the control plane has
          to announce the job (``announce_unconsumed``, every second) before a worker
          comes for them.
  shared  jobs of 24 ranges, one released at a time: the worker that sets a job up
          invites the other in. RabbitMQ delivers the ranges to the other worker.

Either way the worker that gets a range delivered again returns it to the bookkeeping
unrun; the bookkeeping charges an attempt to the events Postgres saw running and issues
them again (new ranges, at the back of the job's queue). Which case a kill was is read
from RabbitMQ 30 ms after it (consumers left on the job's queue), not from the plan. Kills
are 3-5 s apart (at random: not in step with the ranges).
The control plane's and workers' logs give when the job was announced and when its
ranges were delivered again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.run import Namespace
from dispatcher.config import Names, Settings
from transport.rabbitmq import Broker

TARGET_P90_SECONDS = 5.0
WORKER = ("--slots", "4")
SLOTS = 8  # in all, two workers


@dataclass(frozen=True)
class Case:
    name: str
    ranges_per_job: int
    release_window: int
    kills: int


@dataclass(frozen=True)
class Plan:
    ranges: tuple[int, ...] = (1, 10, 100)
    cases: tuple[Case, ...] = field(default_factory=lambda: (Case("alone", 4, 2, 3), Case("shared", 24, 1, 3)))
    spacing: float = 4.0  # seconds between two kills (and before the first), +-25 % at random
    range_seconds: float = 2.0  # what one range sleeps in all (its events share it)
    wait_back: float = 20.0  # after the last kill: how long lost work may take to come back


QUICK_PLAN = Plan(ranges=(10,), cases=(Case("alone", 4, 2, 1), Case("shared", 24, 1, 1)), spacing=2.5, wait_back=8.0)


class RecoveryNamespace(Namespace):
    """A benchmark namespace with settings of its own (the release window)."""

    def __init__(self, settings: Settings, tag: str, extra_env: dict[str, str]) -> None:
        super().__init__(settings, tag)
        self.extra_env = extra_env

    @property
    def env(self) -> dict[str, str]:
        return super().env | self.extra_env

    def stop(self) -> None:
        """Workers are killed (what they hold goes with the namespace; a SIGTERM would
        wait for their running ranges), the control plane stopped."""
        for p in self.procs:
            if p.poll() is None and p.args[3] == "worker":  # type: ignore[index]
                p.kill()
                p.wait()
        super().stop()


@dataclass
class Kill:
    at: float  # epoch seconds
    worker: str
    pid: int
    replacement: subprocess.Popen[bytes]
    lost: list[tuple[int, int, int]]  # (job, event number, attempt) Postgres had running under it
    consumers: dict[int, int | None]  # job -> consumers left on its queue right after the kill


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile, p in 0..100."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * p // 100)))
    return ordered[int(rank) - 1]


def summary(seconds: list[float], not_back: int = 0) -> dict[str, Any]:
    """Kill -> next attempt started, over lost events. One that never came back counts
    as the time waited for it (a lower bound), and is counted in ``not_back``."""
    if not seconds:
        return {"events_lost": 0, "p50_s": None, "p90_s": None, "max_s": None, "not_back": 0}
    return {
        "events_lost": len(seconds),
        "p50_s": round(percentile(seconds, 50), 3),
        "p90_s": round(percentile(seconds, 90), 3),
        "max_s": round(max(seconds), 3),
        "not_back": not_back,
    }


LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \S+: (.*)$")


def log_lines(path: Path, message: str) -> list[tuple[float, str]]:
    """(epoch seconds, line) of each line of a dispatcher log that has this message."""
    out: list[tuple[float, str]] = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if message in line and (m := LOG_LINE.match(line)):
                t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000  # local time
                out.append((t, m[3]))
    return out


def first_after(lines: list[tuple[float, str]], at: float, until: float, jobs: set[int], pattern: str) -> float | None:
    """Seconds from ``at`` to the first line after it (and before ``until``) that names one of ``jobs``."""
    for t, text in sorted(lines):
        if (
            at - 0.002 <= t < until
            and (m := re.search(pattern, text))
            and jobs & {int(j) for j in re.findall(r"\d+", m[1])}
        ):
            return round(t - at, 3)
    return None


async def _keys(ns: Namespace, sql: str, keys: list[tuple[int, int, int]]) -> list[Any]:
    return await ns.conn.fetch(  # type: ignore[no-any-return]
        sql,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )


KEYED = "JOIN unnest($1::bigint[], $2::bigint[], $3::int[]) AS k(j, n, a) ON a.job_id = k.j AND a.number = k.n"


async def _victim(
    ns: Namespace, workers: list[subprocess.Popen[bytes]], want: str
) -> tuple[subprocess.Popen[bytes], str] | None:
    """A live worker with events running, preferably one in the wanted case (alone: no
    other worker has events running in its jobs; shared: one has)."""
    ids = {r["pid"]: r["id"] for r in await ns.conn.fetch("SELECT id, pid FROM workers")}
    rows = await ns.conn.fetch(
        "SELECT worker, job_id, count(*) AS n FROM events WHERE status = 'running' GROUP BY 1, 2"
    )
    running: dict[str, dict[int, int]] = {}
    for r in rows:
        running.setdefault(r["worker"], {})[r["job_id"]] = r["n"]
    best = []
    for w in workers:
        wid = ids.get(w.pid)
        if w.poll() is not None or wid is None or not running.get(wid):
            continue
        jobs = running[wid]
        shared = any(j in theirs for other, theirs in running.items() if other != wid for j in jobs)
        best.append((("shared" if shared else "alone") == want, sum(jobs.values()), w, wid))
    if not best:
        return None
    best.sort(key=lambda b: (b[0], b[1]), reverse=True)
    return best[0][2], best[0][3]


async def one_case(settings: Settings, plan: Plan, case: Case, per_range: int) -> dict[str, Any]:
    event_seconds = plan.range_seconds / per_range
    env = {"DISPATCHER_RELEASE_WINDOW": str(case.release_window)}
    async with RecoveryNamespace(settings, f"rec{per_range}{case.name[0]}", env) as ns:
        broker = await Broker.connect(settings.amqp_url, Names(ns.prefix), client="bench-recovery")
        try:
            ns.start("start", "--no-monitor")
            workers = [ns.start("worker", *WORKER) for _ in range(2)]
            await ns.workers_ready(2)
            # work for every slot until the last kill's work is back (and a margin)
            seconds = (case.kills + 1) * plan.spacing + 10
            n_events = int(SLOTS * seconds / event_seconds * 1.3)
            n_events -= n_events % per_range
            label = {"payloadFunction": "tests.payloads:sleepy", "eventsPerRange": per_range, "numberOfRetries": 20}
            path = ns.workflow(
                label, n_events, payload=f"{event_seconds}:", maxEventsPerJob=case.ranges_per_job * per_range
            )
            await ns.submit(path)
            kills = await _kill(ns, broker, workers, plan, case)
            out = await _measure(ns, plan, case, kills) | {"events": n_events, "logs": str(ns.tmp)}
            if len(kills) < case.kills:  # nobody had anything running: say what the events were doing
                rows = await ns.conn.fetch("SELECT status, count(*) AS n FROM events GROUP BY 1 ORDER BY 1")
                out["events_by_status_at_end"] = {r["status"]: r["n"] for r in rows}
            return out
        finally:
            await broker.close()


async def _kill(
    ns: Namespace, broker: Broker, workers: list[subprocess.Popen[bytes]], plan: Plan, case: Case
) -> list[Kill]:
    kills: list[Kill] = []
    jitter = random.Random()
    await asyncio.sleep(plan.spacing * jitter.uniform(0.75, 1.25))
    deadline = time.monotonic() + case.kills * plan.spacing * 3
    while len(kills) < case.kills and time.monotonic() < deadline:
        found = await _victim(ns, workers, case.name)
        if found is None:  # between two jobs: nobody runs anything
            await asyncio.sleep(0.1)
            continue
        victim, vid = found
        lost = await ns.conn.fetch(
            "SELECT job_id, number, attempt FROM events WHERE worker = $1 AND status = 'running'", vid
        )
        at = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        replacement = ns.start("worker", *WORKER)
        workers.append(replacement)
        # the kernel closed its sockets: RabbitMQ requeued its ranges at once. Looked at
        # before the control plane's next round brings another worker, as a rule (the
        # kill log's announced_s says which jobs it announced)
        await asyncio.sleep(0.03)
        consumers = {}
        for job_id in sorted({r["job_id"] for r in lost}):
            state = await broker.queue_state(broker.names.job(job_id))
            consumers[job_id] = None if state is None else state[1]
        kills.append(Kill(at, vid, victim.pid, replacement, [tuple(r) for r in lost], consumers))
        if len(kills) < case.kills:
            await asyncio.sleep(plan.spacing * jitter.uniform(0.75, 1.25))
    return kills


async def _measure(ns: Namespace, plan: Plan, case: Case, kills: list[Kill]) -> dict[str, Any]:
    lost = [k for kill in kills for k in kill.lost]
    wait_until = time.time() + plan.wait_back
    nxt = [(j, n, a + 1) for j, n, a in lost]
    while time.time() < wait_until:
        started = await _keys(
            ns, f"SELECT count(*) FROM attempts a {KEYED} AND a.attempt = k.a WHERE a.started_at IS NOT NULL", nxt
        )
        if started[0][0] >= len(nxt):
            break
        await asyncio.sleep(0.2)
    waited = time.time()
    again = {
        (r["job_id"], r["number"], r["attempt"] - 1): r
        for r in await _keys(ns, f"SELECT a.* FROM attempts a {KEYED} AND a.attempt = k.a", nxt)
    }
    before = {
        (r["job_id"], r["number"], r["attempt"]): r
        for r in await _keys(ns, f"SELECT a.* FROM attempts a {KEYED} AND a.attempt = k.a", lost)
    }
    ids = {r["pid"]: r["id"] for r in await ns.conn.fetch("SELECT id, pid FROM workers")}
    announced = log_lines(ns.tmp / "start-0.log", "announcing jobs nobody consumes")
    delivered = [line for p in sorted(ns.tmp.glob("worker-*.log")) for line in log_lines(p, "range delivered again")]
    cases: dict[str, list[float]] = {"alone": [], "shared": []}
    not_back = {"alone": 0, "shared": 0}
    picked = {"surviving worker": 0, "replacement": 0}
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for i, kill in enumerate(kills):
        until = kills[i + 1].at if i + 1 < len(kills) else waited
        times, reported = [], 0
        for j, n, a in kill.lost:
            mine = before.get((j, n, a))
            if mine is not None and mine["status"] == "finished":
                reported += 1  # its end was on its way to Postgres at the kill: nothing lost
                continue
            case_of = "shared" if kill.consumers.get(j) else "alone"
            row = again.get((j, n, a))
            if row is None or row["started_at"] is None:
                back = waited - kill.at
                not_back[case_of] += 1
            else:
                back = row["started_at"].timestamp() - kill.at
                picked["replacement" if row["worker"] == ids.get(kill.replacement.pid) else "surviving worker"] += 1
            cases[case_of].append(back)
            times.append(back)
            events.append(
                {
                    "kill": i,
                    "job": j,
                    "number": n,
                    "attempt": a,
                    "case": case_of,
                    "back_s": round(back, 3),
                    "charged_s": None
                    if mine is None or mine["ended_at"] is None
                    else round(mine["ended_at"].timestamp() - kill.at, 3),
                    "next_worker": None if row is None else row["worker"],
                }
            )
        charged = [
            r["ended_at"].timestamp() - kill.at
            for (j, n, a) in kill.lost
            if (r := before.get((j, n, a))) is not None and r["status"] == "failed" and r["ended_at"] is not None
        ]
        jobs = set(kill.consumers)
        rows.append(
            {
                "at": datetime.fromtimestamp(kill.at, UTC).isoformat(timespec="milliseconds"),
                "worker": kill.worker,
                "jobs": {str(j): ("shared" if c else "alone") for j, c in kill.consumers.items()},
                "events_lost": len(times),
                "reported_just_before": reported,
                # kill -> the control plane announced the job (alone), a worker got a range
                # again, the bookkeeping charged the lost attempt, the first and last event back
                "announced_s": first_after(announced, kill.at, until, jobs, r"jobs=\[([\d, ]*)\]"),
                "delivered_again_s": first_after(delivered, kill.at, until, jobs, r"job=(\d+)"),
                "charged_s": round(min(charged), 3) if charged else None,
                "first_back_s": round(min(times), 3) if times else None,
                "last_back_s": round(max(times), 3) if times else None,
            }
        )
    # each lost event, for a closer look (the namespace's database is dropped)
    (ns.tmp / "recovery-events.json").write_text(json.dumps(events, indent=1))
    every = [t for ts in cases.values() for t in ts]
    kill_cases = {c: sum(1 for r in rows if c in r["jobs"].values()) for c in cases}
    return {
        "case": case.name,
        "ranges_per_job": case.ranges_per_job,
        "release_window": case.release_window,
        "kills": len(kills),
        **summary(every, sum(not_back.values())),
        "by_case": {c: summary(ts, not_back[c]) for c, ts in cases.items()},
        "back_on": picked,
        "kill_log": rows,
        "_seconds": every,
        "_by_case": cases,
        "_not_back": not_back,
        "_kill_cases": kill_cases,
        "_first_back": [r["first_back_s"] for r in rows if r["first_back_s"] is not None],
    }


def code_state() -> dict[str, Any]:
    """The commit measured, and product files changed since (others edit them meanwhile)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        changed = git("status", "--porcelain", "--", "dispatcher", "schemas", "workers").splitlines()
        return {"commit": git("rev-parse", "--short", "HEAD").strip(), "uncommitted": [c[3:] for c in changed]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


async def recovery(settings: Settings, quick: bool = False) -> dict[str, Any]:
    plan = QUICK_PLAN if quick else Plan()
    out: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "code": code_state(),
        "workers": 2,
        "worker_args": " ".join(WORKER),
        "seconds_per_range": plan.range_seconds,
        "spacing_s": plan.spacing,
        "target_p90_s": TARGET_P90_SECONDS,
    }
    t0 = time.perf_counter()
    for per_range in plan.ranges:
        runs = [await one_case(settings, plan, case, per_range) for case in plan.cases]
        every = [t for r in runs for t in r.pop("_seconds")]
        by_case = {c: [t for r in runs for t in r["_by_case"][c]] for c in ("alone", "shared")}
        not_back = {c: sum(r["_not_back"][c] for r in runs) for c in ("alone", "shared")}
        kill_cases = {c: sum(r["_kill_cases"][c] for r in runs) for c in ("alone", "shared")}
        first_back = [t for r in runs for t in r.pop("_first_back")]
        for r in runs:
            del r["_by_case"], r["_not_back"], r["_kill_cases"]
        size: dict[str, Any] = {
            "event_seconds": round(plan.range_seconds / per_range, 4),
            "kills": sum(r["kills"] for r in runs),
            **summary(every, sum(not_back.values())),
            "by_case": {c: {"kills": kill_cases[c]} | summary(by_case[c], not_back[c]) for c in by_case},
            # per kill, its first lost event back: the lost work under way again (the rest
            # of a range of n events follows it, one event after the other)
            "first_back_per_kill_max_s": max(first_back) if first_back else None,
        }
        size["p90_under_5s"] = size["p90_s"] is not None and size["p90_s"] < TARGET_P90_SECONDS
        size["runs"] = runs
        out[f"range_{per_range}"] = size
        brief = {k: v for k, v in size.items() if k != "runs"}
        print(f"  recovery, range size {per_range}: {json.dumps(brief)}", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    p90s = [p for r in plan.ranges if (p := out[f"range_{r}"]["p90_s"]) is not None]
    out["worst_p90_s"] = max(p90s) if p90s else None
    out["p90_under_5s_every_range_size"] = all(out[f"range_{r}"]["p90_under_5s"] for r in plan.ranges)
    return out


def _code(rec: dict[str, Any]) -> str:
    code = rec.get("code") or {}
    changed = code.get("uncommitted")
    return f"{code.get('commit')}" + (f" + {len(changed)} product files uncommitted" if changed else "")


def markdown(report: dict[str, Any]) -> str:
    """The recovery section of report.md ('' if the report has none)."""
    rec = report.get("recovery")
    if not rec:
        return ""
    sizes = sorted(int(k.split("_")[1]) for k in rec if k.startswith("range_"))
    lines = [
        "",
        f"**6. Recovery after SIGKILL** ({rec['date']}, {rec['seconds']} s, code {_code(rec)}). One control "
        f"plane, 2 workers (`dispatcher worker {rec['worker_args']}`), async sleeps of {rec['seconds_per_range']} s "
        f"per range (its events share it); a worker SIGKILLed every {rec['spacing_s']} s +-25 %, a replacement "
        "started right after. Lost: the events Postgres had `running` under the killed worker (those running, and "
        "those of its ranges run but not yet reported); back: their next attempt started. *alone*: nobody else "
        "consumed the job's queue (the control plane announces the job); *shared*: another worker did (RabbitMQ "
        "delivers the ranges to it). Seconds from the kill; a lost range's events run again one after the other, "
        "so its last event starts up to a range's time after its first (the last column: the first event back, "
        "worst kill).",
        "",
    ]
    rows = []
    for s in sizes:
        r = rec[f"range_{s}"]
        a, sh = r["by_case"]["alone"], r["by_case"]["shared"]
        rows.append(
            [
                s,
                r["kills"],
                r["events_lost"],
                r["p50_s"],
                r["p90_s"],
                r["max_s"],
                f"{a.get('kills')} / {a['events_lost']} / {a['p90_s']}",
                f"{sh.get('kills')} / {sh['events_lost']} / {sh['p90_s']}",
                r.get("first_back_per_kill_max_s"),
                "yes" if r["p90_under_5s"] else "no",
            ]
        )
    header = [
        "range size",
        "kills",
        "events lost",
        "p50 s",
        "p90 s",
        "max s",
        "alone: kills / lost / p90 s",
        "shared: kills / lost / p90 s",
        "first back, worst kill s",
        "p90 < 5 s",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    result = asyncio.run(recovery(Settings.from_env(), "--quick" in sys.argv))
    print(json.dumps(result, indent=2, default=str))
