"""Start-up while a service is down, with the real CLI as subprocesses: ``dispatcher
worker`` and ``dispatcher start`` wait (and say so) until RabbitMQ and Postgres answer,
and a signal ends the wait at once; the one-shot commands fail fast instead.

"Down" is a local port where nothing listens yet; "back" is a TCP forwarder opened on
that port to the real service."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from dispatcher.config import Names, Settings
from tests.helpers import eventually
from tests.test_e2e import BIN, cli_env
from transport.rabbitmq import Broker

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def at_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"))


class Forwarder:
    """Listens on ``port`` once started and pipes every connection to ``target``."""

    def __init__(self, port: int, target_url: str, default_port: int) -> None:
        self.port = port
        parts = urlsplit(target_url)
        self.target = (parts.hostname or "127.0.0.1", parts.port or default_port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


class Cli:
    """A ``dispatcher`` subprocess, its output in a file; always stopped afterwards."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.started = time.monotonic()
        with log.open("wb") as out:
            self.proc = subprocess.Popen([str(BIN / "dispatcher"), *args], env=env, stdout=out, stderr=out)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def logged(self, text: str, timeout: float = 30) -> None:
        async def check() -> bool:
            assert self.proc.poll() is None or text in self.output(), f"exited early:\n{self.output()}"
            return text in self.output()

        try:
            await eventually(check, timeout=timeout, what=repr(text))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- output\n{self.output()}") from None

    async def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> tuple[int, float]:
        """(exit code, seconds it took). Waited for without blocking the loop: the
        forwarders in this process carry the subprocess's goodbyes."""
        self.proc.send_signal(sig)
        t0 = time.monotonic()
        while self.proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                self.proc.kill()
                raise AssertionError(f"still running {timeout} s after {sig.name}\n{self.output()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode, time.monotonic() - t0

    async def exited(self, timeout: float = 20) -> int:
        async def check() -> bool:
            return self.proc.poll() is not None

        await eventually(check, timeout=timeout, what=f"{self.log.stem} to exit")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Cli | Forwarder]]:
    things: list[Cli | Forwarder] = []
    yield things
    for thing in things:
        if isinstance(thing, Cli):
            thing.kill()
    for thing in things:
        if isinstance(thing, Forwarder):
            await thing.close()


def assert_clean(cli: Cli, *, password: str) -> None:
    out = cli.output()
    assert "Traceback" not in out, out
    if password:
        assert f":{password}@" not in out, "a password in the log"


async def test_worker_waits_for_rabbitmq(
    settings: Settings, broker: Broker, tmp_path: Path, cleanup: list[Cli | Forwarder]
) -> None:
    port = free_port()
    env = cli_env(settings) | {"DISPATCHER_AMQP_URL": at_port(settings.amqp_url, port)}
    worker = Cli(env, tmp_path / "worker.log", "worker")
    cleanup.append(worker)
    await worker.logged("RabbitMQ unavailable: waiting")
    await asyncio.sleep(2)
    assert worker.proc.poll() is None, worker.output()
    assert f"127.0.0.1:{port}" in worker.output()  # which service it waits for

    forwarder = Forwarder(port, settings.amqp_url, 5672)
    cleanup.append(forwarder)
    await forwarder.start()
    await worker.logged("worker started", timeout=20)  # backoff is capped at 10 s
    assert "connected to RabbitMQ" in worker.output()
    code, _ = await worker.stop()
    assert code == 0, worker.output()
    assert_clean(worker, password=urlsplit(settings.amqp_url).password or "")


async def test_worker_waits_for_the_control_plane_to_declare_the_queues(
    settings: Settings, tmp_path: Path, cleanup: list[Cli | Forwarder]
) -> None:
    """Declaring is the control plane's job: a worker up first waits for it."""
    names = Names(settings.names.prefix + "late.")
    worker = Cli(cli_env(settings) | {"DISPATCHER_QUEUE_PREFIX": names.prefix}, tmp_path / "worker.log", "worker")
    cleanup.append(worker)
    await worker.logged("queues not declared yet")
    control = await Broker.connect(settings.amqp_url, names, client="pytest")
    try:
        await control.declare_topology()
        await worker.logged("worker started", timeout=20)
        code, _ = await worker.stop()
        assert code == 0, worker.output()
    finally:
        await control.delete_topology()
        await control.close()
    assert_clean(worker, password="")


