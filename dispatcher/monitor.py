"""The monitor: HTML pages, a JSON API (OpenAPI at /openapi.json) and /metrics, read from
the Postgres bookkeeping. Served by ``dispatcher start`` and alone by ``dispatcher monitor``.

Every value is escaped (Jinja2 autoescape): payloads and errors are user data. Tokens
travel only in the ``Authorization: Bearer`` header (never in a URL, which ends up in
logs and browser history). Actions that change state (cancel, replay) need
``DISPATCHER_MONITOR_TOKEN`` in that header. Reading needs ``DISPATCHER_MONITOR_READ_TOKEN``
only when that is set: in the header, or in the session cookie the login form sets (an
HMAC of the read token, HttpOnly, SameSite=Strict), which reads and never acts. Requests
whose ``Host`` is not one of the monitor's names are refused (DNS rebinding), and job
logs are served only from under the log directory, at the path derived from the ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import shlex
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, quote

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from starlette.middleware.trustedhost import TrustedHostMiddleware

from dispatcher.broker import Broker
from dispatcher.config import job_log_path
from dispatcher.metrics import render_metrics
from dispatcher.replay import Selector, cancel, replay
from dispatcher.status import EVENT_STATES, terminal
from dispatcher.store import Store
from schemas.api import (
    ActionResult,
    DeadLetters,
    EventFilter,
    EventsPage,
    EventView,
    FailedEvent,
    JobDetail,
    JobState,
    JobView,
    Problem,
    ReplayRequest,
    TaskView,
    WorkerView,
    WorkflowDetail,
    WorkflowSummary,
)
from schemas.text import INT64_MAX

log = logging.getLogger(__name__)

PAGE = 100
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SESSION_COOKIE = "dispatcher_session"
SESSION_SECONDS = 12 * 3600
_LOGIN_BODY_MAX = 8192  # a login form is a token and a path


@dataclass(frozen=True)
class MonitorConfig:
    token: str | None = None  # for cancel and replay
    read_token: str | None = None  # for everything, when set
    refresh_ms: int = 2000
    log_dir: FilePath | None = None  # job logs are served from under it only (None: not served)
    hosts: tuple[str, ...] = LOOPBACK_HOSTS  # accepted Host header names, any port ("*": any)


def default_hosts(monitor_host: str) -> tuple[str, ...]:
    """The monitor's own address and the loopback names (a wildcard address names no host)."""
    own = () if monitor_host in ("", "0.0.0.0", "::") else (monitor_host,)
    return tuple(dict.fromkeys((*own, *LOOPBACK_HOSTS)))


def _host_pattern(host: str) -> str:
    """A host name as TrustedHostMiddleware compares it: lower case, IPv6 in brackets."""
    host = host.strip().lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
        raise ValueError(f"monitor host {host!r}: a wildcard must be '*' or lead a domain ('*.example.org')")
    return host


def session_value(read_token: str, expires: int) -> str:
    """The session cookie: its expiry and an HMAC keyed by the read token. It reveals
    nothing of the token, and a new read token ends every session."""
    mac = hmac.new(read_token.encode(), f"dispatcher-monitor-session:{expires}".encode(), hashlib.sha256)
    return f"{expires}.{mac.hexdigest()}"


def session_valid(value: str | None, read_token: str, now: float | None = None) -> bool:
    if not value:
        return False
    expires, dot, _ = value.partition(".")
    if not dot or not expires.isascii() or not expires.isdigit() or len(expires) > 12:
        return False
    if int(expires) < (time.time() if now is None else now):
        return False
    expected = session_value(read_token, int(expires))
    return hmac.compare_digest(expected.encode(), value.encode(errors="replace"))


def _secret_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(errors="replace"), expected.encode())


