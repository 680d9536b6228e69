"""arq, on Redis (a different broker: the benchmark's own redis-server, append-only file
fsynced every second). Tuned, since its defaults poll every 0.5 s: poll_delay 5 ms,
max_jobs 20, no results kept (keep_result 0). A job is removed from Redis only after it ran
(its "ack")."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

from benchmarks.peers import counter

PORT = int(os.environ.get("BENCH_PEERS_REDIS_PORT", "6379"))
REDIS = RedisSettings(host="127.0.0.1", port=PORT, database=1)
QUEUE = os.environ.get("BENCH_PEERS_QUEUE", "arq:queue")


async def noop(ctx: dict[str, Any], payload: str) -> None:
    counter.done()


async def startup(ctx: dict[str, Any]) -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=PORT, db=0).hset(f"{QUEUE}:ready", str(os.getpid()), "1")


class WorkerSettings:
    functions = [noop]
    redis_settings = REDIS
    queue_name = QUEUE
    on_startup = startup
    max_jobs = 20
    poll_delay = 0.005
    keep_result = 0
    handle_signals = True


_pool: list[ArqRedis] = []


async def prepare() -> None:
    _pool.append(await create_pool(REDIS, default_queue_name=QUEUE))


async def produce(n: int) -> None:
    pool = _pool[0]
    for start in range(0, n, 100):  # pipelined, 100 in flight (each enqueue is a transaction)
        await asyncio.gather(*(pool.enqueue_job("noop", "x") for _ in range(min(100, n - start))))
    await pool.aclose()
