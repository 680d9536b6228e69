"""The peers a user would pick instead, on the same RabbitMQ, in interleaved rounds.

    python -m benchmarks.peers [--quick] [--tasks N] [--rounds R] [--only KEY,...] [--out DIR]

Every setup runs the same no-op task N times with 2 worker processes, persistent messages,
acks after the task and no result backend, each in a queue of its own:

  ours              benchmarks/run.py's throughput scenario at range size 1 (full
                    bookkeeping in Postgres; its releaser publishes with confirms)
  dramatiq-t8       Dramatiq, --processes 2 and its default 8 threads; no confirms (its default)
  dramatiq-t8-confirms   the same with publisher confirms (confirm_delivery=True)
  dramatiq-t1       Dramatiq, --processes 2 --threads 1
  taskiq            taskiq + taskiq-aio-pika at their defaults (confirms, quorum queue)
  faststream        FastStream's RabbitBroker at its defaults (confirms), durable queue
  celery-p4         Celery, 2 solo workers, prefetch multiplier 4 (its default)
  celery-p64        the same, prefetch 64
  celery-p4-confirms     prefetch 4 with publisher confirms (confirm_publish)
  arq               arq on Redis (a different broker), tuned
  raw               aio-pika alone: publish with confirms, then consume + ack (the limit)

Completions are counted in each worker process and flushed every 20 ms (counter.py), so no
round trip is added per task; the clock runs from the producer's go (connected, workers
consuming) to the last task's completion. CPU is read from /proc over the same interval, by
process group. Rounds run every setup once, in an order rotated each round; ratios ours/peer
are taken within a round. Writes peers.json, peers.md and peers.png (peers-quick.* with
--quick) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika

from benchmarks import run as main_bench
from benchmarks.peers import counter
from benchmarks.peers.report import markdown, plot
from dispatcher.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results"
GROUPS = ("workers", "producer", "rabbitmq", "postgres", "redis")
REDIS_HINT = "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server) to run arq"


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    kind: str  # "ours", "raw" or a peer's app module under benchmarks/peers/
    package: str = ""  # the import that must be there
    broker: str = "RabbitMQ"
    confirms: str = "no"
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # extra worker arguments
    note: str = ""


SETUPS = [
    Setup(
        "ours",
        "ours, range size 1, full bookkeeping",
        "ours",
        confirms="yes",
        note="quorum queues, 4 slots, prefetch 512",
    ),
    Setup("dramatiq-t8", "Dramatiq, 8 threads (default)", "dramatiq_app", "dramatiq", note="classic queue"),
    Setup(
        "dramatiq-t8-confirms",
        "Dramatiq, 8 threads, confirms",
        "dramatiq_app",
        "dramatiq",
        confirms="yes",
        env={"BENCH_PEERS_CONFIRMS": "1"},
        note="confirm_delivery=True: one round trip per publish",
    ),
    Setup("dramatiq-t1", "Dramatiq, 1 thread", "dramatiq_app", "dramatiq", args=("--threads", "1")),
    Setup(
        "taskiq",
        "taskiq + taskiq-aio-pika (defaults)",
        "taskiq_app",
        "taskiq_aio_pika",
        confirms="yes",
        note="quorum queue, qos 10",
    ),
    Setup(
        "faststream",
        "FastStream, rabbit (defaults)",
        "faststream_app",
        "faststream",
        confirms="yes",
        note="no prefetch limit",
    ),
    Setup("celery-p4", "Celery, prefetch 4 (default)", "celery_app", "celery", env={"BENCH_PEERS_PREFETCH": "4"}),
    Setup("celery-p64", "Celery, prefetch 64", "celery_app", "celery", env={"BENCH_PEERS_PREFETCH": "64"}),
    Setup(
        "celery-p4-confirms",
        "Celery, prefetch 4, confirms",
        "celery_app",
        "celery",
        confirms="yes",
        env={"BENCH_PEERS_PREFETCH": "4", "BENCH_PEERS_CONFIRMS": "1"},
        note="confirm_publish: one round trip per publish",
    ),
    Setup(
        "arq",
        "arq (Redis), tuned",
        "arq_app",
        "arq",
        broker="Redis",
        confirms="n/a",
        note="different broker; poll_delay 5 ms, max_jobs 20, keep_result 0; AOF fsync every second",
    ),
    Setup("raw", "raw aio-pika consume + ack", "raw", confirms="yes", note="the broker's limit, one process"),
]


def worker_commands(setup: Setup, queue: str) -> list[list[str]]:
    """The worker processes of a peer: 2 in all (a supervisor forking 2, or 2 commands)."""
    if setup.kind == "dramatiq_app":
        return [[str(BIN / "dramatiq"), "benchmarks.peers.dramatiq_app", "--processes", "2", *setup.args]]
    if setup.kind == "taskiq_app":
        return [
            [
                str(BIN / "taskiq"),
                "worker",
                "benchmarks.peers.taskiq_app:broker",
                "--workers",
                "2",
                "--log-level",
                "WARNING",
            ]
        ]
    if setup.kind == "faststream_app":
        return [
            [
                str(BIN / "faststream"),
                "run",
                "benchmarks.peers.faststream_app:app",
                "--workers",
                "2",
                "--log-level",
                "warning",
            ]
        ]
    if setup.kind == "celery_app":
        return [main_bench.celery_worker("benchmarks.peers.celery_app", queue, i) for i in range(2)]
    if setup.kind == "arq_app":
        return [[str(BIN / "arq"), "benchmarks.peers.arq_app.WorkerSettings"] for _ in range(2)]
    raise ValueError(setup.kind)


def broker_objects(setup: Setup, queue: str) -> tuple[list[str], list[str]]:
    """(queues, exchanges) a peer declares, deleted after its run."""
    return {
        "dramatiq_app": ([queue, f"{queue}.DQ", f"{queue}.XQ"], []),
        "taskiq_app": ([queue, f"{queue}.dead_letter"], [queue]),
        "faststream_app": ([queue], []),
        "celery_app": ([queue], [queue]),
    }.get(setup.kind, ([], []))


# -- CPU by process group, from /proc ---------------------------------------------------


def proc_table() -> dict[int, tuple[str, int, float]]:
    """{pid: (comm, ppid, CPU seconds)} of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(name)] = (comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_snapshot(roots: dict[str, list[int]], redis_pid: int | None) -> dict[str, dict[int, float]]:
    """CPU seconds so far, by group and pid: ``roots`` groups take their processes'
    descendants too; RabbitMQ is beam.smp, Postgres every postgres process (backends
    included), Redis our redis-server."""
    table = proc_table()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, dict[int, float]] = {g: {} for g in GROUPS}
    for group, pids in roots.items():
        todo = list(pids)
        while todo:
            pid = todo.pop()
            if pid in table:
                out[group][pid] = table[pid][2]
                todo += children.get(pid, [])
    for pid, (comm, _, cpu) in table.items():
        if comm == "beam.smp":
            out["rabbitmq"][pid] = cpu
        elif comm == "postgres":
            out["postgres"][pid] = cpu
        elif pid == redis_pid:
            out["redis"][pid] = cpu
    return out


