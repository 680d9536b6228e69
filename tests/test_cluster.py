"""On a 3-node RabbitMQ cluster on loopback (scripts/cluster.sh, beside the machine's own
node, which is not touched): a client whose node dies moves to another, and a workflow
run while the node its workers use is SIGKILLed finishes with every event once and no
attempt charged for the crash. Skipped where rabbitmq-server is not installed here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatcher.config import Names, Settings
from dispatcher.control import ControlPlane
from dispatcher.store import Store
from dispatcher.submit import submit
from tests.conftest import ROOT
from tests.helpers import eventually
from tests.test_failures import write_workflow
from transport.interface import Incoming
from transport.rabbitmq import Broker
from workers.worker import Worker

SCRIPT = ROOT / "scripts" / "cluster.sh"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")

pytestmark = pytest.mark.skipif(not SERVER.exists(), reason="no local rabbitmq-server to run a cluster with")


@dataclass(frozen=True)
class Cluster:
    env: dict[str, str]

    def run(self, *args: str) -> str:
        out = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def urls(self, *order: int) -> str:
        urls = self.run("urls").split(",")
        return ",".join(urls[n - 1] for n in order)

    def kill(self, n: int) -> None:
        self.run("kill", str(n))

    def up(self, n: int) -> None:
        self.run("up", str(n))

    def leader(self, queue: str) -> int:
        """The node (1..3) leading a quorum queue."""
        return int(self.run("leader", queue))

    def leaders(self) -> dict[str, int]:
        """Every quorum queue of the cluster and the node (1..3) leading it."""
        return {name: int(node) for name, node in (line.split() for line in self.run("leaders").splitlines())}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    env = dict(os.environ, ES_CLUSTER_DIR="/tmp/es-cluster-test", ES_CLUSTER_PORT="5740")
    c = Cluster(env)
    c.run("stop")  # a cluster a killed run left behind
    try:
        c.run("start")
        yield c
    finally:
        c.run("stop")


@pytest.fixture
async def node_names() -> Names:
    return Names(prefix=f"c{uuid.uuid4().hex[:8]}.")


async def test_a_client_moves_to_another_node_when_its_node_dies(cluster: Cluster, node_names: Names) -> None:
    broker = await Broker.connect(cluster.urls(1, 2, 3), node_names, client="pytest-cluster")
    try:
        await broker.declare_topology()
        got: list[bytes] = []

        async def handler(message: Incoming) -> None:
            got.append(message.body)
            await message.ack()

        await broker.consume(node_names.status, handler, prefetch=10)
        await broker.publish_status(b"before")
        await eventually(lambda: asyncio.sleep(0, got == [b"before"]), what="the first status")
        await asyncio.to_thread(cluster.kill, 1)  # (in a thread: the loop runs the consumer meanwhile)

        async def published() -> bool:
            try:
                async with asyncio.timeout(2):
                    await broker.publish_status(b"after")
                return True
            except Exception:
                return False

        await eventually(published, timeout=20, what="a publish through another node")
        # the consumer was restored on the new node, and the queue (quorum) kept its messages
        await eventually(lambda: asyncio.sleep(0, b"after" in got), timeout=20, what="the status consumed after")
    finally:
        await asyncio.to_thread(cluster.up, 1)  # first: deleting a quorum queue takes seconds while a member is down
        with contextlib.suppress(Exception):
            await broker.delete_topology()
        await broker.close()


async def test_job_queues_are_led_from_every_node_not_from_the_one_the_control_plane_uses(
    cluster: Cluster, node_names: Names
) -> None:
    """The control plane is connected to node 1 only, yet the job queues it declares get
    their leaders on the nodes that lead the fewest queues ("balanced"), so that one node
    does not carry every job's traffic. Enough queues are declared that every node must
    get some and the cluster ends even (to one), whatever earlier tests left behind;
    client-local placement would put them all on node 1."""
    broker = await Broker.connect(cluster.urls(1), node_names, client="pytest-cluster")
    queues: list[str] = []
    try:
        before = Counter(cluster.leaders().values())
        top = max(before[n] for n in (1, 2, 3))
        count = sum(top - before[n] for n in (1, 2, 3)) + 6
        queues = [node_names.job(job) for job in range(1, count + 1)]
        for queue in queues:
            await broker.declare_job_queue(queue)
        leaders = cluster.leaders()
        assert set(queues) <= set(leaders)  # every job queue is a quorum queue
        placed = Counter(leaders[q] for q in queues)
        assert all(placed[n] >= 2 for n in (1, 2, 3)), placed
        after = Counter(leaders.values())
        assert max(after.values()) - min(after.values()) <= 1, (before, after)
    finally:
        for queue in queues:
            with contextlib.suppress(Exception):
                await broker.delete_queue(queue)
        await broker.close()


async def test_the_node_leading_the_job_queues_killed_mid_run_charges_no_attempt_and_runs_every_event_once(
    cluster: Cluster, node_names: Names, database: str, tmp_path: Path
) -> None:
    """The node that leads most of the active job queues, and that both workers are
    connected to, is SIGKILLed mid-run; a job queue also loses its ranges. The workflow
    finishes with every event finished at attempt 1 and no attempt charged."""
    # payloads of seconds: when the node dies, events are running, and the ranges that
    # held them come back (to a worker that returns them) while the workers that run
    # them live on and still run them
    n = 48
    settings = Settings(
        amqp_url=cluster.urls(3, 2, 1),
        database_url=database,
        names=node_names,
        work_dir=tmp_path / "work",
        log_dir=tmp_path / "logs",
        batch_linger=0.01,
        heartbeat_interval=1.0,
        release_window=10,
    )
    store = await Store.connect(database)
    control_broker = await Broker.connect(settings.amqp_url, node_names, client="pytest-control")
    await control_broker.declare_topology()
    cp = ControlPlane(settings, store, control_broker)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(cp.run(stop))]
    workers = []
    killed = 0
    try:
        wf = await submit(
            store,
            write_workflow(tmp_path, {"isr": ["4.0"] * n}, function="tests.payloads:sleepy", per_job=8, per_range=1),
        )

        async def published() -> list[int]:
            return [r["id"] for r in await store.pool.fetch("SELECT id FROM jobs WHERE status = 'queued'")]

        jobs = await eventually(published, timeout=30, what="jobs published")
        leaders = Counter([await asyncio.to_thread(cluster.leader, node_names.job(job)) for job in jobs])
        killed = leaders.most_common(1)[0][0]
        order = [killed, *(k for k in (1, 2, 3) if k != killed)]
        for i in range(2):  # the workers on the node that is killed
            worker_broker = await Broker.connect(cluster.urls(*order), node_names, client=f"pytest-worker-{i}")
            worker = Worker(
                worker_broker, slots=4, prefetch=8, work_dir=tmp_path / "work", log_dir=tmp_path / "logs",
                heartbeat_interval=1.0,
            )
            workers.append(worker)
            tasks.append(asyncio.create_task(worker.run(stop)))

        async def a_quarter_done() -> bool:
            return await store.pool.fetchval("SELECT count(*) FROM events WHERE status = 'finished'") >= n // 4

        await eventually(a_quarter_done, timeout=60, what="a quarter of the events finished")
        await asyncio.to_thread(cluster.kill, killed)
        # and a job queue loses its ranges on the way (as with a lost disk)
        active = await store.pool.fetchval("SELECT max(id) FROM jobs WHERE status IN ('queued', 'running')")
        if active is not None:
            with contextlib.suppress(Exception):
                await control_broker.purge_queue(node_names.job(active))

        async def done() -> bool:
            return await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", wf) == "finished"

        await eventually(done, timeout=180, what="the workflow finished")
        events = await store.pool.fetch("SELECT status, attempt FROM events")
        assert {(r["status"], r["attempt"]) for r in events} == {("finished", 1)}
        assert len(events) == n
        attempts = await store.pool.fetch("SELECT status, count(*) FROM attempts GROUP BY status")
        assert {r["status"]: r["count"] for r in attempts} == {"finished": n}  # no phantom attempt
    finally:
        if killed:
            # in a thread: a node takes seconds to boot, and the control plane and the
            # workers share this loop (blocked, they missed their heartbeats and leases,
            # and their shutdown outlasted its bound: seen once in CI)
            await asyncio.to_thread(cluster.up, killed)
        stop.set()
        # bounded: a shutdown stuck on a broker call must fail the test, not hang the suite
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.broker.close()
        with contextlib.suppress(Exception):
            await control_broker.delete_topology()
        await control_broker.close()
        await store.close()