async def test_start_waits_for_postgres_then_rabbitmq(
    settings: Settings, broker: Broker, tmp_path: Path, cleanup: list[Cli | Forwarder]
) -> None:
    amqp_port, pg_port = free_port(), free_port()
    env = cli_env(settings) | {
        "DISPATCHER_AMQP_URL": at_port(settings.amqp_url, amqp_port),
        "DISPATCHER_DATABASE_URL": at_port(settings.database_url, pg_port),
    }
    start = Cli(env, tmp_path / "start.log", "start", "--no-monitor")
    cleanup.append(start)
    await start.logged("Postgres unavailable: waiting")
    await asyncio.sleep(2)
    assert start.proc.poll() is None, start.output()
    assert "RabbitMQ" not in start.output()  # Postgres first: the schema is upgraded before anything

    pg = Forwarder(pg_port, settings.database_url, 5432)
    cleanup.append(pg)
    await pg.start()
    await start.logged("RabbitMQ unavailable: waiting", timeout=20)
    assert "connected to Postgres" in start.output()
    mq = Forwarder(amqp_port, settings.amqp_url, 5672)
    cleanup.append(mq)
    await mq.start()
    await start.logged("control plane running", timeout=20)
    assert await broker.queue_depth(settings.names.jobs) is not None  # it declared the topology
    code, _ = await start.stop()
    assert code == 0, start.output()
    assert_clean(start, password=urlsplit(settings.amqp_url).password or "")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", [["worker"], ["start", "--no-monitor"]], ids=["worker", "start"])
async def test_a_signal_ends_the_wait_at_once(
    settings: Settings, tmp_path: Path, cleanup: list[Cli | Forwarder], command: list[str], sig: signal.Signals
) -> None:
    env = cli_env(settings) | {"DISPATCHER_AMQP_URL": at_port(settings.amqp_url, free_port())}
    cli = Cli(env, tmp_path / "cli.log", *command)
    cleanup.append(cli)
    await cli.logged("RabbitMQ unavailable: waiting")
    await asyncio.sleep(1.5)  # into a longer backoff step
    code, took = await cli.stop(sig)
    assert code in (0, 130), cli.output()
    assert took < 3, f"took {took:.1f} s to stop"
    assert_clean(cli, password="")


async def test_a_refused_login_is_not_waited_for(
    settings: Settings, tmp_path: Path, cleanup: list[Cli | Forwarder]
) -> None:
    """A wrong password will not cure itself: the worker says so and exits 1."""
    parts = urlsplit(settings.amqp_url)
    wrong = urlunsplit(
        parts._replace(netloc=f"{parts.username or 'guest'}:not-the-password@{parts.hostname}:{parts.port or 5672}")
    )
    cli = Cli(cli_env(settings) | {"DISPATCHER_AMQP_URL": wrong}, tmp_path / "cli.log", "worker")
    cleanup.append(cli)
    assert await cli.exited() == 1, cli.output()
    assert "login refused" in cli.output()
    assert_clean(cli, password="not-the-password")


@pytest.mark.parametrize(
    ("command", "down"),
    [
        (["status"], "DISPATCHER_DATABASE_URL"),
        (["submit", "nothing.yaml"], "DISPATCHER_DATABASE_URL"),
        (["cancel", "1"], "DISPATCHER_AMQP_URL"),
        (["replay", "--dry-run"], "DISPATCHER_AMQP_URL"),
    ],
    ids=["status", "submit", "cancel", "replay"],
)
async def test_one_shot_commands_fail_fast(
    settings: Settings, tmp_path: Path, cleanup: list[Cli | Forwarder], command: list[str], down: str
) -> None:
    env = cli_env(settings)
    env[down] = at_port(env[down], free_port())
    cli = Cli(env, tmp_path / "cli.log", *command)
    cleanup.append(cli)
    t0 = time.monotonic()
    await cli.exited()
    out = cli.output().strip()
    assert cli.proc.returncode == 1, out
    assert time.monotonic() - t0 < 10
    assert out.splitlines()[-1].startswith("error: "), out
    assert "waiting" not in out and "Traceback" not in out, out