def cpu_us_per_task(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], n: int
) -> dict[str, float]:
    return {g: round(sum(cpu - before[g].get(pid, 0.0) for pid, cpu in after[g].items()) / n * 1e6, 1) for g in GROUPS}


# -- our redis-server ------------------------------------------------------------------


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (
            p
            for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")
            if os.access(p, os.X_OK)
        ),
        None,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a free loopback port, in a temporary directory;
    append-only file fsynced every second (arq's jobs persist, as the AMQP peers' do)."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / "redis"
        self.dir.mkdir()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        self.client: Any = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}") from None
                time.sleep(0.05)

    def db(self, number: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=number)

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- one run of one setup --------------------------------------------------------------


@dataclass
class Context:
    settings: Settings
    tmp: Path
    redis: RedisServer | None

    def counter_spec(self, tag: str) -> str:
        if self.redis:
            return f"redis://127.0.0.1:{self.redis.port}/0#bench:done:{tag}"
        directory = self.tmp / f"counts-{tag}"
        directory.mkdir()
        return f"file:{directory}"


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # its own children first (a supervisor's workers), by pid, then itself
            table = proc_table()
            for pid, (_, ppid, _) in table.items():
                if ppid == p.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            p.kill()
            p.wait()


async def consumers(url: str, queue: str) -> int:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return int(q.declaration_result.consumer_count or 0)
    except aio_pika.exceptions.ChannelClosed:  # not declared yet
        return 0
    finally:
        await conn.close()


