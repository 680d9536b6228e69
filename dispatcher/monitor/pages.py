"""The HTML pages, the login form and job logs.

Every value is escaped (Jinja2 autoescape): payloads and errors are user data. Job logs
are served only from under the log directory, at the path derived from the ids.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dispatcher.config import job_log_path
from dispatcher.monitor.auth import SESSION_COOKIE, SESSION_SECONDS, Guards, LoginNeeded, secret_matches, session_value
from dispatcher.monitor.params import (
    PAGE,
    AfterEvent,
    AfterJob,
    JobId,
    PageEventFilter,
    PageJobFilter,
    TaskId,
    WorkflowFilter,
    WorkflowId,
)
from dispatcher.monitor.views import Views
from schemas.api import TaskView
from schemas.states import EVENT_STATES, JOB_STATES, terminal

log = logging.getLogger("dispatcher.monitor")  # the name its records always had

TEMPLATES = FilePath(__file__).parent.parent / "templates"
_LOGIN_BODY_MAX = 8192  # a login form is a token and a path


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


# the set-ups and tear-downs the timeline marks are read from a job log up to this size
# (one is read at each refresh of the page)
TIMELINE_LOG_MAX = 8 << 20


def _log_head(path: FilePath | None) -> str | None:
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            return f.read(TIMELINE_LOG_MAX).decode(errors="replace")
    except OSError:
        return None


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


async def to_login(request: Request, exc: Exception) -> Response:
    """A page asked for without credentials (``LoginNeeded``): to the login form."""
    assert isinstance(exc, LoginNeeded)
    return RedirectResponse(f"/login?next={quote(exc.target, safe='/')}", status_code=303)


def router(views: Views, guards: Guards) -> APIRouter:
    pages = APIRouter()
    config = guards.config
    read_token = config.read_token
    templates = Jinja2Templates(directory=str(TEMPLATES))  # autoescape on for .html
    page_read = guards.page_read

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.update(
            states=EVENT_STATES,  # the templates list states from here, never their own
            job_states=JOB_STATES,
            terminal=terminal,
            refresh_ms=config.refresh_ms,
            now=datetime.now().astimezone(),
            logged_in=guards.logged_in(request),
        )
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    # -- login --------------------------------------------------------------------------

    @pages.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(request: Request, next: Annotated[str, Query(max_length=2000)] = "/") -> Response:
        if read_token is None:
            return RedirectResponse(_local(next), status_code=303)  # reading is open: nothing to log in to
        return render(request, "login.html", target=_local(next), error=None)

    @pages.post("/login", include_in_schema=False)
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
        if not secret_matches(token, read_token):
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

    @pages.post("/logout", include_in_schema=False)
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    # -- pages --------------------------------------------------------------------------

    @pages.get("/", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workflows(request: Request) -> HTMLResponse:
        return render(request, "workflows.html", workflows=await views.workflows())

    @pages.get("/workflows/{workflow_id}", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workflow(
        request: Request, workflow_id: WorkflowId, after: AfterJob = 0, status: PageJobFilter = None
    ) -> HTMLResponse:
        wf = await views.workflow(workflow_id, after, status or None)
        charts = await views.pictures([t.id for t in wf.tasks])
        return render(request, "workflow.html", wf=wf, levels=list(_levels(wf.tasks)), status=status, charts=charts)

    @pages.get("/tasks/{task_id}", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_task(
        request: Request, task_id: TaskId, after: AfterEvent = -1, status: PageEventFilter = None
    ) -> HTMLResponse:
        task = await views.task(task_id)
        events = await views.task_events(task_id, after, status or None, PAGE)
        charts = await views.pictures([task_id])
        return render(request, "task.html", task=task, page=events, status=status or "", charts=charts)

    @pages.get("/jobs/{job_id}", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_job(
        request: Request, job_id: JobId, after: AfterEvent = -1, status: PageEventFilter = None
    ) -> HTMLResponse:
        detail = await views.job(job_id)
        events = await views.job_events(job_id, after, status or None, PAGE)
        timeline = await views.job_timeline(job_id, _log_head(log_file(config.log_dir, detail.workflow_id, job_id)))
        return render(request, "job.html", job=detail, page=events, status=status or "", after=after, timeline=timeline)

    @pages.get("/jobs/{job_id}/log", dependencies=page_read, include_in_schema=False)
    async def job_log(job_id: JobId) -> Response:
        detail = await views.job(job_id)
        # the stored log_path is what a worker claimed: never opened
        path = log_file(config.log_dir, detail.workflow_id, job_id)
        if path is None:
            raise HTTPException(404, "this job has no log (yet), or it is not on this host")
        return FileResponse(path, media_type="text/plain; charset=utf-8")

    @pages.get("/dlq", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_dlq(request: Request, workflow: WorkflowFilter = None) -> HTMLResponse:
        return render(request, "dlq.html", dlq=await views.dead_letters(workflow), workflow=workflow)

    @pages.get("/workers", dependencies=page_read, response_class=HTMLResponse, include_in_schema=False)
    async def page_workers(request: Request) -> HTMLResponse:
        return render(request, "workers.html", workers=await views.workers())

    return pages


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
