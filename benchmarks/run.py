"""Benchmarks: the overhead claim, side by side with the alternatives.

    python -m benchmarks.run [--quick] [--runs N] [--only NAME,...] [--full]

Runs against the local RabbitMQ and Postgres (DISPATCHER_AMQP_URL, DISPATCHER_DATABASE_URL),
each scenario in a database and a queue prefix of its own, with the real CLI as
subprocesses (`dispatcher start`, `dispatcher worker`, `dispatcher submit`). Figures are
medians of --runs runs; comparisons are ratios measured in the same run. Writes
benchmarks/results/report.json and report.md. --quick shrinks every scenario (the test
suite runs it so the benchmark cannot rot); --full runs scenario 3 without EventService on
all 1,000 payloads (about 20 minutes) instead of 100.

Scenarios:
  throughput    100,000 no-op events, 2 workers, range sizes 1, 10, 100, full bookkeeping;
                and the raw broker limit (aio-pika publish with confirms, consume + ack)
  celery        the same no-op payloads as Celery tasks, 2 worker processes, acks late
  eventservice  payloads of 50 ms, job set-up 2 s and a log upload (0.5 s) per job:
                jobs of 36 events against one payload per job
  latency       submit -> first event running; event done -> recorded in Postgres
  scale         submit 1,000,000 events: time and peak memory of `dispatcher submit`,
                and of the control plane while it releases them
  recovery      a worker SIGKILLed again and again: seconds until its lost events run
                again, range sizes 1, 10, 100 (benchmarks/recovery.py)

--merge keeps the other sections of the report already in --out: `--only recovery
--merge` adds the recovery section to the last full report instead of replacing it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from benchmarks.report import markdown, plot
from dispatcher import migrate
from dispatcher.config import Settings
from schemas.joblog import job_commands

ROOT = Path(__file__).resolve().parent.parent
# workers for no-op payloads: 4 slots, and 512 ranges held, so that slots never wait for
# an ack to get their next range and a status batch is shared by many (the setting the
# README gives for payloads of ms)
NOOP_WORKER = ("--slots", "4", "--prefetch", "512")
RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent


@dataclass
class Sizes:
    throughput: int = 100_000
    celery: int = 100_000
    es_payloads: int = 1000
    non_es_payloads: int = 100
    setup_seconds: float = 2.0
    upload_seconds: float = 0.5
    latency: int = 2000
    scale: int = 1_000_000
    cluster: int = 50_000


QUICK = Sizes(
    throughput=2000,
    celery=2000,
    es_payloads=72,
    non_es_payloads=8,
    setup_seconds=0.2,
    upload_seconds=0.05,
    latency=300,
    scale=20_000,
    cluster=2000,
)


class Namespace:
    """A database and a queue prefix of its own, and the CLI processes run in them."""

    def __init__(self, settings: Settings, tag: str) -> None:
        self.base = settings
        self.db = f"es_bench_{tag}_{uuid.uuid4().hex[:6]}"
        self.dsn = settings.database_url.rsplit("/", 1)[0] + f"/{self.db}"
        self.prefix = f"bench{uuid.uuid4().hex[:6]}."
        self.tmp = Path(tempfile.mkdtemp(prefix="es-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=str(ROOT),
            DISPATCHER_AMQP_URL=self.base.amqp_url,
            DISPATCHER_QUEUE_TYPE=self.base.queue_type,
            DISPATCHER_DATABASE_URL=self.dsn,
            DISPATCHER_QUEUE_PREFIX=self.prefix,
            DISPATCHER_WORK_DIR=str(self.tmp / "work"),
            DISPATCHER_LOG_DIR=str(self.tmp / "logs"),
        )

    async def __aenter__(self) -> Namespace:
        admin = await asyncpg.connect(self.base.database_url)
        await admin.execute(f'CREATE DATABASE "{self.db}"')
        await admin.close()
        conn = await asyncpg.connect(self.dsn)
        await migrate.upgrade(conn)
        await conn.close()
        self.conn = await asyncpg.connect(self.dsn)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        job_ids = [r["id"] for r in await self.conn.fetch("SELECT id FROM jobs")]
        await self.conn.close()
        admin = await asyncpg.connect(self.base.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        await admin.close()
        await delete_queues(self.base.amqp_url, self.prefix, job_ids)

    def start(self, *args: str, amqp_url: str | None = None) -> subprocess.Popen[bytes]:
        """A CLI process; ``amqp_url``: its own (a cluster's nodes in another order)."""
        log = (self.tmp / f"{args[0]}-{len(self.procs)}.log").open("wb")
        env = self.env | ({"DISPATCHER_AMQP_URL": amqp_url} if amqp_url else {})
        proc = subprocess.Popen(
            [str(BIN / "dispatcher"), "--log-level", "WARNING", *args], env=env, stdout=log, stderr=log
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()

    def workflow(self, label_settings: dict[str, Any], events: int, payload: str = "x", **top: Any) -> Path:
        mapping = self.tmp / f"mapping-{events}.json"
        if not mapping.exists():
            with mapping.open("w") as f:  # written as it goes: this process stays small
                f.write('{"bench": {')
                for start in range(0, events, 10_000):
                    f.write("," if start else "")
                    f.write(",".join(f'"{i}": "{payload}{i}"' for i in range(start, min(start + 10_000, events))))
                f.write("}}")
        spec = {
            "name": "bench",
            "mapping": str(mapping),
            "enableEventService": "bench",
            **top,
            "pipetask": {"bench": label_settings},
        }
        path = self.tmp / f"wf-{uuid.uuid4().hex[:6]}.json"  # JSON is YAML
        path.write_text(json.dumps(spec))
        return path

    async def workers_ready(self, n: int) -> None:
        """Wait until n workers have said they are live: the clock starts with them up,
        as in production (and as for Celery's workers)."""
        while await self.conn.fetchval("SELECT count(*) FROM workers WHERE status = 'live'") < n:
            await asyncio.sleep(0.05)

    async def submit(self, path: Path) -> tuple[int, float]:
        """(workflow id, wall-clock time the submission started). ``submit_returned`` is
        when it printed the workflow id, right after its commit: the process takes some
        tens of milliseconds more to exit, and by then the first events may have run."""
        t0 = time.time()
        proc = subprocess.Popen(
            [str(BIN / "dispatcher"), "submit", str(path)], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()  # click.echo flushes it
        self.submit_returned = time.time()
        _, err = proc.communicate()
        if proc.returncode or not line.strip():
            raise RuntimeError(f"dispatcher submit failed ({proc.returncode}): {err.decode()[-2000:]}")
        return int(line.decode().strip()), t0

    async def finished(self, wf: int, timeout: float = 3600) -> datetime:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = await self.conn.fetchrow("SELECT status, finished_at FROM workflows WHERE id = $1", wf)
            if row["status"] != "running":
                if row["status"] != "finished":
                    raise RuntimeError(f"workflow {wf} ended {row['status']}; logs in {self.tmp}")
                return row["finished_at"]  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)
        raise TimeoutError(f"workflow {wf} did not finish in {timeout} s; logs in {self.tmp}")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_by_role(procs: list[subprocess.Popen[bytes]]) -> dict[str, float]:
    """CPU seconds used so far by our processes, RabbitMQ and Postgres (every backend)."""
    out: dict[str, float] = {}
    for p in procs:
        role = "control_plane" if p.args[3] == "start" else str(p.args[3])  # type: ignore[index]
        out[role] = out.get(role, 0.0) + cpu_seconds(p.pid)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        role = {"beam.smp": "rabbitmq", "postgres": "postgres"}.get(comm)
        if role:
            out[role] = out.get(role, 0.0) + cpu_seconds(int(pid))
    return out


def cpu_us_per_event(before: dict[str, float], after: dict[str, float], events: int) -> dict[str, float]:
    """Microseconds of CPU per event, by process role, between two cpu_by_role snapshots."""
    return {role: round((after[role] - before.get(role, 0.0)) / events * 1e6, 1) for role in sorted(after)}


async def delete_queues(url: str, prefix: str, job_ids: list[int]) -> None:
    """Every queue of the namespace: job queues too (a quorum queue left behind costs
    RabbitMQ memory and start-up time)."""
    from dispatcher.config import Names
    from transport.rabbitmq import Broker

    broker = await Broker.connect(url, Names(prefix), client="bench-cleanup")
    try:
        for job_id in job_ids:
            await broker.delete_queue(broker.names.job(job_id))
        await broker.delete_topology()
    finally:
        await broker.close()


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


async def repeat(runs: int, once: Callable[[], Awaitable[dict[str, float]]]) -> dict[str, Any]:
    samples = [await once() for _ in range(runs)]
    return {key: median([s[key] for s in samples]) for key in samples[0]} | {"runs": runs}


# -- scenario 1 ------------------------------------------------------------------------


async def raw_broker(url: str, n: int) -> dict[str, float]:
    """aio-pika alone: publish n messages with confirms (pipelined), then consume + ack."""
    conn = await aio_pika.connect(url)
    ch = await conn.channel(publisher_confirms=True)
    name = f"bench.raw.{uuid.uuid4().hex[:6]}"
    queue = await ch.declare_queue(name, durable=True)
    body = b'{"v":1,"kind":"range","workflow_id":1,"job_id":1,"events":[{"number":1,"payload":"x1","attempt":1}]}'
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        await asyncio.gather(
            *(
                ch.default_exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=name)
                for _ in range(min(1000, n - start))
            )
        )
    publish = n / (time.perf_counter() - t0)
    cch = await conn.channel()
    await cch.set_qos(prefetch_count=1000)
    cqueue = await cch.get_queue(name)
    done = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal count
        await message.ack()
        count += 1
        if count == n and not done.done():
            done.set_result(None)

    t0 = time.perf_counter()
    await cqueue.consume(on_message)
    await done
    consume = n / (time.perf_counter() - t0)
    await ch.queue_delete(name)
    await conn.close()
    del queue
    return {"publish_per_s": round(publish), "consume_ack_per_s": round(consume)}


async def throughput_once(settings: Settings, events: int, per_range: int) -> dict[str, float]:
    """One run: no-op events through one control plane and two workers, submit to finished."""
    async with Namespace(settings, "tp") as ns:
        ns.start("start", "--no-monitor")
        ns.start("worker", *NOOP_WORKER)
        ns.start("worker", *NOOP_WORKER)
        wf_file = ns.workflow(
            {"payloadFunction": "benchmarks.payloads:noop"}, events, maxEventsPerJob=1000, eventsPerRange=per_range
        )
        await ns.workers_ready(2)
        cpu0 = cpu_by_role(ns.procs)
        wf, t0 = await ns.submit(wf_file)
        end = await ns.finished(wf)
        cpu = cpu_us_per_event(cpu0, cpu_by_role(ns.procs), events)
        seconds = end.timestamp() - t0
        return {"seconds": round(seconds, 2), "events_per_s": round(events / seconds)} | {
            f"cpu_us_per_event_{role}": us for role, us in cpu.items()
        }


async def throughput(settings: Settings, sizes: Sizes, runs: int, ranges: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"events": sizes.throughput, "workers": 2, "worker_args": " ".join(NOOP_WORKER)}
    for per_range in ranges:
        out[f"range_{per_range}"] = await repeat(runs, partial(throughput_once, settings, sizes.throughput, per_range))
        print(f"  throughput, range size {per_range}: {out[f'range_{per_range}']}", flush=True)
    out["raw_broker"] = await repeat(runs, lambda: raw_broker(settings.amqp_url, sizes.throughput))
    for per_range in ranges:
        r = out[f"range_{per_range}"]
        r["fraction_of_raw_publish"] = round(r["events_per_s"] / out["raw_broker"]["publish_per_s"], 3)
        r["fraction_of_raw_consume"] = round(r["events_per_s"] / out["raw_broker"]["consume_ack_per_s"], 3)
    return out


# -- scenario 2 ------------------------------------------------------------------------


def celery_worker(app: str, queue: str, i: int) -> list[str]:
    """The command of Celery worker ``i`` of two on ``queue`` (solo pool: one process, no
    gossip, mingle or heartbeat chatter), shared with the peers benchmark."""
    return [
        str(BIN / "celery"),
        "-A",
        app,
        "worker",
        "--pool",
        "solo",
        "-Q",
        queue,
        "-l",
        "warning",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"w{i}-{queue}@%h",
    ]


async def celery(settings: Settings, sizes: Sizes, runs: int, ours_per_s: float | None) -> dict[str, Any]:
    try:
        import celery as _  # noqa: F401
    except ImportError:
        return {"skipped": "celery is not installed (pip install -e '.[bench]')"}

    async def once() -> dict[str, float]:
        queue = f"bench.celery.{uuid.uuid4().hex[:6]}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), BENCH_CELERY_QUEUE=queue, BENCH_CELERY_BROKER=settings.amqp_url)
        tmp = Path(tempfile.mkdtemp(prefix="es-bench-celery-"))
        workers = [
            subprocess.Popen(
                celery_worker("benchmarks.celery_app", queue, i),
                env=env,
                stdout=(tmp / f"w{i}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            for i in range(2)
        ]
        try:
            conn = await aio_pika.connect(settings.amqp_url)
            ch = await conn.channel()
            # both workers consuming before the clock starts
            for _ in range(200):
                q = await ch.declare_queue(queue, durable=True, passive=False)
                if q.declaration_result.consumer_count >= 2:
                    break
                await asyncio.sleep(0.1)
            code = (
                "import os, sys, time; sys.path.insert(0, os.environ['PYTHONPATH']);"
                "from benchmarks.celery_app import noop;"
                f"[noop.apply_async(('x',), queue='{queue}') for _ in range({sizes.celery})]"
            )
            t0 = time.time()
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
            # done when the queue is empty (the workers' last prefetched tasks may still be
            # unacked then: in Celery's favour)
            while True:
                q = await ch.declare_queue(queue, durable=True, passive=True)
                if q.declaration_result.message_count == 0:
                    break
                await asyncio.sleep(0.02)
            seconds = time.time() - t0
            await conn.close()
            return {"seconds": round(seconds, 2), "tasks_per_s": round(sizes.celery / seconds)}
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    w.kill()
            # deleted once its workers are gone: a Celery worker whose queue is deleted
            # under it declares it again (13 such queues were left behind)
            with contextlib.suppress(Exception):
                cleanup = await aio_pika.connect(settings.amqp_url)
                await (await cleanup.channel()).queue_delete(queue)
                await cleanup.close()

    out: dict[str, Any] = {"tasks": sizes.celery, "workers": 2, "acks_late": True, "results": "ignored"}
    out |= await repeat(runs, once)
    # ours at range size 1 from the same run, with its full bookkeeping
    if ours_per_s:
        out["ratio_ours_range1_to_celery"] = round(ours_per_s / out["tasks_per_s"], 2)
    return out


# -- scenario 3 ------------------------------------------------------------------------


def covered(spans: list[tuple[float, float]], since: float) -> float:
    """Seconds after ``since`` covered by at least one of ``spans``."""
    total, reach = 0.0, since
    for start, end in sorted(spans):
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total


async def eventservice(settings: Settings, sizes: Sizes, runs: int, full: bool) -> dict[str, Any]:
    def label(es: bool) -> dict[str, Any]:
        return {
            "payloadFunction": "benchmarks.payloads:sleep50",
            "jobSetupCommand": f"sleep {sizes.setup_seconds}",
            "jobTeardownCommand": f"sleep {sizes.upload_seconds}",
        }

    async def once(es: bool, payloads: int) -> dict[str, float]:
        async with Namespace(settings, "es") as ns:
            ns.start("start", "--no-monitor")
            # one range held beyond the running one: no ack round trip between events
            ns.start("worker", "--slots", "1", "--prefetch", "2")
            ns.start("worker", "--slots", "1", "--prefetch", "2")
            top = {"maxEventsPerJob": 36} if es else {"enableEventService": False}
            await ns.workers_ready(2)
            wf, t0 = await ns.submit(ns.workflow(label(es), payloads, **top))
            end = await ns.finished(wf)
            # a worker appends its part of a job's log when it leaves the job, after the
            # log upload (the tear-down): the last uploads end after the workflow is
            # finished, so the wall runs until the last log is in place (from the
            # committed workflow: the dispatcher's part)
            while await ns.conn.fetchval("SELECT count(*) FROM jobs WHERE log_path IS NULL"):
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            logs = list((ns.tmp / "logs").rglob("*.log"))
            wall = max(p.stat().st_mtime for p in logs) - ns.submit_returned
            commands = [c for p in logs for c in job_commands(p.read_text())]
            setups = sum(1 for c in commands if c.what == "set-up")
            rows = await ns.conn.fetch("SELECT worker, started_at, ended_at FROM attempts")
            busy: dict[str, list[tuple[float, float]]] = {}
            for r in rows:
                busy.setdefault(r["worker"], []).append((r["started_at"].timestamp(), r["ended_at"].timestamp()))
            for c in commands:
                busy.setdefault(c.worker, []).append((c.start, c.end))
            # each worker's time: payloads, job set-ups and uploads (one job's upload may
            # run during the next one's set-up: counted once), and the rest, the overhead
            idle = sum(wall - covered(spans, ns.submit_returned) for spans in busy.values())
            # nominal: a payload's 50 ms and a command's 2 s or 0.5 s; what they took
            # beyond that (asyncio wakes a sleep up to a ms late; a `sleep` process starts
            # in a few ms) counts as overhead too, as in the formula
            late = sum((r["ended_at"] - r["started_at"]).total_seconds() - 0.05 for r in rows)
            nominal = {"set-up": sizes.setup_seconds, "tear-down": sizes.upload_seconds}
            late += sum(c.end - c.start - nominal[c.what] for c in commands)
            overhead = (idle + late) / payloads
            overhead_measured = idle / payloads
            measured = sum((r["ended_at"] - r["started_at"]).total_seconds() for r in rows)
            return {
                "wall_s": round(wall, 2),
                "finished_s": round(end.timestamp() - ns.submit_returned, 2),
                "wall_with_submit_s": round(end.timestamp() - t0, 2),
                "jobs_set_up": setups,
                "dispatch_overhead_ms_per_event": round(overhead * 1000, 3),
                "payload_ms_measured": round(measured / len(rows) * 1000, 2),
                "dispatch_overhead_ms_per_event_measured_payload": round(overhead_measured * 1000, 3),
                "wall_per_event_s": round(wall / payloads, 4),
            }

    with_es = await repeat(runs, lambda: once(True, sizes.es_payloads))
    n_without = sizes.es_payloads if full else sizes.non_es_payloads
    without = await repeat(1 if not full else runs, lambda: once(False, n_without))
    return {
        "payload_seconds": 0.05,
        "setup_seconds": sizes.setup_seconds,
        "log_upload_seconds": sizes.upload_seconds,
        "workers": 2,
        "with_eventservice": {"payloads": sizes.es_payloads, "events_per_job": 36, **with_es},
        "one_payload_per_job": {"payloads": n_without, **without},
        "speedup_wall_per_event": round(without["wall_per_event_s"] / with_es["wall_per_event_s"], 1),
    }


# -- scenario 4 ------------------------------------------------------------------------


async def latency(settings: Settings, sizes: Sizes, runs: int) -> dict[str, Any]:
    async def once() -> dict[str, float]:
        async with Namespace(settings, "lat") as ns:
            ns.start("start", "--no-monitor")
            ns.start("worker", *NOOP_WORKER)
            ns.start("worker", *NOOP_WORKER)
            await ns.workers_ready(2)
            await asyncio.sleep(1)  # idle and waiting, as in production
            wf, t0 = await ns.submit(
                ns.workflow({"payloadFunction": "benchmarks.payloads:noop"}, sizes.latency, maxEventsPerJob=100)
            )
            await ns.finished(wf)
            first = await ns.conn.fetchval("SELECT min(started_at) FROM events")
            lags = [
                r["lag"]
                for r in await ns.conn.fetch(
                    "SELECT extract(epoch FROM recorded_at - ended_at) AS lag FROM attempts WHERE status = 'finished'"
                )
            ]
            lags.sort()
            return {
                "submit_to_first_running_ms": round((first.timestamp() - ns.submit_returned) * 1000, 1),
                "cli_start_to_first_running_ms": round((first.timestamp() - t0) * 1000, 1),
                "bookkeeping_p50_ms": round(float(lags[len(lags) // 2]) * 1000, 1),
                "bookkeeping_p99_ms": round(float(lags[int(len(lags) * 0.99) - 1]) * 1000, 1),
            }

    return {"events": sizes.latency} | await repeat(runs, once)


# -- scenario 5 ------------------------------------------------------------------------


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0  # a process that has exited (a zombie has no memory lines)


async def submit_measured(ns: Namespace, path: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one `dispatcher submit`. The peak is read from /proc
    while it runs: the ru_maxrss of a child counts the parent's memory it was forked from."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "dispatcher"), "submit", str(path)], env=ns.env, stdout=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            peak = max(peak, rss_mib(proc.pid, "VmHWM"))
        await asyncio.sleep(0.02)
    assert proc.returncode == 0, f"submit failed; logs in {ns.tmp}"
    return round(time.perf_counter() - t0, 2), peak


async def scale(settings: Settings, sizes: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {
        "events": sizes.scale,
        "events_per_job": 1000,
        "events_per_range": 100,
        "worker_args": " ".join(NOOP_WORKER),
    }
    label = {"payloadFunction": "benchmarks.payloads:noop"}
    async with Namespace(settings, "scale") as ns:  # memory must not grow with the events
        tenth = ns.workflow(label, sizes.scale // 10, maxEventsPerJob=1000, eventsPerRange=100)
        out["submit_tenth_seconds"], out["submit_tenth_peak_rss_mib"] = await submit_measured(ns, tenth)
    async with Namespace(settings, "scale") as ns:
        path = ns.workflow(label, sizes.scale, maxEventsPerJob=1000, eventsPerRange=100)
        out["submit_seconds"], out["submit_peak_rss_mib"] = await submit_measured(ns, path)
        wf = await ns.conn.fetchval("SELECT max(id) FROM workflows")
        n_jobs = await ns.conn.fetchval("SELECT count(*) FROM jobs")
        window = min(Settings.from_env().release_window, n_jobs)
        t0 = time.perf_counter()
        control = ns.start("start", "--no-monitor")
        while await ns.conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'queued'") < window:
            await asyncio.sleep(0.05)
        out["control_plane_release_seconds"] = round(time.perf_counter() - t0, 2)
        out["control_plane_jobs_released"] = window
        out["control_plane_events_published"] = int(
            await ns.conn.fetchval("SELECT count(*) FROM events WHERE status = 'queued'")
        )
        out["control_plane_peak_rss_mib"] = rss_mib(control.pid, "VmHWM")
        # then every event run by 2 workers: the control plane releases window after window
        workers = [ns.start("worker", *NOOP_WORKER) for _ in range(2)]
        t0 = time.perf_counter()
        samples: dict[int, float] = {}
        while (status := await ns.conn.fetchval("SELECT status FROM workflows WHERE id = $1", wf)) == "running":
            done = await ns.conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'finished'")
            samples[round(100 * done / n_jobs) // 10 * 10] = rss_mib(control.pid)
            await asyncio.sleep(0.5)
        assert status == "finished", f"scale workflow ended {status}; logs in {ns.tmp}"
        seconds = time.perf_counter() - t0
        out["run_seconds"] = round(seconds, 1)
        out["run_events_per_s"] = round(sizes.scale / seconds)
        out["control_plane_rss_mib_by_percent_done"] = dict(sorted(samples.items()))
        out["control_plane_peak_rss_mib_whole_run"] = rss_mib(control.pid, "VmHWM")
        out["worker_peak_rss_mib"] = max(rss_mib(w.pid, "VmHWM") for w in workers)
    return out


# -- report ----------------------------------------------------------------------------

TARGETS = [
    ("throughput range 1 >= 2x Celery", lambda r: r.get("celery", {}).get("ratio_ours_range1_to_celery"), 2.0, ">="),
    (
        "throughput range 10 >= 10,000 events/s",
        lambda r: r.get("throughput", {}).get("range_10", {}).get("events_per_s"),
        10_000,
        ">=",
    ),
    # the formula takes "payload time"; what the payloads took as the workers
    # measured it (start to end of the call, nothing of the worker's own around it), and
    # each payload at its nominal 50 ms (so their sleeps' late wake-ups count against us)
    (
        "dispatch overhead < 1 ms per event (EventService), payload time as measured",
        lambda r: (
            r.get("eventservice", {})
            .get("with_eventservice", {})
            .get("dispatch_overhead_ms_per_event_measured_payload")
        ),
        1.0,
        "<",
    ),
    (
        "dispatch overhead < 1 ms per event (EventService), payloads at their nominal 50 ms",
        lambda r: r.get("eventservice", {}).get("with_eventservice", {}).get("dispatch_overhead_ms_per_event"),
        1.0,
        "<",
    ),
    ("submit -> first event < 100 ms", lambda r: r.get("latency", {}).get("submit_to_first_running_ms"), 100, "<"),
    ("bookkeeping p99 < 1 s", lambda r: r.get("latency", {}).get("bookkeeping_p99_ms"), 1000, "<"),
    ("1,000,000 events submitted < 30 s", lambda r: r.get("scale", {}).get("submit_seconds"), 30, "<"),
    (
        "lost work running again after SIGKILL: p90 < 5 s at every range size",
        lambda r: r.get("recovery", {}).get("worst_p90_s"),
        5.0,  # benchmarks/recovery.py: TARGET_P90_SECONDS
        "<",
    ),
    ("submit peak memory < 300 MiB", lambda r: r.get("scale", {}).get("submit_peak_rss_mib"), 300, "<"),
    (
        "control plane peak memory < 300 MiB",
        lambda r: r.get("scale", {}).get("control_plane_peak_rss_mib_whole_run"),
        300,
        "<",
    ),
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run (the tests use it)")
    parser.add_argument("--full", action="store_true", help="scenario 3 without EventService on all payloads")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 3, quick 1)")
    parser.add_argument(
        "--only",
        default="throughput,celery,eventservice,latency,scale,recovery",
        help="scenarios, comma-separated; 'cluster' (a 3-node RabbitMQ cluster on loopback) runs only when named",
    )
    parser.add_argument("--merge", action="store_true", help="keep the report's sections of scenarios not run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--events", type=int, default=None, help="events for throughput and celery")
    parser.add_argument("--ranges", default="1,10,100", help="range sizes for throughput")
    args = parser.parse_args()
    from benchmarks import cluster, recovery  # they import this module's Namespace

    sizes = QUICK if args.quick else Sizes()
    if args.events:
        sizes = replace(sizes, throughput=args.events, celery=args.events)
    runs = args.runs or (1 if args.quick else 3)
    only = set(args.only.split(","))
    settings = Settings.from_env()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "mode": "quick" if args.quick else "full",
        "runs": runs,
    }
    t0 = time.perf_counter()
    if "throughput" in only:
        report["throughput"] = await throughput(settings, sizes, runs, [int(r) for r in args.ranges.split(",")])
    if "celery" in only:
        ours = report.get("throughput", {}).get("range_1", {}).get("events_per_s")
        report["celery"] = await celery(settings, sizes, runs, ours)
        print(f"  celery: {report['celery']}", flush=True)
    if "eventservice" in only:
        report["eventservice"] = await eventservice(settings, sizes, runs, args.full)
        print(f"  eventservice: {report['eventservice']}", flush=True)
    if "latency" in only:
        report["latency"] = await latency(settings, sizes, runs)
        print(f"  latency: {report['latency']}", flush=True)
    if "scale" in only:
        report["scale"] = await scale(settings, sizes)
        print(f"  scale: {report['scale']}", flush=True)
    if "recovery" in only:
        report["recovery"] = await recovery.recovery(settings, args.quick)
    if "cluster" in only:
        ranges = [int(r) for r in args.ranges.split(",") if int(r) in (1, 10)] or [1, 10]
        report["cluster"] = await cluster.cluster_scenario(settings, sizes.cluster, runs, ranges)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    stem = "report-quick" if args.quick else "report"
    if args.merge and (args.out / f"{stem}.json").exists():
        # the earlier run's sections, date and time stay; what ran now replaces its own
        earlier = json.loads((args.out / f"{stem}.json").read_text())
        report = earlier | {k: v for k, v in report.items() if k in only}
    report["targets"] = {}
    for name, get, bound, op in TARGETS:
        value = get(report)
        met = None if value is None else (value >= bound if op == ">=" else value < bound)
        report["targets"][name] = {"measured": value, "met": {True: "yes", False: "no", None: "-"}[met]}
    args.out.mkdir(parents=True, exist_ok=True)
    page = markdown(report) + recovery.markdown(report) + cluster.markdown(report)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(page)
    drawn = plot(report, args.out / f"{stem}.png")
    print(page)
    print(f"report: {args.out / stem}.md, .json" + (", .png" if drawn else ""))


if __name__ == "__main__":
    asyncio.run(main())