async def delete_broker_objects(url: str, queues: list[str], exchanges: list[str]) -> None:
    conn = await aio_pika.connect(url)
    try:
        for name in queues:
            with contextlib.suppress(Exception):
                await (await conn.channel()).queue_delete(name)
        for name in exchanges:
            with contextlib.suppress(Exception):
                await (await conn.channel()).exchange_delete(name)
    finally:
        await conn.close()


async def run_peer(ctx: Context, setup: Setup, n: int) -> dict[str, Any]:
    tag = f"{setup.key}.{uuid.uuid4().hex[:6]}"
    queue = f"bench.peers.{tag}"
    spec = ctx.counter_spec(tag)
    env = (
        dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            BENCH_PEERS_AMQP=ctx.settings.amqp_url,
            BENCH_PEERS_QUEUE=f"arq:{queue}" if setup.kind == "arq_app" else queue,
            BENCH_PEERS_COUNTER=spec,
            BENCH_PEERS_CONFIRMS="0",
        )
        | setup.env
    )
    if ctx.redis:
        env["BENCH_PEERS_REDIS_PORT"] = str(ctx.redis.port)
    logs = ctx.tmp / tag
    logs.mkdir()
    workers = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=(logs / f"w{i}.log").open("wb"), stderr=subprocess.STDOUT)
        for i, cmd in enumerate(worker_commands(setup, queue))
    ]
    producer: subprocess.Popen[bytes] | None = None
    loop = asyncio.get_running_loop()
    try:
        # both worker processes consuming before the clock starts
        deadline = time.monotonic() + 60
        while True:
            if setup.kind == "arq_app":
                assert ctx.redis
                ready = int(ctx.redis.client.hlen(f"arq:{queue}:ready"))
            else:
                ready = await consumers(ctx.settings.amqp_url, queue)
            if ready >= 2:
                break
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"{setup.key}: workers not consuming; logs in {logs}")
            await asyncio.sleep(0.1)
        producer = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peers.produce", setup.kind, str(n)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(logs / "producer.log").open("wb"),
        )
        assert producer.stdin and producer.stdout
        line = await loop.run_in_executor(None, producer.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError(f"{setup.key}: producer did not start; log in {logs}")
        roots = {"workers": [w.pid for w in workers], "producer": [producer.pid]}
        redis_pid = ctx.redis.proc.pid if ctx.redis else None
        cpu0 = cpu_snapshot(roots, redis_pid)
        t0 = time.time()
        producer.stdin.write(b"go\n")
        producer.stdin.flush()
        client = ctx.redis.client if ctx.redis else None
        deadline = time.monotonic() + max(120.0, n / 100)
        while True:
            counts = counter.read(spec, client)
            if sum(c for c, _ in counts.values()) >= n:
                break
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers) or producer.poll() is not None:
                raise RuntimeError(f"{setup.key}: {sum(c for c, _ in counts.values())} of {n} done; logs in {logs}")
            await asyncio.sleep(0.005)
        cpu = cpu_us_per_task(cpu0, cpu_snapshot(roots, redis_pid), n)
        end = max(last for _, last in counts.values())
        published = json.loads(await loop.run_in_executor(None, producer.stdout.readline))
        await asyncio.sleep(0.3)  # a task run twice (redelivered) would show up by now
        counts = counter.read(spec, client)
        seconds = end - t0
        return {
            "seconds": round(seconds, 3),
            "tasks_per_s": round(n / seconds),
            "published": n,
            "counted": sum(c for c, _ in counts.values()),
            "counted_by_process": sorted(c for c, _ in counts.values()),
            "publish_per_s": round(n / (published["publish_end"] - published["publish_start"])),
            "cpu_us_per_task": cpu,
        }
    finally:
        if producer:
            assert producer.stdin
            with contextlib.suppress(BrokenPipeError):
                producer.stdin.close()
        # a Celery worker's hub notices SIGTERM only when its poll returns (about 7 s when
        # idle): once every task is counted, 2 s of grace and then SIGKILL
        stop_all(([producer] if producer else []) + workers, timeout=2 if setup.kind == "celery_app" else 20)
        queues, exchanges = broker_objects(setup, queue)
        await delete_broker_objects(ctx.settings.amqp_url, queues, exchanges)
        if ctx.redis:
            ctx.redis.client.delete(spec.split("#", 1)[1])
            if setup.kind == "arq_app":
                ctx.redis.client.delete(f"arq:{queue}:ready")
                ctx.redis.db(1).flushdb()  # arq's database


