"""The ``dispatcher`` command. Exit codes: 0 success, 2 bad input, 1 any other failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click
import orjson

from dispatcher import logs
from dispatcher.config import Names, Settings, redact
from dispatcher.connect import ServiceRefused, await_topology, connect_broker, connect_store
from dispatcher.status import follow, progress_line, render
from dispatcher.store import Store
from schemas.submission import SubmissionError
from transport.interface import Transport

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(func: F) -> F:
    """Every command takes the connection flags; they override DISPATCHER_* variables."""
    func = click.option(
        "--queue-prefix", default=None, help="Prefix of every queue name [env DISPATCHER_QUEUE_PREFIX]."
    )(func)
    func = click.option("--database-url", default=None, help="Postgres DSN [env DISPATCHER_DATABASE_URL].")(func)
    func = click.option(
        "--amqp-url",
        multiple=True,
        help="RabbitMQ URL; repeat it (or separate by commas) for a cluster's nodes, tried in turn "
        "[env DISPATCHER_AMQP_URL].",
    )(func)
    return func


def settings_from(
    amqp_url: tuple[str, ...] | str | None, database_url: str | None, queue_prefix: str | None, **more: Any
) -> Settings:
    base = Settings.from_env()
    names = Names(queue_prefix) if queue_prefix is not None else None
    urls = ",".join(amqp_url) if isinstance(amqp_url, tuple) else amqp_url
    return base.override(amqp_url=urls or None, database_url=database_url, names=names, **more)


@contextlib.asynccontextmanager
async def one_shot(settings: Settings, client: str, *, pool: int = 1) -> AsyncIterator[tuple[Store, Transport]]:
    """The store and the broker of a one-shot command (no waiting for them: a user at a
    terminal wants an answer), closed after it."""
    from transport.rabbitmq import Broker

    store = await Store.connect(settings.database_url, max_size=pool)
    try:
        broker = await Broker.connect(settings.amqp_url, settings.names, client=client, queue_type=settings.queue_type)
        try:
            yield store, broker
        finally:
            await broker.close()
    finally:
        await store.close()


# select(2) takes file descriptors below 1024 only; a worker holds a few sockets and at
# most one child per slot, far below that up to this many slots
PRECISE_TIMERS_MAX_SLOTS = 512


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers wake on time. epoll takes its timeout in whole
    milliseconds and asyncio rounds it up: a payload's 50 ms sleep, armed after other
    timers, woke 0.5 ms late on average (1.0 against 0.4 ms, measured on this VM);
    select(2) takes microseconds."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def run_async(coro: Coroutine[Any, Any, int | None], *, precise_timers: bool = False) -> None:
    """Run a command's coroutine; map failures onto exit codes with a one-line message."""
    try:
        with asyncio.Runner(loop_factory=precise_loop if precise_timers else None) as runner:
            code = runner.run(coro)
    except SubmissionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    except ServiceRefused as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


@click.group()
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING or ERROR.")
@click.version_option(package_name="es-dispatcher")
def main(log_level: str) -> None:
    """EventService dispatcher: run workflows of many short payloads as events on
    RabbitMQ, with per-event bookkeeping in Postgres."""
    logs.setup(log_level.upper())


def monitor_options(func: F) -> F:
    func = click.option(
        "--monitor-port", type=int, default=None, help="Monitor port [env DISPATCHER_MONITOR_PORT, default 8321]."
    )(func)
    func = click.option(
        "--monitor-host", default=None, help="Monitor address [env DISPATCHER_MONITOR_HOST, default 127.0.0.1]."
    )(func)
    return func


def monitor_app(settings: Settings, store: Store, broker: Any) -> Any:
    from dispatcher.monitor import MonitorConfig, create_app, default_hosts

    config = MonitorConfig(
        token=settings.monitor_token,
        read_token=settings.monitor_read_token,
        log_dir=settings.log_dir,  # logs are served from under it only
        hosts=settings.monitor_hosts or default_hosts(settings.monitor_host),
        pilot_token=settings.pilot_token,
        pilot_origin=settings.pilot_origin,
        pilot_lease=settings.pilot_lease,
        pilot_wait=settings.pilot_wait,
    )
    return create_app(store, broker, config)


@main.command()
@connection_options
@monitor_options
@click.option(
    "--release-window",
    type=click.IntRange(min=1),
    default=None,
    help="Jobs with a queue at one time [env DISPATCHER_RELEASE_WINDOW, default 200].",
)
@click.option("--no-monitor", is_flag=True, help="Do not serve the monitor.")
def start(
    release_window: int | None, monitor_host: str | None, monitor_port: int | None, no_monitor: bool, **conn: Any
) -> None:
    """Run the control plane: releaser, bookkeeper, finisher, and the monitor (stop with Ctrl-C/SIGTERM)."""
    from dispatcher.control import ControlPlane
    from dispatcher.monitor import serve

    settings = settings_from(
        **conn, release_window=release_window, monitor_host=monitor_host, monitor_port=monitor_port
    )

    async def go() -> int:
        stop = stop_on_signals()
        async with contextlib.AsyncExitStack() as resources:
            # a service that is down is waited for (a signal ends the wait): started by the
            # same init system, the control plane may come up before RabbitMQ or Postgres
            store = await connect_store(settings.database_url, max_size=6, stop=stop)
            if store is None:
                return 0
            resources.push_async_callback(store.close)
            await store.upgrade()
            broker = await connect_broker(
                settings.amqp_url,
                settings.names,
                client="dispatcher-control",
                stop=stop,
                queue_type=settings.queue_type,
            )
            if broker is None:
                return 0
            resources.push_async_callback(broker.close)
            await broker.declare_topology()
            control = ControlPlane(settings, store, broker)
            if no_monitor:
                await control.run(stop)
            else:
                app = monitor_app(settings, control.store, control.broker)
                await asyncio.gather(control.run(stop), serve(app, settings.monitor_host, settings.monitor_port, stop))
        return 0

    run_async(go())