def _local(target: str | None) -> str:
    """Where a login may send the browser: a path of this monitor, nothing else (an open
    redirect would lend the monitor's name to a phishing page)."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith(("//", "/\\"))
        or any(c < " " or c == "\x7f" for c in target)
    ):
        return "/"
    return target


def log_file(log_dir: FilePath | None, workflow_id: int, job_id: int) -> FilePath | None:
    """A job's log where workers write it (``dispatcher.config.job_log_path``), resolved, if it is
    a file inside the resolved log directory. The path is derived from the ids: a path
    taken from a worker's message could name any file (/etc/passwd), and a symlink in the
    directory could point anywhere."""
    if log_dir is None:
        return None
    try:
        root = log_dir.resolve(strict=True)
        path = job_log_path(root, workflow_id, job_id).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def _event(row: dict[str, Any]) -> EventView:
    started, ended = row.get("started_at"), row.get("ended_at")
    duration = (ended - started).total_seconds() if started and ended else None
    return EventView(**row, duration=duration)


def replay_command(
    *, workflow: int | None = None, task: str | None = None, job: int | None = None, event: int | None = None
) -> str:
    parts = ["dispatcher", "replay"]
    for flag, value in (("--workflow", workflow), ("--task", task), ("--job", job), ("--event", event)):
        if value is not None:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


# Every integer parameter is bounded by the column it is compared with (ids are bigint):
# a larger one used to reach asyncpg and fail there, a 500.
WorkflowId = Annotated[int, Path(ge=1, le=INT64_MAX, description="a workflow's id")]
JobId = Annotated[int, Path(ge=1, le=INT64_MAX, description="a job's id")]
TaskId = Annotated[int, Path(ge=1, le=INT64_MAX, description="a task's id")]
AfterJob = Annotated[int, Query(ge=0, le=INT64_MAX, description="the last job id seen (keyset pagination)")]
AfterEvent = Annotated[int, Query(ge=-1, le=INT64_MAX, description="the last event number seen")]
Limit = Annotated[int, Query(ge=1, le=1000)]
WorkflowFilter = Annotated[int | None, Query(ge=1, le=INT64_MAX, description="only this workflow's")]
# the pages' state menus send "" for "all"
PageEventFilter = Annotated[EventFilter | Literal[""] | None, Query()]
PageJobFilter = Annotated[JobState | Literal[""] | None, Query()]


# module level: with postponed annotations FastAPI resolves these names in the module
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_bearer = HTTPBearer(auto_error=False, scheme_name="bearer")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, scheme_name="session")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
Session = Annotated[str | None, Security(_cookie)]


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


Responses = dict[int | str, dict[str, Any]]
UNAUTHORIZED: Responses = {401: _problem("A read token is set, and the request carries neither it nor a session")}
UNAUTHORIZED_JSON: Responses = {
    401: {
        "description": UNAUTHORIZED[401]["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}
FORBIDDEN: Responses = {
    401: _problem("No Authorization header: actions need the monitor token"),
    403: _problem("Actions are disabled, or the token is not the monitor token"),
}
NO_BROKER: Responses = {503: _problem("RabbitMQ is not configured for this monitor")}


class _LoginNeeded(Exception):
    """An HTML page asked for without credentials: answered with a redirect to the form."""

    def __init__(self, target: str) -> None:
        self.target = target


def create_app(store: Store, broker: Broker | None, config: MonitorConfig) -> FastAPI:
    app = FastAPI(title="EventService dispatcher monitor", version="1", docs_url=None, redoc_url=None)
    # DNS rebinding: a page of another site resolving its name to 127.0.0.1 reaches the monitor
    # with its own name in Host; the browser would then let that page read the answers
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[_host_pattern(h) for h in config.hosts])
    templates = Jinja2Templates(directory=str(FilePath(__file__).parent / "templates"))  # autoescape on for .html
    read_token = config.read_token

    def reader(credentials: HTTPAuthorizationCredentials | None, session: str | None) -> bool:
        assert read_token is not None
        return _secret_matches(credentials.credentials if credentials else None, read_token) or session_valid(
            session, read_token
        )

    # With no read token reading is open, and the OpenAPI says so (no security on reads)
    async def open_read() -> None:
        return None

    async def guarded_read(credentials: Credentials, session: Session) -> None:
        if not reader(credentials, session):
            raise HTTPException(401, "reading needs the monitor's read token", headers=_CHALLENGE)

    async def guarded_page(request: Request, credentials: Credentials, session: Session) -> None:
        if not reader(credentials, session):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise _LoginNeeded(target)

    async def may_act(credentials: Credentials) -> None:
        # the header only: a cookie is sent by the browser on its own, a token is not
        if not config.token:
            raise HTTPException(403, "actions are disabled: start the monitor with DISPATCHER_MONITOR_TOKEN set")
        if credentials is None:
            raise HTTPException(
                401, "this action needs the monitor token (Authorization: Bearer ...)", headers=_CHALLENGE
            )
        if not _secret_matches(credentials.credentials, config.token):
            raise HTTPException(403, "wrong monitor token")

    read = [Depends(guarded_read if read_token else open_read)]
    page_read = [Depends(guarded_page if read_token else open_read)]
    act = [Depends(may_act)]

    @app.exception_handler(_LoginNeeded)
    async def to_login(request: Request, exc: _LoginNeeded) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.target, safe='/')}", status_code=303)

    # -- data ---------------------------------------------------------------------------

    async def workflows(limit: int = 50) -> list[WorkflowSummary]:
        rows = await store.fetch("monitor_workflows", limit)
        return [WorkflowSummary(**r, done=terminal(r["events"])) for r in rows]

    async def workflow(workflow_id: int, after: int = 0, status: str | None = None) -> WorkflowDetail:
        st = await store.workflow_status(workflow_id)
        if st is None:
            raise HTTPException(404, f"no workflow {workflow_id}")
        parents: dict[int, list[str]] = {}
        for d in await store.fetch("monitor_task_deps", workflow_id):
            parents.setdefault(d["task_id"], []).append(d["parent"])
        tasks = [
            TaskView(**{k: t[k] for k in TaskView.model_fields if k in t}, parents=parents.get(t["id"], []))
            for t in st["tasks"]
        ]
        events: dict[str, int] = {}
        for t in tasks:
            for s, n in t.events.items():
                events[s] = events.get(s, 0) + n
        jobs = [JobView(**r) for r in await store.fetch("monitor_jobs", workflow_id, after, status, PAGE + 1)]
        return WorkflowDetail(
            id=st["id"],
            name=st["name"],
            status=st["status"],
            n_events=st["n_events"],
            done=terminal(events),
            events=events,
            submitted_at=st["submitted_at"],
            finished_at=st["finished_at"],
            tasks=tasks,
            jobs=jobs[:PAGE],
            next_job=jobs[PAGE - 1].id if len(jobs) > PAGE else None,
        )

    async def job(job_id: int) -> JobDetail:
        row = await store.fetchrow("monitor_job", job_id)
        if row is None:
            raise HTTPException(404, f"no job {job_id}")
        counts = {r["status"]: r["n"] for r in await store.fetch("monitor_job_counts", job_id)}
        return JobDetail(**row, events=counts)

    async def page(query: str, key: int, after: int, status: str | None, limit: int) -> EventsPage:
        rows = await store.fetch(query, key, after, status, limit + 1)
        return EventsPage(
            events=[_event(r) for r in rows[:limit]], next=rows[limit - 1]["number"] if len(rows) > limit else None
        )

    async def dead_letters(workflow_id: int | None = None, limit: int = 500) -> DeadLetters:
        depth = None
        if broker is not None:
            with contextlib.suppress(Exception):
                depth = await broker.queue_depth(broker.names.dlq)
        rows = await store.fetch("monitor_failed_events", workflow_id, limit)
        events = [
            FailedEvent(
                **r, replay_command=replay_command(workflow=r["workflow_id"], job=r["job_id"], event=r["number"])
            )
            for r in rows
        ]
        return DeadLetters(dlq_depth=depth, events=events, replay_all=replay_command(workflow=workflow_id))

    async def workers() -> list[WorkerView]:
        return [WorkerView(**r) for r in await store.fetch("monitor_workers")]

    # -- JSON API -----------------------------------------------------------------------

    @app.get("/api/workflows", dependencies=read, response_model=list[WorkflowSummary], responses=UNAUTHORIZED)
    async def api_workflows(limit: Limit = 50) -> list[WorkflowSummary]:
        return await workflows(limit)

    @app.get(
        "/api/workflows/{workflow_id}",
        dependencies=read,
        response_model=WorkflowDetail,
        responses={**UNAUTHORIZED, 404: _problem("No such workflow")},
    )
    async def api_workflow(
        workflow_id: WorkflowId, after: AfterJob = 0, status: Annotated[JobState | None, Query()] = None
    ) -> WorkflowDetail:
        """A workflow, its task DAG with counts, and a page of its jobs (``after``: a job id)."""
        return await workflow(workflow_id, after, status)

    @app.get(
        "/api/jobs/{job_id}",
        dependencies=read,
        response_model=JobDetail,
        responses={**UNAUTHORIZED, 404: _problem("No such job")},
    )
    async def api_job(job_id: JobId) -> JobDetail:
        return await job(job_id)

    @app.get(
        "/api/jobs/{job_id}/events",
        dependencies=read,
        response_model=EventsPage,
        responses=UNAUTHORIZED,
    )
    async def api_job_events(
        job_id: JobId,
        after: AfterEvent = -1,
        status: Annotated[EventFilter | None, Query()] = None,
        limit: Limit = PAGE,
    ) -> EventsPage:
        """A page of a job's events by number (``after``: the last number seen), optionally of one state
        (an unknown job has none)."""
        return await page("monitor_job_events", job_id, after, status, limit)

    @app.get(
        "/api/tasks/{task_id}/events",
        dependencies=read,
        response_model=EventsPage,
        responses=UNAUTHORIZED,
    )
    async def api_task_events(
        task_id: TaskId,
        after: AfterEvent = -1,
        status: Annotated[EventFilter | None, Query()] = None,
        limit: Limit = PAGE,
    ) -> EventsPage:
        return await page("monitor_task_events", task_id, after, status, limit)

    @app.get("/api/dlq", dependencies=read, response_model=DeadLetters, responses=UNAUTHORIZED)
    async def api_dlq(workflow: WorkflowFilter = None) -> DeadLetters:
        """Failed events (out of attempts) with the replay command for each."""
        return await dead_letters(workflow)

    @app.get("/api/workers", dependencies=read, response_model=list[WorkerView], responses=UNAUTHORIZED)
    async def api_workers() -> list[WorkerView]:
        return await workers()

    @app.post(
        "/api/workflows/{workflow_id}/cancel",
        dependencies=act,
        response_model=ActionResult,
        responses={
            **FORBIDDEN,
            404: _problem("No such workflow"),
            409: _problem("The workflow is not running"),
            **NO_BROKER,
        },
    )
    async def api_cancel(workflow_id: WorkflowId) -> ActionResult:
        if broker is None:
            raise HTTPException(503, "RabbitMQ is not configured for this monitor")
        jobs = await cancel(store, broker, workflow_id)
        if jobs is None:
            if await store.fetchrow("workflow", workflow_id) is None:
                raise HTTPException(404, f"no workflow {workflow_id}")
            raise HTTPException(409, f"workflow {workflow_id} is not running")
        return ActionResult(ok=True, detail=f"cancelled workflow {workflow_id}: {len(jobs)} job(s) stopped")

    @app.post(
        "/api/replay",
        dependencies=act,
        response_model=ActionResult,
        responses={400: _problem("The body cannot be read (not UTF-8)"), **FORBIDDEN, **NO_BROKER},
    )
    async def api_replay(body: ReplayRequest) -> ActionResult:
        if broker is None:
            raise HTTPException(503, "RabbitMQ is not configured for this monitor")
        selector = Selector(workflow=body.workflow, task=body.task, job=body.job, event=body.event, reason=body.reason)
        outcomes = await replay(store, broker, selector, limit=body.limit, dry_run=body.dry_run)
        n = sum(o.action in ("replayed", "would replay") for o in outcomes)
        return ActionResult(
            ok=True,
            detail=f"{'would replay' if body.dry_run else 'replayed'} {n} event(s)",
            lines=[o.describe() for o in outcomes],
        )

    # a text route: its error bodies are still JSON, said explicitly (FastAPI would say text/plain)
    @app.get("/metrics", dependencies=read, response_class=PlainTextResponse, responses=UNAUTHORIZED_JSON)
    async def metrics() -> Response:
        body, content_type = await render_metrics(store, broker)
        return Response(body, media_type=content_type)

    # -- login --------------------------------------------------------------------------

    def session_of(request: Request) -> bool:
        return read_token is not None and session_valid(request.cookies.get(SESSION_COOKIE), read_token)

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.update(
            states=EVENT_STATES,
            refresh_ms=config.refresh_ms,
            now=datetime.now().astimezone(),
            logged_in=session_of(request),
        )
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(request: Request, next: Annotated[str, Query(max_length=2000)] = "/") -> Response:
        if read_token is None:
            return RedirectResponse(_local(next), status_code=303)  # reading is open: nothing to log in to
        return render(request, "login.html", target=_local(next), error=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        # parsed here: FastAPI's Form() needs python-multipart, a dependency for two fields
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _LOGIN_BODY_MAX:
                raise HTTPException(413, "a login form is smaller than that")
        fields = parse_qs(body.decode(errors="replace"), max_num_fields=8)
        token = fields.get("token", [""])[0]
        target = _local(fields.get("next", ["/"])[0])
        if read_token is None:
            return RedirectResponse(target, status_code=303)
        if not _secret_matches(token, read_token):
            log.warning("monitor login refused: wrong token", extra={"client": getattr(request.client, "host", None)})
            return render(request, "login.html", status_code=401, target=target, error="wrong token")
        response = RedirectResponse(target, status_code=303)
        expires = int(time.time()) + SESSION_SECONDS
        response.set_cookie(
            SESSION_COOKIE,
            session_value(read_token, expires),
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,  # page scripts cannot read it
            samesite="strict",  # other sites' pages cannot send it
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- pages --------------------------------------------------------------------------

    @app.get("/", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workflows(request: Request) -> HTMLResponse:
        return render(request, "workflows.html", workflows=await workflows())

    @app.get("/workflows/{workflow_id}", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workflow(
        request: Request, workflow_id: WorkflowId, after: AfterJob = 0, status: PageJobFilter = None
    ) -> HTMLResponse:
        wf = await workflow(workflow_id, after, status or None)
        return render(request, "workflow.html", wf=wf, levels=list(_levels(wf.tasks)), status=status)

    @app.get("/jobs/{job_id}", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_job(
        request: Request, job_id: JobId, after: AfterEvent = -1, status: PageEventFilter = None
    ) -> HTMLResponse:
        detail = await job(job_id)
        events = await page("monitor_job_events", job_id, after, status or None, PAGE)
        return render(request, "job.html", job=detail, page=events, status=status or "", after=after)

    @app.get("/jobs/{job_id}/log", dependencies=page_read, include_in_schema=False)
    async def job_log(job_id: JobId) -> Response:
        detail = await job(job_id)
        # the stored log_path is what a worker claimed: never opened
        path = log_file(config.log_dir, detail.workflow_id, job_id)
        if path is None:
            raise HTTPException(404, "this job has no log (yet), or it is not on this host")
        return FileResponse(path, media_type="text/plain; charset=utf-8")

    @app.get("/dlq", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_dlq(request: Request, workflow: WorkflowFilter = None) -> HTMLResponse:
        return render(request, "dlq.html", dlq=await dead_letters(workflow), workflow=workflow)

    @app.get("/workers", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workers(request: Request) -> HTMLResponse:
        return render(request, "workers.html", workers=await workers())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = FastAPI.openapi(app)
        # FastAPI's OpenAPI model holds a body's bounds as floats, and 2**63 - 1 as a float
        # is 2**63, one past bigint: the body's properties as pydantic writes them instead
        body = ReplayRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        spec["components"]["schemas"]["ReplayRequest"]["properties"] = body["properties"]
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _levels(tasks: list[TaskView]) -> Iterator[list[TaskView]]:
    """The DAG drawn left to right: a task one column after its last parent. Iterative
    (Kahn's order): a chain of thousands of tasks is deeper than Python's recursion limit."""
    by_label = {t.label: t for t in tasks}
    parents = {t.label: [p for p in dict.fromkeys(t.parents) if p in by_label] for t in tasks}
    children: dict[str, list[str]] = {t.label: [] for t in tasks}
    waiting = {label: len(ps) for label, ps in parents.items()}
    for label, ps in parents.items():
        for p in ps:
            children[p].append(label)
    level: dict[str, int] = {}
    ready = deque(label for label, n in waiting.items() if n == 0)
    while ready:
        label = ready.popleft()
        level[label] = 1 + max((level[p] for p in parents[label]), default=-1)
        for child in children[label]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    # a cycle (submission refuses them) still shows, in a last column
    last = max(level.values(), default=-1) + 1
    for t in tasks:
        level.setdefault(t.label, last)
    columns: list[list[TaskView]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for t in tasks:
        columns[level[t.label]].append(t)
    yield from columns


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the dispatcher handles SIGINT/SIGTERM itself


async def serve(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    log.info("monitor listening", extra={"url": f"http://{host}:{port}/"})

    async def stopper() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stopper())
    try:
        await server.serve()
    finally:
        watcher.cancel()
