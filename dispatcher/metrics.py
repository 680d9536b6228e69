"""/metrics in the Prometheus text format, computed from the bookkeeping at scrape time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dispatcher.broker import Broker
from dispatcher.status import EVENT_STATES
from dispatcher.store import Store


class _Snapshot:
    """A collector holding metric families computed beforehand (collectors are sync)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def render_metrics(store: Store, broker: Broker | None) -> tuple[bytes, str]:
    families: list[Metric] = []
    events = GaugeMetricFamily("dispatcher_events", "Events by state", labels=["state"])
    counts = {r["status"]: r["n"] for r in await store.fetch("metrics_events")}
    for state in (*EVENT_STATES, "retrying"):
        events.add_metric([state], counts.get(state, 0))
    families.append(events)
    # rate(dispatcher_events_finished_total[1m]) gives events finished per second
    families.append(
        CounterMetricFamily("dispatcher_events_finished", "Events finished", value=counts.get("finished", 0))
    )
    attempts = await store.fetchrow("metrics_attempts")
    assert attempts is not None
    families.append(
        CounterMetricFamily("dispatcher_retries", "Attempts after an event's first", value=attempts["retries"])
    )
    families.append(CounterMetricFamily("dispatcher_attempts", "Attempts recorded", value=attempts["attempts"]))
    workers = GaugeMetricFamily("dispatcher_workers", "Workers by state", labels=["state"])
    by_state = {r["status"]: r["n"] for r in await store.fetch("metrics_workers")}
    for state in ("live", "stopping", "stopped", "lost"):
        workers.add_metric([state], by_state.get(state, 0))
    families.append(workers)
    if broker is not None:
        depth = GaugeMetricFamily("dispatcher_queue_depth", "Messages ready in a queue", labels=["queue"])
        names = broker.names
        for label, name in (("jobs", names.jobs), ("status", names.status), ("dlq", names.dlq)):
            with contextlib.suppress(Exception):
                n = await broker.queue_depth(name)
                if n is not None:
                    depth.add_metric([label], n)
        families.append(depth)
        # status messages waiting for the bookkeeper: its lag, in messages
        families.append(
            GaugeMetricFamily(
                "dispatcher_bookkeeping_lag_messages",
                "Status messages not yet applied",
                value=next((s.value for s in depth.samples if s.labels["queue"] == "status"), 0),
            )
        )
        families.append(
            GaugeMetricFamily(
                "dispatcher_dlq_size",
                "Messages in the dead-letter queue",
                value=next((s.value for s in depth.samples if s.labels["queue"] == "dlq"), 0),
            )
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry), CONTENT_TYPE_LATEST