@main.command()
@connection_options
@monitor_options
def monitor(monitor_host: str | None, monitor_port: int | None, **conn: Any) -> None:
    """Serve the monitor alone (pages, JSON API, /metrics) from the bookkeeping."""
    from dispatcher.monitor import serve
    from transport.rabbitmq import Broker

    settings = settings_from(**conn, monitor_host=monitor_host, monitor_port=monitor_port)

    async def go() -> int:
        stop = stop_on_signals()
        store = await Store.connect(settings.database_url)
        broker = await Broker.connect(
            settings.amqp_url, settings.names, client="dispatcher-monitor", queue_type=settings.queue_type
        )
        try:
            await serve(monitor_app(settings, store, broker), settings.monitor_host, settings.monitor_port, stop)
        finally:
            await broker.close()
            await store.close()
        return 0

    run_async(go())


@main.command()
@connection_options
@click.option("--slots", type=click.IntRange(min=1), default=1, show_default=True, help="Events run at once.")
@click.option(
    "--prefetch",
    type=click.IntRange(min=1),
    default=None,
    help="Ranges held at once: running, waiting for a slot or for their ack [default: slots]. More keeps slots "
    "busy with payloads of milliseconds; a worker that dies charges an attempt to all it held.",
)
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Jobs' working directories [env DISPATCHER_WORK_DIR].",
)
@click.option(
    "--log-dir", type=click.Path(path_type=Path), default=None, help="Where job logs go [env DISPATCHER_LOG_DIR]."
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="On SIGTERM: seconds running events may take to finish before they are stopped and given back.",
)
def worker(
    slots: int, prefetch: int | None, work_dir: Path | None, log_dir: Path | None, grace: float, **conn: Any
) -> None:
    """Run a worker (the pilot): take jobs, run their events, report every status."""
    from workers.worker import Worker

    settings = settings_from(**conn, work_dir=work_dir, log_dir=log_dir)

    async def go() -> int:
        stop = stop_on_signals()
        broker = await connect_broker(
            settings.amqp_url, settings.names, client="dispatcher-worker", stop=stop, queue_type=settings.queue_type
        )
        if broker is None:
            return 0
        try:
            # the topology is the control plane's to declare (a worker's RabbitMQ user
            # may not): wait for it rather than fail if the worker came up first
            if not await await_topology(broker, settings.amqp_url, stop=stop):
                return 0
            await Worker(
                broker,
                slots=slots,
                prefetch=prefetch,
                work_dir=settings.work_dir,
                log_dir=settings.log_dir,
                grace=grace,
                heartbeat_interval=settings.heartbeat_interval,
            ).run(stop)
        finally:
            await broker.close()
        return 0

    run_async(go(), precise_timers=slots <= PRECISE_TIMERS_MAX_SLOTS)


@main.command()
@connection_options
@click.argument("workflow", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--mapping",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Mapping file (label -> event number -> payload); overrides 'mapping:' in WORKFLOW.",
)
@click.option("--wait", is_flag=True, help="Show progress; exit 0 only if every event finished.")
def submit(workflow: Path, mapping: Path | None, wait: bool, **conn: Any) -> None:
    """Submit WORKFLOW.yaml; prints the workflow id."""
    from dispatcher.submit import submit as do_submit

    settings = settings_from(**conn)

    async def go() -> int:
        store = await Store.connect(settings.database_url, max_size=2)
        try:
            await store.upgrade()
            wf = await do_submit(store, workflow, mapping)
            click.echo(wf)
            if wait:
                return await wait_for_workflow(store, wf)
            return 0
        finally:
            await store.close()

    run_async(go())


async def wait_for_workflow(store: Store, workflow_id: int) -> int:
    """Show progress until the workflow ends; 0 only if it finished."""
    tty = sys.stderr.isatty()
    async for status in follow(store, workflow_id):
        line = progress_line(status)
        click.echo(("\r" + line) if tty else line, err=True, nl=not tty)
    if tty:
        click.echo("", err=True)
    click.echo(render(status), err=True)
    return 0 if status["status"] == "finished" else 1


