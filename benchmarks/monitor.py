"""Benchmark: the monitor's job page and API on a database with 1,000,000 events.

    python -m benchmarks.monitor [--events 1000000] [--per-job 100000] [--runs 7] [--keep] [--out DIR]

Creates its own database (dropped afterwards unless --keep), submits one task of N events
in jobs of --per-job events (so a job holds 100,000 events), sets a realistic mix of
states, then times each request in-process (ASGI, no network) and reports the median and
the worst of --runs runs. Writes benchmarks/results/monitor.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks.scratch import scratch_database
from dispatcher.config import DEFAULT_DATABASE_URL, Settings
from dispatcher.monitor import MonitorConfig, create_app
from dispatcher.store import Store
from dispatcher.submit import submit

RESULTS = Path(__file__).parent / "results"

# the counts as they were read before the bookkeeping kept counters: for comparison
BEFORE = [
    (
        "before counters: a workflow's counts (GROUP BY)",
        "SELECT task_id, status, count(*) FROM events WHERE task_id IN (SELECT id FROM tasks WHERE workflow_id = $1)"
        " GROUP BY task_id, status",
        True,
    ),
    (
        "before counters: the list's counts (GROUP BY)",
        "SELECT w.id, (SELECT jsonb_object_agg(c.status, c.n) FROM (SELECT e.status, count(*) AS n FROM events e"
        " WHERE e.task_id IN (SELECT id FROM tasks WHERE workflow_id = w.id) GROUP BY e.status) c)"
        " FROM workflows w ORDER BY w.id DESC LIMIT 50",
        False,
    ),
]


def write_inputs(folder: Path, events: int, per_job: int) -> Path:
    mapping = folder / "mapping.json"
    with mapping.open("w") as f:
        f.write('{"big": {')
        f.write(",".join(f'"{i}": "payload_{i}"' for i in range(events)))
        f.write("}}")
    workflow = folder / "wf.yaml"
    workflow.write_text(
        f"name: monitor-bench\nenableEventService: big\nmaxEventsPerJob: {per_job}\n"
        "mapping: mapping.json\npipetask:\n  big:\n    payloadFunction: 'tests.payloads:noop'\n"
    )
    return workflow


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--per-job", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--admin-dsn", default=Settings.from_env().database_url or DEFAULT_DATABASE_URL)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where monitor.json and monitor.md go")
    args = parser.parse_args()

    async with scratch_database(args.admin_dsn, keep=args.keep) as dsn:
        store = await Store.connect(dsn)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            wf = await submit(store, write_inputs(Path(tmp), args.events, args.per_job))
            submit_s = time.perf_counter() - t0
        # a realistic mix: most finished, some running, a few failed, the rest queued
        await store.pool.execute("UPDATE tasks SET status = 'running'; UPDATE jobs SET status = 'running'")
        await store.pool.execute(
            "UPDATE events SET status = CASE WHEN number % 1000 = 7 THEN 'failed' WHEN number % 10 < 7 THEN 'finished'"
            " WHEN number % 10 = 7 THEN 'running' ELSE 'queued' END, attempt = 1, worker = 'w1',"
            " started_at = now(), ended_at = now(), error = CASE WHEN number % 1000 = 7 THEN 'boom' END"
        )
        job = await store.pool.fetchval("SELECT max(id) FROM jobs")
        task = await store.pool.fetchval("SELECT id FROM tasks")
        # an attempt for each event that ran (the durations' counters follow), and a
        # sample of the counts every 2 s over an hour's run (the progress pictures)
        await store.pool.execute(
            "INSERT INTO attempts (job_id, number, attempt, status, worker, started_at, ended_at)"
            " SELECT job_id, number, 1, CASE WHEN status = 'running' THEN 'running' ELSE status END, 'w1',"
            " now() - interval '1 hour' + number * interval '3 ms',"
            " CASE WHEN status = 'running' THEN NULL"
            " ELSE now() - interval '1 hour' + number * interval '3 ms' + (number % 97) * interval '11 ms' END"
            " FROM events WHERE status IN ('finished', 'failed', 'running')"
        )
        await store.pool.execute(
            "INSERT INTO event_count_samples (task_id, at, counts)"
            " SELECT $1, now() - interval '1 hour' + i * interval '2 s',"
            " jsonb_build_object('finished', i * $2 / 1800, 'queued', $2 - i * $2 / 1800)"
            " FROM generate_series(0, 1799) i",
            task,
            args.events,
        )
        await store.compact_event_counts()
        await store.pool.execute("VACUUM ANALYZE events")
        await store.pool.execute("VACUUM ANALYZE attempts")
        deep = args.per_job * (args.events // args.per_job - 1) + args.per_job - 200
        requests = {
            "workflows list (HTML)": "/",
            "workflow page (HTML, counts, pictures, jobs)": f"/workflows/{wf}",
            "task page (HTML, counts, pictures, events)": f"/tasks/{task}",
            "job page (HTML, first 100 events)": f"/jobs/{job}",
            "job page (HTML, deep page)": f"/jobs/{job}?after={deep}",
            "job page (HTML, only failed)": f"/jobs/{job}?status=failed",
            "API job events (first 100)": f"/api/jobs/{job}/events",
            "API job events (deep page)": f"/api/jobs/{job}/events?after={deep}",
            "API job events (running, 1000)": f"/api/jobs/{job}/events?status=running&limit=1000",
            "API job detail (counts)": f"/api/jobs/{job}",
            "API task events (first 100)": f"/api/tasks/{task}/events",
            "API workflow (tasks, counts, jobs)": f"/api/workflows/{wf}",
            "API workflows list": "/api/workflows",
            "API dead letters": "/api/dlq",
            "metrics": "/metrics",
        }
        app = create_app(store, None, MonitorConfig())
        rows = []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            for label, url in requests.items():
                times = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    r = await client.get(url)
                    times.append((time.perf_counter() - t0) * 1000)
                    r.raise_for_status()
                rows.append(
                    {
                        "request": label,
                        "url": url,
                        "median_ms": round(statistics.median(times), 1),
                        "max_ms": round(max(times), 1),
                    }
                )
                print(f"{label:<40} median {statistics.median(times):8.1f} ms   max {max(times):8.1f} ms")
        # what the counts cost before the counters (migration 0011), in the same run
        for label, sql, arg in BEFORE:
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                await store.pool.fetch(sql, *([wf] if arg else []))
                times.append((time.perf_counter() - t0) * 1000)
            median, worst = round(statistics.median(times), 1), round(max(times), 1)
            rows.append({"request": label, "url": "", "median_ms": median, "max_ms": worst})
            print(f"{label:<40} median {statistics.median(times):8.1f} ms   max {max(times):8.1f} ms")
        await store.close()
        report = {
            "benchmark": "monitor",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
            "events": args.events,
            "events_per_job": args.per_job,
            "runs": args.runs,
            "submit_seconds": round(submit_s, 1),
            "results": rows,
        }
        out: Path = args.out
        out.mkdir(exist_ok=True)
        (out / "monitor.json").write_text(json.dumps(report, indent=2))
        lines = [
            f"Monitor on {args.events:,} events ({args.per_job:,} per job), {report['date']}, "
            f"{report['machine']}; median of {args.runs} runs, in-process ASGI.",
            "",
            "| request | median ms | max ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['request']} | {r['median_ms']} | {r['max_ms']} |" for r in rows]
        (out / "monitor.md").write_text("\n".join(lines) + "\n")
        print(f"submitted {args.events:,} events in {submit_s:.1f} s; report in {out}/monitor.md")


if __name__ == "__main__":
    asyncio.run(main())
