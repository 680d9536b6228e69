"""Completions counted without a round trip per task.

A worker process counts its finished tasks in memory (``done()``: a lock, an add and a
clock read) and a thread of its own flushes the count to the sink every 20 ms: into a
Redis hash (field: the pid, value: "count last-completion-time") or, where there is no
Redis, into a small file per process. The benchmark sums the fields; the last completion's
time, not the flush's, ends the clock, so the 20 ms granularity does not count.

The sink comes from ``BENCH_PEERS_COUNTER``: ``redis://HOST:PORT/DB#KEY`` or
``file:DIRECTORY``. Forked worker processes (Dramatiq, FastStream, taskiq) start their own
flusher on their first task.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

FLUSH_SECONDS = 0.02
ENV = "BENCH_PEERS_COUNTER"


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.last = 0.0
        self.pid = -1

    def done(self) -> None:
        if self.pid != os.getpid():
            self._start()
        with self.lock:
            self.count += 1
            self.last = time.time()

    def _start(self) -> None:
        with self.lock:
            if self.pid == os.getpid():
                return
            self.pid = os.getpid()
            self.count, self.last = 0, 0.0  # a forked child starts from nothing
            threading.Thread(target=self._flush_forever, name="bench-counter", daemon=True).start()

    def _flush_forever(self) -> None:
        write = sink(os.environ[ENV])
        sent = -1
        while True:
            time.sleep(FLUSH_SECONDS)
            with self.lock:
                count, last = self.count, self.last
            if count != sent:
                write(os.getpid(), count, last)
                sent = count


def sink(spec: str) -> Any:
    """A function (pid, count, last) -> None writing to the sink named by ``spec``."""
    if spec.startswith("redis://"):
        import redis

        url, key = spec.split("#", 1)
        client = redis.Redis.from_url(url)

        def to_redis(pid: int, count: int, last: float) -> None:
            client.hset(key, str(pid), f"{count} {last!r}")

        return to_redis
    directory = Path(spec.removeprefix("file:"))

    def to_file(pid: int, count: int, last: float) -> None:
        tmp = directory / f".{pid}.tmp"
        tmp.write_text(f"{count} {last!r}")
        os.replace(tmp, directory / f"{pid}")

    return to_file


def read(spec: str, client: Any = None) -> dict[str, tuple[int, float]]:
    """{pid: (count, last completion time)} from the sink (``client``: a sync Redis)."""
    if spec.startswith("redis://"):
        key = spec.split("#", 1)[1]
        raw = client.hgetall(key)
        pairs = {k.decode(): v.decode() for k, v in raw.items()}
    else:
        pairs = {}
        for path in Path(spec.removeprefix("file:")).iterdir():
            if not path.name.startswith("."):
                try:
                    pairs[path.name] = path.read_text()
                except FileNotFoundError:
                    continue
    out = {}
    for pid, value in pairs.items():
        count, last = value.split()
        out[pid] = (int(count), float(last))
    return out


_counter = _Counter()
done = _counter.done