def redis_cpu(ctx: Context) -> Callable[[], float]:
    """CPU seconds of our redis-server so far (0 without one)."""
    return lambda: main_bench.cpu_seconds(ctx.redis.proc.pid) if ctx.redis else 0.0


async def run_ours(ctx: Context, n: int) -> dict[str, Any]:
    """benchmarks/run.py's throughput scenario at range size 1, as it is (imported, not
    copied): submit to finished in Postgres, CPU by role from workers ready to finished."""
    redis0 = redis_cpu(ctx)()
    r = await main_bench.throughput_once(ctx.settings, n, 1)
    redis_us = round((redis_cpu(ctx)() - redis0) / n * 1e6, 1)
    return {
        "seconds": r["seconds"],
        "tasks_per_s": r["events_per_s"],
        "published": n,
        "counted": n,  # the workflow is 'finished' in Postgres: every event finished
        "cpu_us_per_task": {
            "workers": r.get("cpu_us_per_event_worker", 0.0),
            "producer": r.get("cpu_us_per_event_control_plane", 0.0),
            "rabbitmq": r.get("cpu_us_per_event_rabbitmq", 0.0),
            "postgres": r.get("cpu_us_per_event_postgres", 0.0),
            "redis": redis_us,
        },
    }


async def run_raw(ctx: Context, n: int) -> dict[str, Any]:
    """run.py's raw broker limit: aio-pika publishes with confirms, then consumes + acks.
    Its one process (this one) counts as the workers; tasks/s is the consume + ack rate."""
    roots = {"workers": [os.getpid()]}
    redis_pid = ctx.redis.proc.pid if ctx.redis else None
    cpu0 = cpu_snapshot(roots, redis_pid)
    r = await main_bench.raw_broker(ctx.settings.amqp_url, n)
    cpu = cpu_us_per_task(cpu0, cpu_snapshot(roots, redis_pid), n)
    return {
        "seconds": round(n / r["consume_ack_per_s"], 3),
        "tasks_per_s": r["consume_ack_per_s"],
        "publish_per_s": r["publish_per_s"],
        "published": n,
        "counted": n,
        "cpu_us_per_task": cpu,
    }


async def run_setup(ctx: Context, setup: Setup, n: int) -> dict[str, Any]:
    if setup.kind == "ours":
        return await run_ours(ctx, n)
    if setup.kind == "raw":
        return await run_raw(ctx, n)
    return await run_peer(ctx, setup, n)


def skipped(setup: Setup, ctx: Context) -> str | None:
    if setup.package and importlib.util.find_spec(setup.package) is None:
        return f"{setup.package} is not installed (pip install -e '.[peers]')"
    if setup.broker == "Redis" and ctx.redis is None:
        return REDIS_HINT
    return None


