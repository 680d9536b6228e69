"""The cluster scenario: what replication costs, and how soon work goes on after a node dies.

    python -m benchmarks.run --only cluster [--merge] [--quick]

It starts a 3-node RabbitMQ cluster on loopback (scripts/cluster.sh, beside the machine's
own node) and stops it at the end.

- Throughput, as scenario 1 (no-op payloads, one control plane, two workers), at range
  sizes 1 and 10, in the same run: the machine's single node with classic queues, the same
  node with quorum queues (the default), and the cluster with quorum queues (the clients
  given all three nodes).
- A node killed mid-run: the control plane on node 3, both workers on node 1, 10 ms async
  payloads in ranges of 10. Node 1 is SIGKILLed once a third of the events are finished.
  It measures the seconds from the kill to the first event that started after it and
  finished (a worker may still have one in hand), the longest pause without an event
  finishing from the kill on, and the wall time. It also counts the attempts charged "lost with its worker"
  (phantom attempts: every worker lived through it), and the events that did not end
  `finished` at their first attempt.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.run import Namespace, repeat, throughput_once
from dispatcher.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster.sh"


class Cluster:
    def __init__(self) -> None:
        self.env = dict(os.environ, ES_CLUSTER_DIR="/tmp/es-bench-cluster", ES_CLUSTER_PORT="5760")

    def run(self, *args: str) -> str:
        out = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=180)
        if out.returncode:
            raise RuntimeError(f"cluster.sh {' '.join(args)} failed: {out.stderr[-2000:]}")
        return out.stdout.strip()

    def urls(self, *order: int) -> str:
        urls = self.run("urls").split(",")
        return ",".join(urls[n - 1] for n in order)


async def kill_once(settings: Settings, cluster: Cluster, events: int) -> dict[str, float]:
    async with Namespace(settings, "kill") as ns:
        ns.start("start", "--no-monitor", amqp_url=cluster.urls(3, 2, 1))
        for _ in range(2):
            ns.start("worker", "--slots", "4", amqp_url=cluster.urls(1, 2, 3))
        sleepy = {"payloadFunction": "tests.payloads:sleepy"}
        wf_file = ns.workflow(sleepy, events, payload="0.01:", maxEventsPerJob=500, eventsPerRange=10)
        await ns.workers_ready(2)
        wf, t0 = await ns.submit(wf_file)
        while await ns.conn.fetchval("SELECT count(*) FROM events WHERE status = 'finished'") < events // 3:
            await asyncio.sleep(0.05)
        killed = time.time()
        cluster.run("kill", "1")
        try:
            end = await ns.finished(wf, timeout=600)
        finally:
            cluster.run("up", "1")
        first = await ns.conn.fetchval(
            "SELECT min(ended_at) FROM attempts WHERE status = 'finished' AND started_at > to_timestamp($1)", killed
        )
        # the longest time without an event finishing, from just before the kill on (the
        # first event finished after it may be one a worker still had in hand)
        pause = await ns.conn.fetchval(
            """SELECT max(gap) FROM (SELECT extract(epoch FROM ended_at - lag(ended_at) OVER (ORDER BY ended_at)) AS gap
               FROM attempts WHERE status = 'finished' AND ended_at > to_timestamp($1 - 1)) g""",
            killed,
        )
        phantom = await ns.conn.fetchval("SELECT count(*) FROM attempts WHERE error LIKE 'lost with its worker%'")
        again = await ns.conn.fetchval("SELECT count(*) FROM events WHERE status <> 'finished' OR attempt <> 1")
        return {
            "seconds": round(end.timestamp() - t0, 2),
            "kill_to_first_event_s": round(first.timestamp() - killed, 2) if first else -1.0,
            "longest_pause_s": round(float(pause or 0.0), 2),
            "phantom_attempts": float(phantom),
            "events_not_first_time": float(again),
        }


async def cluster_scenario(settings: Settings, events: int, runs: int, ranges: list[int]) -> dict[str, Any]:
    cluster = Cluster()
    cluster.run("stop")
    cluster.run("start")
    try:
        configurations = {
            "single_classic": replace(settings, queue_type="classic"),
            "single_quorum": replace(settings, queue_type="quorum"),
            "cluster_quorum": replace(settings, amqp_url=cluster.urls(1, 2, 3), queue_type="quorum"),
        }
        out: dict[str, Any] = {"events": events, "nodes": 3}
        for per_range in ranges:
            for name, config in configurations.items():
                key = f"{name}_range_{per_range}"
                out[key] = await repeat(runs, partial(throughput_once, config, events, per_range))
                print(f"  cluster, {key}: {out[key]}", flush=True)
            base = out[f"single_classic_range_{per_range}"]["events_per_s"]
            for name in ("single_quorum", "cluster_quorum"):
                out[f"{name}_range_{per_range}"]["vs_single_classic"] = round(
                    out[f"{name}_range_{per_range}"]["events_per_s"] / base, 3
                )
        kill_settings = replace(settings, queue_type="quorum")
        out["node_killed"] = await repeat(runs, partial(kill_once, kill_settings, cluster, max(events // 5, 2000)))
        print(f"  cluster, node killed: {out['node_killed']}", flush=True)
        return out
    finally:
        cluster.run("stop")


def markdown(report: dict[str, Any]) -> str:
    c = report.get("cluster")
    if not c:
        return ""
    lines = [
        "",
        "## Cluster: what replication costs",
        "",
        f"{c['events']} no-op events, one control plane, two workers; 3 RabbitMQ nodes on loopback (one machine).",
        "",
        "| range size | single node, classic | single node, quorum | 3 nodes, quorum |",
        "|---|---|---|---|",
    ]
    for r in (1, 10):
        if f"single_classic_range_{r}" not in c:
            continue
        a, b, d = (c[f"{n}_range_{r}"] for n in ("single_classic", "single_quorum", "cluster_quorum"))
        lines.append(
            f"| {r} | {a['events_per_s']:,} events/s | {b['events_per_s']:,} ({b['vs_single_classic']:.2f}x) "
            f"| {d['events_per_s']:,} ({d['vs_single_classic']:.2f}x) |"
        )
    k = c.get("node_killed")
    if k:
        lines += [
            "",
            f"Node killed mid-run (workers' node): first event finished {k['kill_to_first_event_s']} s after the kill, "
            f"longest pause without an event finishing {k.get('longest_pause_s', '-')} s; "
            f"{int(k['phantom_attempts'])} phantom attempts; {int(k['events_not_first_time'])} events not finished at "
            f"their first attempt; workflow wall time {k['seconds']} s.",
        ]
    return "\n".join(lines) + "\n"
