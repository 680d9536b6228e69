"""One worker alone against RabbitMQ: its CPU per event, without the control plane.

    python -m benchmarks.worker_alone [--events N] [--per-range K] [--slots S] [--prefetch P] [--profile]

Publishes one job's ranges of no-op events straight to a job queue, runs a worker in
this process until every event is reported, and prints events/s and CPU µs per event
(this process only). --profile prints the top of a cProfile run. For finding where a
worker's time goes; the statuses it sends are left unread and deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
import uuid
from pathlib import Path

from dispatcher.config import Names, Settings
from schemas.messages import EventRange, EventSpec, JobAnnouncement, PayloadSpec, encode
from transport.rabbitmq import Broker
from workers.worker import Worker


async def main(events: int, per_range: int, slots: int, prefetch: int | None, profile: bool) -> None:
    settings = Settings.from_env()
    names = Names(f"alone{uuid.uuid4().hex[:6]}.")
    broker = await Broker.connect(settings.amqp_url, names, client="bench-worker-alone")
    await broker.declare_topology()
    queue = names.job(1)
    await broker.declare_job_queue(queue)
    ranges = [
        EventRange(
            workflow_id=1,
            job_id=1,
            events=[EventSpec(number=n, payload=f"x{n}") for n in range(start, min(start + per_range, events))],
        )
        for start in range(0, events, per_range)
    ]
    for start in range(0, len(ranges), 500):
        await broker.publish_many((queue, encode(r)) for r in ranges[start : start + 500])
    spec = JobAnnouncement(
        workflow_id=1,
        task_id=1,
        job_id=1,
        label="bench",
        payload=PayloadSpec(function="benchmarks.payloads:noop"),
    )
    await broker.publish(names.jobs, encode(spec))
    tmp = Path(tempfile.mkdtemp(prefix="es-alone-"))
    worker = Worker(broker, slots=slots, prefetch=prefetch, work_dir=tmp / "work", log_dir=tmp / "logs")
    stop = asyncio.Event()
    prof = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof:
        prof.enable()
    run = asyncio.create_task(worker.run(stop))
    while worker.events_done < events:
        await asyncio.sleep(0.01)
    while worker.jobs:  # the job drained and its acks sent
        await asyncio.sleep(0.001)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof:
        prof.disable()
    stop.set()
    await run
    print(
        f"{events} events, ranges of {per_range}, {slots} slots: {events / seconds:.0f} events/s, "
        f"{cpu / events * 1e6:.1f} µs CPU per event"
    )
    if prof:  # before the clean-up, which may fail
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "25")))
    await broker.delete_queue(queue)
    await broker.delete_topology()
    await broker.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--per-range", type=int, default=10)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--prefetch", type=int, help="ranges held at once (default: one per slot)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.per_range, args.slots, args.prefetch, args.profile))
