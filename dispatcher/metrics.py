"""/metrics in the Prometheus text format, computed from the bookkeeping at scrape time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dispatcher.store import Store
from schemas.states import EVENT_STATES, WORKER_STATES
from transport.interface import Transport


class _Snapshot:
    """A collector holding metric families computed beforehand (collectors are sync)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def render_metrics(store: Store, broker: Transport | None) -> tuple[bytes, str]:
    families: list[Metric] = []
    events = GaugeMetricFamily("dispatcher_events", "Events by state", labels=["state"])
    counts = await store.event_totals()
    for state in EVENT_STATES:
        events.add_metric([state], counts.get(state, 0))
    families.append(events)
    # rate(dispatcher_events_finished_total[1m]) gives events finished per second
    families.append(
        CounterMetricFamily("dispatcher_events_finished", "Events finished", value=counts.get("finished", 0))
    )
    retries, attempts = await store.attempt_totals()
    families.append(CounterMetricFamily("dispatcher_retries", "Attempts after an event's first", value=retries))
    families.append(CounterMetricFamily("dispatcher_attempts", "Attempts recorded", value=attempts))
    workers = GaugeMetricFamily("dispatcher_workers", "Workers by state", labels=["state"])
    by_state = await store.worker_totals()
    for worker_state in WORKER_STATES:
        workers.add_metric([worker_state], by_state.get(worker_state, 0))
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
