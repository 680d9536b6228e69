"""Benchmark: the monitor's job page and API on a database with 1,000,000 events.

    python -m benchmarks.monitor [--events 1000000] [--per-job 100000] [--runs 7] [--keep]

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
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

from dispatcher import migrate
from dispatcher.config import DEFAULT_DATABASE_URL, Settings
from dispatcher.monitor import MonitorConfig, create_app
from dispatcher.store import Store
from dispatcher.submit import submit

RESULTS = Path(__file__).parent / "results"


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
    args = parser.parse_args()

    name = f"es_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    try:
        conn = await asyncpg.connect(dsn)
        await migrate.upgrade(conn)
        await conn.close()
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
        await store.pool.execute("VACUUM ANALYZE events")
        job = await store.pool.fetchval("SELECT max(id) FROM jobs")
        task = await store.pool.fetchval("SELECT id FROM tasks")
        deep = args.per_job * (args.events // args.per_job - 1) + args.per_job - 200
        requests = {
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
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as client:
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
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "monitor.json").write_text(json.dumps(report, indent=2))
        lines = [
            f"Monitor on {args.events:,} events ({args.per_job:,} per job), {report['date']}, "
            f"{report['machine']}; median of {args.runs} runs, in-process ASGI.",
            "",
            "| request | median ms | max ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['request']} | {r['median_ms']} | {r['max_ms']} |" for r in rows]
        (RESULTS / "monitor.md").write_text("\n".join(lines) + "\n")
        print(f"submitted {args.events:,} events in {submit_s:.1f} s; report in {RESULTS}/monitor.md")
    finally:
        if not args.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