@main.command()
@connection_options
@click.argument("workflow_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Live progress bars until the workflow ends (Ctrl-C to leave).")
def status(workflow_id: int | None, as_json: bool, watch: bool, **conn: Any) -> None:
    """Per task: events by state and jobs by state (latest workflows without an id)."""
    settings = settings_from(**conn)
    if watch and (workflow_id is None or as_json):
        raise click.UsageError("--watch needs a WORKFLOW_ID and no --json")

    async def go() -> int:
        store = await Store.connect(settings.database_url, max_size=1)
        try:
            if workflow_id is None:
                rows = await store.latest_workflows()
                if as_json:
                    click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
                for r in [] if as_json else rows:
                    click.echo(
                        f"{r['id']:>6}  {r['status']:<9} {r['n_events']:>9} events  {r['submitted_at']}  {r['name']}"
                    )
                return 0
            st = await store.workflow_status(workflow_id)
            if st is None:
                click.echo(f"error: no workflow {workflow_id}", err=True)
                return 2
            if watch:
                from dispatcher.watch import watch_workflow

                return await watch_workflow(store, workflow_id)
            click.echo(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() if as_json else render(st))
            return 0
        finally:
            await store.close()

    run_async(go())


@main.command()
@connection_options
@click.option("--repair", is_flag=True, help="Mend what is found (republish lost ranges, finish stuck jobs).")
def doctor(repair: bool, **conn: Any) -> None:
    """Compare Postgres (the truth) with RabbitMQ: job queues missing or emptied while
    events wait, jobs whose events have all ended, queues of ended jobs left behind.
    Exits 1 if it found a disagreement it did not repair."""
    from dispatcher.finisher import Finisher
    from dispatcher.reconcile import Reconciler
    from dispatcher.releaser import Releaser

    settings = settings_from(**conn)

    async def go() -> int:
        async with one_shot(settings, "dispatcher-doctor", pool=2) as (store, broker):
            releaser = Releaser(store, broker, window=settings.release_window)
            reconciler = Reconciler(store, broker, releaser, Finisher(store, broker, releaser.wake))
            found = await reconciler.look(deep=True)
            for d in found:
                click.echo(d.describe())
            if found and repair:
                await reconciler.repair(found)
                click.echo(f"repaired {len(found)} disagreement(s)")
                return 0
        if not found:
            click.echo("Postgres and RabbitMQ agree")
        return 1 if found else 0

    run_async(go())


@main.command()
@connection_options
@click.argument("workflow_id", type=int)
def cancel(workflow_id: int, **conn: Any) -> None:
    """Cancel a running workflow: remaining events become 'cancelled', its queues are
    removed and workers stop its running payloads."""
    from dispatcher.replay import cancel as do_cancel

    settings = settings_from(**conn)

    async def go() -> int:
        async with one_shot(settings, "dispatcher-cancel") as (store, broker):
            await broker.declare_topology()
            jobs = await do_cancel(store, broker, workflow_id)
        if jobs is None:
            click.echo(f"error: workflow {workflow_id} is not running (or does not exist)", err=True)
            return 2
        click.echo(f"cancelled workflow {workflow_id}: {len(jobs)} job(s) stopped")
        return 0

    run_async(go())


@main.command()
@connection_options
@click.option("--workflow", "workflow_id", type=int, default=None, help="Only this workflow's events.")
@click.option("--task", "label", default=None, help="Only this task (label).")
@click.option("--job", "job_id", type=int, default=None, help="Only this job.")
@click.option("--event", "number", type=int, default=None, help="Only this event number.")
@click.option("--reason", default=None, help="Only events whose last error contains this text.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Replay at most this many.")
@click.option("--dry-run", is_flag=True, help="Print what would be replayed; change nothing.")
def replay(
    workflow_id: int | None,
    label: str | None,
    job_id: int | None,
    number: int | None,
    reason: str | None,
    limit: int | None,
    dry_run: bool,
    **conn: Any,
) -> None:
    """Put failed events from the dead-letter queue back into their jobs with fresh attempts."""
    from dispatcher.replay import Selector
    from dispatcher.replay import replay as do_replay

    settings = settings_from(**conn)
    selector = Selector(workflow=workflow_id, task=label, job=job_id, event=number, reason=reason)

    async def go() -> int:
        async with one_shot(settings, "dispatcher-replay") as (store, broker):
            await broker.declare_topology()
            outcomes = await do_replay(store, broker, selector, limit=limit, dry_run=dry_run)
        for outcome in outcomes:
            click.echo(outcome.describe())
        done = sum(o.action in ("replayed", "would replay") for o in outcomes)
        click.echo(f"{'would replay' if dry_run else 'replayed'} {done} event(s)", err=True)
        return 0

    run_async(go())


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command()
@connection_options
def upgrade(**conn: Any) -> None:
    """Apply schema migrations (``dispatcher start`` does it too)."""
    settings = settings_from(**conn)

    async def go() -> int:
        store = await Store.connect(settings.database_url, max_size=1)
        try:
            applied = await store.upgrade()
            version = await store.schema_version()
        finally:
            await store.close()
        click.echo(
            f"schema at version {version} ({len(applied)} migration(s) applied) on {redact(settings.database_url)}"
        )
        return 0

    run_async(go())


if __name__ == "__main__":  # pragma: no cover
    main()
