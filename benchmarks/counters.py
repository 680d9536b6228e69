"""Benchmark: what the counters' triggers (migration 0011) cost the bookkeeping.

    python -m benchmarks.counters [--events 20000] [--batch 100] [--rounds 3]

Each run gets a database of its own with one job of --events events, and applies status
reports to it through ``Store.apply`` in batches of --batch, as the bookkeeper does: each
event reported running, then finished. The same is run with the count triggers disabled
(events' and attempts'), with only one of the two kinds, and with both; rounds are
interleaved with the order rotated. Prints the median wall time per report applied.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from benchmarks.monitor import write_inputs
from benchmarks.scratch import scratch_database
from dispatcher.config import DEFAULT_DATABASE_URL, Settings
from dispatcher.store import Store
from dispatcher.submit import submit
from schemas.messages import StatusUpdate

TRIGGERS = {
    "events": ("events", ["events_count_added", "events_count_removed", "events_count_changed"]),
    "attempts": ("attempts", ["attempts_count_added", "attempts_count_removed", "attempts_count_changed"]),
}
SETUPS = {  # the triggers left enabled
    "no counters": (),
    "event counts only": ("events",),
    "durations only": ("attempts",),
    "both (the product)": ("events", "attempts"),
}


async def run_once(admin_dsn: str, enabled: tuple[str, ...], events: int, batch: int) -> float:
    """Microseconds of wall time per status report applied."""
    async with scratch_database(admin_dsn) as dsn:
        store = await Store.connect(dsn)
        with tempfile.TemporaryDirectory() as tmp:
            await submit(store, write_inputs(Path(tmp), events, events))
        await store.release_ready_tasks()
        [job] = await store.claim_jobs(10)
        await store.mark_jobs_queued([job])
        for kind, (table, names) in TRIGGERS.items():
            if kind not in enabled:
                for trigger in names:
                    await store.pool.execute(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
        numbers = [r["number"] for r in await store.job_events(job)]
        t0 = datetime.now(UTC)
        elapsed = 0.0
        for status in ("running", "finished"):
            for i in range(0, len(numbers), batch):
                reports = [
                    StatusUpdate(
                        job_id=job,
                        number=n,
                        attempt=1,
                        status=status,
                        worker="w1",
                        started_at=t0,
                        ended_at=None if status == "running" else t0 + timedelta(milliseconds=5),
                    )
                    for n in numbers[i : i + batch]
                ]
                start = time.perf_counter()
                await store.apply(reports)
                elapsed += time.perf_counter() - start
        await store.close()
        return elapsed / (2 * len(numbers)) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--admin-dsn", default=Settings.from_env().database_url or DEFAULT_DATABASE_URL)
    args = parser.parse_args()
    names = list(SETUPS)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(await run_once(args.admin_dsn, SETUPS[name], args.events, args.batch))
    base = statistics.median(times["no counters"])
    for name in names:
        median = statistics.median(times[name])
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"{name:<20} {median:6.1f} µs per report ({median - base:+.1f})   runs: {runs}")


if __name__ == "__main__":
    asyncio.run(main())