# -- the rounds and the report ---------------------------------------------------------


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def summarize(setups: list[Setup], rounds: list[dict[str, dict[str, Any]]], skips: dict[str, str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for s in setups:
        base: dict[str, Any] = {"label": s.label, "broker": s.broker, "confirms": s.confirms, "note": s.note}
        if s.key in skips:
            rows[s.key] = base | {"skipped": skips[s.key]}
            continue
        runs = [r[s.key] for r in rounds if s.key in r]
        row = base | {
            "tasks_per_s": round(statistics.median(r["tasks_per_s"] for r in runs)),
            "tasks_per_s_rounds": [r["tasks_per_s"] for r in runs],
            "published": runs[0]["published"],
            "counted_rounds": [r["counted"] for r in runs],
            "cpu_us_per_task": {g: median([r["cpu_us_per_task"][g] for r in runs]) for g in GROUPS},
            "seconds_rounds": [r["seconds"] for r in runs],
        }
        row["cpu_us_per_task_total"] = round(sum(row["cpu_us_per_task"].values()), 1)
        if any("publish_per_s" in r for r in runs):
            row["publish_per_s"] = round(statistics.median(r["publish_per_s"] for r in runs if "publish_per_s" in r))
        if any("counted_by_process" in r for r in runs):
            row["counted_by_process_rounds"] = [r.get("counted_by_process") for r in runs]
        ratios = [
            round(r["ours"]["tasks_per_s"] / r[s.key]["tasks_per_s"], 2)
            for r in rounds
            if "ours" in r and s.key in r and s.key != "ours"
        ]
        if ratios:
            row["ratio_ours_rounds"] = ratios
            row["ratio_ours"] = median(ratios)
        rows[s.key] = row
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 tasks, 1 round (the tests use it)")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per setup and round (default 50,000)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4, quick 1)")
    parser.add_argument("--only", default=None, help="setups, comma-separated: " + ",".join(s.key for s in SETUPS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    n = args.tasks or (2000 if args.quick else 50_000)
    n_rounds = args.rounds or (1 if args.quick else 4)
    keys = args.only.split(",") if args.only else [s.key for s in SETUPS]
    unknown = set(keys) - {s.key for s in SETUPS}
    if unknown:
        parser.error(f"unknown setups: {', '.join(sorted(unknown))}")
    setups = [s for s in SETUPS if s.key in keys]
    settings = Settings.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="es-peers-"))
    binary = redis_binary()
    if binary is None:
        print(f"  {REDIS_HINT}; arq is skipped, completions are counted in files", flush=True)
    redis = RedisServer(binary, tmp) if binary else None
    ctx = Context(settings, tmp, redis)
    t_all = time.perf_counter()
    try:
        skips = {s.key: reason for s in setups if (reason := skipped(s, ctx))}
        for key, reason in skips.items():
            print(f"  {key}: skipped, {reason}", flush=True)
        runnable = [s for s in setups if s.key not in skips]
        rounds: list[dict[str, dict[str, Any]]] = []
        orders = []
        for r in range(n_rounds):
            shift = r % max(1, len(runnable))
            order = runnable[shift:] + runnable[:shift]  # rotated each round
            orders.append([s.key for s in order])
            results: dict[str, dict[str, Any]] = {}
            for s in order:
                results[s.key] = await run_setup(ctx, s, n)
                res = results[s.key]
                print(
                    f"  round {r + 1}/{n_rounds} {s.key}: {res['tasks_per_s']} tasks/s, counted {res['counted']}/{n}, "
                    f"CPU µs/task {res['cpu_us_per_task']}",
                    flush=True,
                )
            rounds.append(results)
    finally:
        if redis:
            redis.stop()
    shutil.rmtree(tmp, ignore_errors=True)  # kept when a run failed: its logs are there
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "mode": "quick" if args.quick else "full",
        "tasks": n,
        "rounds": n_rounds,
        "worker_processes": 2,
        "orders": orders,
        "counter": "redis" if redis else "files",
        "seconds": round(time.perf_counter() - t_all, 1),
        "versions": versions(),
        "rows": summarize(setups, rounds, skips),
    }
    stem = "peers-quick" if args.quick else "peers"
    args.out.mkdir(parents=True, exist_ok=True)
    page = markdown(report)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{stem}.md").write_text(page)
    plot(report, args.out / f"{stem}.png")
    print(page)
    print(f"report: {args.out / stem}.md, .json, .png")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dramatiq", "taskiq", "taskiq-aio-pika", "faststream", "celery", "arq", "aio-pika"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    binary = redis_binary()
    if binary:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out["redis-server"] = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[
                2
            ]
    return out
