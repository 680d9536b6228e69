"""Per-role RabbitMQ permissions (DESIGN.md, "Trust model"), on the real broker: the users
made by scripts/rabbitmq-roles.sh, in a vhost of this module's own. The worker user
consumes job queues and announcements, publishes statuses to the es.status exchange and
listens on its own control queue — and can do nothing else the tests could think of."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from dispatcher.config import Names, Settings
from dispatcher.store import Store
from dispatcher.submit import submit
from tests.conftest import ROOT, Services
from tests.helpers import eventually
from tests.test_e2e import cli_env
from tests.test_failures import write_workflow
from tests.test_startup import Cli
from transport.policy import DELAY_STEPS_MS
from transport.rabbitmq import DELAY_HEADER, Broker

SCRIPT = ROOT / "scripts" / "rabbitmq-roles.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed: cannot create a vhost and users"
)


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], input=stdin, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


@dataclass(frozen=True)
class Roles:
    vhost: str
    names: Names
    worker_url: str
    control_url: str
    worker_user: str
    control_user: str
    admin_url: str  # the services' own (administrator) user, for what neither role may do


def vhost_url(amqp_url: str, vhost: str, user: str, password: str) -> str:
    parts = urlsplit(amqp_url)
    netloc = f"{quote(user)}:{quote(password)}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit(parts._replace(netloc=netloc, path="/" + quote(vhost, safe="")))


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.fixture(scope="module")
def roles(services: Services) -> Iterator[Roles]:
    """A vhost, the two users (the script run twice: the second run must be a no-op but
    for the password), and the fixed topology declared by the control user."""
    try:
        rabbitmqctl("list_vhosts")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"rabbitmqctl cannot reach the test broker's node: {exc}")
    tag = uuid.uuid4().hex[:8]
    vhost, worker, control = f"es-perm-{tag}", f"es-worker-{tag}", f"es-control-{tag}"
    # a dot in the prefix: unescaped it would also grant "p<tag>Xes.jobs" (tested below)
    names = Names(f"p{tag}.")
    rabbitmqctl("add_vhost", vhost)
    admin = urlsplit(services.amqp_url)
    try:
        first = run_script("--vhost", vhost, "--prefix", names.prefix, worker, "old-secret", control, "old-secret")
        assert first.returncode == 0, first.stderr
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "ES_WORKER_PASSWORD": "w-secret", "ES_CONTROL_PASSWORD": "c-pw"}
        again = run_script("--vhost", vhost, "--prefix", names.prefix, worker, control, env=env)
        assert again.returncode == 0, again.stderr
        assert "exists: setting its password" in again.stderr
        assert "w-secret" not in again.stderr + again.stdout  # never echoed
        r = Roles(
            vhost=vhost,
            names=names,
            worker_url=vhost_url(services.amqp_url, vhost, worker, "w-secret"),
            control_url=vhost_url(services.amqp_url, vhost, control, "c-pw"),
            worker_user=worker,
            control_user=control,
            admin_url=vhost_url(services.amqp_url, vhost, admin.username or "guest", admin.password or "guest"),
        )
        rabbitmqctl("set_permissions", "-p", vhost, admin.username or "guest", ".*", ".*", ".*")
        asyncio.run(declare_topology(r))
        yield r
    finally:
        rabbitmqctl("delete_vhost", vhost)
        for user in (worker, control):
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60, check=False)


async def declare_topology(roles: Roles) -> None:
    broker = await Broker.connect(roles.control_url, roles.names, client="pytest-control")
    try:
        await broker.declare_topology()  # the es.status exchange and its binding included
    finally:
        await broker.close()


@pytest.fixture
async def worker(roles: Roles) -> AsyncIterator[AbstractConnection]:
    conn = await aio_pika.connect(roles.worker_url, client_properties={"connection_name": "pytest-worker"})
    yield conn
    await conn.close()


@pytest.fixture
async def control(roles: Roles) -> AsyncIterator[Broker]:
    broker = await Broker.connect(roles.control_url, roles.names, client="pytest-control")
    yield broker
    await broker.close()


def job_id() -> int:
    return uuid.uuid4().int % 10**9


async def get_one(broker: Broker, queue: str) -> bytes | None:
    """Take one message from ``queue`` as the control user (None if it is empty)."""
    ch = await broker.channel()
    try:
        q = await ch.declare_queue(queue, passive=True)
        message = await q.get(no_ack=True, fail=False)
        return None if message is None else message.body
    finally:
        await ch.close()


async def refused(conn: AbstractConnection, op: Callable[[AbstractChannel], Awaitable[object]]) -> None:
    """``op`` on a fresh confirming channel must be refused (403 closes that channel only)."""
    ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await op(ch)


async def publish(ch: AbstractChannel, exchange: str, routing_key: str, headers: dict[str, str] | None = None) -> None:
    x = ch.default_exchange if exchange == "" else await ch.get_exchange(exchange, ensure=False)
    await x.publish(aio_pika.Message(b'{"job_id": 1}', headers=headers or {}), routing_key=routing_key)


def test_script_sets_exactly_the_role_regexes(roles: Roles) -> None:
    rows = {
        line.split("\t")[0]: line.split("\t")[1:]
        for line in rabbitmqctl("list_permissions", "-p", roles.vhost).splitlines()
    }
    p = roles.names.prefix.replace(".", "\\.")
    own = "amq\\.gen-.*|amq_[0-9a-f]{32}"  # server-named, or named by aio-pika's robust channel
    assert rows[roles.worker_user] == [
        f"^({own})$",
        f"^({own}|{p}es\\.status)$",
        f"^({p}es\\.job\\.[0-9]+|{p}es\\.jobs|{p}es\\.control|{own})$",
    ]
    assert rows[roles.control_user] == [f"^{p}.*$", f"^({p}.*|amq\\.default)$", f"^{p}.*$"]


def test_script_rejects_bad_usage() -> None:
    assert run_script("only-one-user").returncode == 2
    same = run_script("u", "pw", "u", "pw")
    assert same.returncode == 2 and "two users" in same.stderr
    no_env = run_script("w", "c", env={"PATH": "/usr/bin:/bin"})
    assert no_env.returncode != 0 and "ES_WORKER_PASSWORD" in no_env.stderr


async def test_control_user_declares_the_topology_and_publishes(roles: Roles, control: Broker) -> None:
    n = roles.names
    await control.declare_topology()  # again: idempotent, and within its rights
    job = n.job(job_id())
    await control.declare_job_queue(job)
    await control.publish_many([(job, b'{"range": 1}'), (job, b'{"range": 2}')])
    await control.publish(n.jobs, b'{"announce": 1}')
    await control.publish_delayed(job, b'{"retry": 1}', 0.1)
    await control.dead_letter(b"{}", "test", source=job)
    await control.broadcast(b'{"cancel": 1}')
    assert await get_one(control, job) == b'{"range": 1}'
    assert await get_one(control, n.jobs) == b'{"announce": 1}'
    assert await get_one(control, n.dlq) == b"{}"
    await asyncio.sleep(0.3)  # the retry's delay step (100 ms), then back into the job queue
    assert await get_one(control, job) == b'{"range": 2}'
    assert await get_one(control, job) == b'{"retry": 1}'
    await control.delete_queue(job)


async def test_worker_consumes_a_job_and_an_announcement_and_rejects(
    roles: Roles, worker: AbstractConnection, control: Broker
) -> None:
    n = roles.names
    job = n.job(job_id())
    await control.declare_job_queue(job)
    await control.publish_many([(job, b'{"range": 1}'), (job, b'{"range": 2}')])
    await control.publish(n.jobs, b'{"announce": 7}')

    ch = await worker.channel()
    await ch.set_qos(prefetch_count=2)
    announcements = await ch.declare_queue(n.jobs, passive=True)  # passive: no permission needed
    got = await announcements.get(no_ack=False)
    assert got.body == b'{"announce": 7}'
    await got.ack()

    queue = await ch.declare_queue(job, passive=True)
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    tag = await queue.consume(received.put, no_ack=False)  # basic.consume: read on the queue
    first = await asyncio.wait_for(received.get(), 5)
    second = await asyncio.wait_for(received.get(), 5)
    await first.ack()
    # rejected without requeue: RabbitMQ dead-letters it (the queue's own policy; no
    # permission of the worker's is checked for that)
    await second.reject(requeue=False)
    await queue.cancel(tag)
    await asyncio.sleep(0.2)
    assert await get_one(control, n.dead_ranges) == b'{"range": 2}'
    assert await get_one(control, job) is None
    await control.delete_queue(job)


async def test_worker_publishes_statuses_to_the_status_exchange_only(
    roles: Roles, worker: AbstractConnection, control: Broker
) -> None:
    n = roles.names
    ch = await worker.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await ch.get_exchange(n.status_exchange, ensure=True)  # passive: allowed
    await exchange.publish(aio_pika.Message(b'{"status": "finished"}'), routing_key="anything")
    assert await get_one(control, n.status) == b'{"status": "finished"}'
    # through the default exchange, straight into the status queue: refused
    await refused(worker, lambda c: publish(c, "", n.status))


async def test_worker_listens_on_its_own_control_queue(
    roles: Roles, worker: AbstractConnection, control: Broker
) -> None:
    ch = await worker.channel()
    queue = await ch.declare_queue(exclusive=True, auto_delete=True)  # server-named amq.gen-...
    assert queue.name.startswith("amq.gen-")
    await queue.bind(roles.names.control)
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(received.put, no_ack=True)
    await control.broadcast(b'{"cancel": 42}')
    assert (await asyncio.wait_for(received.get(), 5)).body == b'{"cancel": 42}'
    # but it may not name one itself, nor read the status stream through one
    await refused(worker, lambda c: c.declare_queue("amq.gen-mine", exclusive=True))
    await refused(worker, lambda c: c.declare_queue(f"{roles.names.prefix}mine", exclusive=True))
    spy = await (await worker.channel()).declare_queue(exclusive=True, auto_delete=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await spy.bind(roles.names.status_exchange)


async def test_worker_listens_through_the_broker_code(roles: Roles, control: Broker) -> None:
    """Broker.listen_control on a robust connection: aio-pika names the queue itself."""
    broker = await Broker.connect(roles.worker_url, roles.names, client="pytest-worker")
    try:
        received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await broker.listen_control(received.put)
        await control.broadcast(b'{"cancel": 43}')
        assert (await asyncio.wait_for(received.get(), 5)).body == b'{"cancel": 43}'
    finally:
        await broker.close()


async def test_worker_cannot_route_around_through_a_dead_letter_exchange(
    roles: Roles, worker: AbstractConnection
) -> None:
    """A queue of its own whose dead letters go through the default exchange to es.jobs
    would be a publish in disguise: declaring it checks write on that exchange."""
    n = roles.names
    for dlx, key in (("", n.jobs), ("", n.job(1)), (n.delay, n.jobs), (n.control, "")):
        args: dict[str, str | int] = {"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": key}
        await refused(worker, lambda c, a=args: c.declare_queue(exclusive=True, arguments={**a, "x-message-ttl": 1}))  # type: ignore[misc]


def worker_publishes(n: Names) -> list[tuple[str, str, str, dict[str, str] | None]]:
    """(what, exchange, routing key, headers) of every publish the worker must not make."""
    job = n.job(1)
    cases: list[tuple[str, str, str, dict[str, str] | None]] = [
        ("announcement via the default exchange", "", n.jobs, None),
        ("range into a job queue", "", job, None),
        ("dead letter", "", n.dlq, None),
        ("fake dead range", "", n.dead_ranges, None),
        ("status straight into the queue", "", n.status, None),
        ("cancel broadcast", n.control, "", None),
        ("delayed announcement", n.delay, n.jobs, {DELAY_HEADER: str(DELAY_STEPS_MS[0])}),
        ("delayed range", n.delay, job, {DELAY_HEADER: str(DELAY_STEPS_MS[0])}),
    ]
    for exchange in ("amq.direct", "amq.fanout", "amq.topic", "amq.headers", "amq.match"):
        cases.append((f"announcement via {exchange}", exchange, n.jobs, None))
    return cases


@pytest.mark.parametrize("case", range(len(worker_publishes(Names()))), ids=[c[0] for c in worker_publishes(Names())])
async def test_worker_cannot_publish_work(roles: Roles, worker: AbstractConnection, case: int) -> None:
    _what, exchange, key, headers = worker_publishes(roles.names)[case]
    await refused(worker, lambda c: publish(c, exchange, key, headers))


async def test_worker_cannot_change_the_topology(roles: Roles, worker: AbstractConnection, control: Broker) -> None:
    n = roles.names
    job = n.job(job_id())
    await control.declare_job_queue(job)
    ops: list[Callable[[AbstractChannel], Awaitable[object]]] = [
        lambda c: c.declare_queue(n.job(job_id()), durable=True),  # a new job queue
        lambda c: c.declare_queue(n.jobs, durable=True),  # re-declaring an existing one is configure too
        lambda c: c.declare_queue(f"{n.prefix}evil", durable=True),
        lambda c: c.queue_delete(job),
        lambda c: c.queue_delete(n.jobs),
        lambda c: c.queue_delete(n.dlq),
        lambda c: c.declare_exchange(f"{n.prefix}evil", aio_pika.ExchangeType.FANOUT),
        lambda c: c.exchange_delete(n.control),
        lambda c: c.exchange_delete(n.status_exchange),
        # unbinding the status queue would drop every status (read on the exchange: no)
        lambda c: _unbind_status(c, n),
    ]
    for op in ops:
        await refused(worker, op)
    assert await control.queue_depth(job) == 0  # still there
    await control.delete_queue(job)


async def _unbind_status(ch: AbstractChannel, n: Names) -> None:
    queue = await ch.get_queue(n.status, ensure=False)
    await queue.unbind(n.status_exchange)


async def test_worker_cannot_read_what_is_not_work(roles: Roles, worker: AbstractConnection, control: Broker) -> None:
    n = roles.names
    for queue in (n.status, n.dlq, n.dead_ranges, n.retry(DELAY_STEPS_MS[0])):
        ch = await worker.channel()
        q = await ch.declare_queue(queue, passive=True)  # looking is allowed
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await q.get(no_ack=True, fail=False)


async def test_the_prefix_is_escaped_in_the_regexes(roles: Roles, worker: AbstractConnection) -> None:
    """An unescaped "." in the prefix would match any character: another deployment's
    "p<tag>Xes.jobs" must stay out of reach."""
    lookalike = roles.names.prefix[:-1] + "Xes.jobs"
    guest = await aio_pika.connect(roles.admin_url)
    try:
        await (await guest.channel()).declare_queue(lookalike, auto_delete=True)
        await refused(worker, lambda c: _get(c, lookalike))
    finally:
        await guest.close()


async def _get(ch: AbstractChannel, queue: str) -> None:
    q = await ch.declare_queue(queue, passive=True)
    await q.get(no_ack=True, fail=False)


async def test_what_the_worker_can_do_beyond_its_role(
    roles: Roles, worker: AbstractConnection, control: Broker
) -> None:
    """The limits of RabbitMQ's three regexes, pinned so that the README stays true:
    reading a queue includes purging it (a worker could as well consume and ack it all),
    and write on the es.status exchange (also the status queue's name) with read on
    es.control lets it bind the status queue to es.control: cancel broadcasts would then
    reach the bookkeeper too, which dead-letters them as malformed statuses."""
    n = roles.names
    job = n.job(job_id())
    await control.declare_job_queue(job)
    await control.publish(job, b"{}")
    ch = await worker.channel()
    assert await (await ch.declare_queue(job, passive=True)).purge()
    status = await ch.get_queue(n.status, ensure=False)
    await status.bind(n.control)
    await status.unbind(n.control)
    await control.delete_queue(job)


async def test_a_workflow_runs_with_the_role_users(roles: Roles, settings: Settings, tmp_path: Path) -> None:
    """The real processes under the two users: ``dispatcher start`` as the control user,
    ``dispatcher worker`` as the worker user; a success, a retry and a dead letter all
    happen without one refused operation."""
    names = Names(roles.names.prefix)
    base = cli_env(settings) | {"DISPATCHER_QUEUE_PREFIX": names.prefix, "PYTHONPATH": str(ROOT)}
    store = await Store.connect(settings.database_url)
    procs: list[Cli] = []
    try:
        wf = await submit(
            store,
            write_workflow(
                tmp_path,
                {"isr": ["ok:1", f"once:{tmp_path / 'm1'}", f"until:{tmp_path / 'never'}", "ok:2"]},
                retries=2,
                per_job=2,
            ),
        )
        procs.append(
            Cli(base | {"DISPATCHER_AMQP_URL": roles.control_url}, tmp_path / "start.log", "start", "--no-monitor")
        )
        procs.append(
            Cli(base | {"DISPATCHER_AMQP_URL": roles.worker_url}, tmp_path / "worker.log", "worker", "--slots", "2")
        )

        async def ended() -> bool:
            for p in procs:
                assert p.proc.poll() is None, f"{p.log.stem} exited\n{p.output()}"
            return bool(await store.pool.fetchval("SELECT status <> 'running' FROM workflows WHERE id = $1", wf))

        try:
            await eventually(ended, timeout=60, what="the workflow to end")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n" + "\n".join(f"--- {p.log.stem}\n{p.output()[-3000:]}" for p in procs)
            ) from None
        rows = {
            r["payload"]: (r["status"], r["attempt"])
            for r in await store.pool.fetch("SELECT payload, status, attempt FROM events")
        }
        assert rows[f"once:{tmp_path / 'm1'}"] == ("finished", 2)
        assert rows[f"until:{tmp_path / 'never'}"][0] == "failed"
        assert rows["ok:1"][0] == rows["ok:2"][0] == "finished"
        for p in procs:
            code, _ = await p.stop()
            assert code == 0, p.output()
            assert "ACCESS_REFUSED" not in p.output(), p.output()
    finally:
        for p in procs:
            p.kill()
        await store.close()
