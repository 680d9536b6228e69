"""The monitor against hostile requests: out-of-range integers and NUL bytes, tokens where
they do not belong, foreign Host headers, forged log paths, deep DAGs; and schemathesis
checking every API operation against the OpenAPI description on a real server."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatcher.cli import monitor_app
from dispatcher.config import Settings
from dispatcher.monitor import SESSION_COOKIE, MonitorConfig, create_app, serve
from dispatcher.monitor.pages import _levels
from dispatcher.store import Store
from schemas.api import TaskView
from schemas.messages import JobLog
from schemas.submission import LabelPlan, PayloadSpec
from schemas.text import INT64_MAX
from tests.conftest import ROOT
from tests.test_monitor import CHROMIUM, TOKEN, World, _free_port, make_world
from transport.rabbitmq import Broker

READ = "r3ad-token"
BIG = 2**63  # one past bigint
SMALL = -(2**63) - 1


@pytest.fixture
async def world(store: Store, tmp_path: Path) -> World:
    return await make_world(store, tmp_path)


def app_client(app: Any, host: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}")


@pytest.fixture
async def client(store: Store, broker: Broker, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store, broker, MonitorConfig(token=TOKEN, log_dir=settings.log_dir))
    async with app_client(app) as c:
        yield c


def assert_validation_error(r: httpx.Response) -> None:
    """A 422 of the shape the OpenAPI declares (HTTPValidationError), never a 500."""
    assert r.status_code == 422, (r.request.url, r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all({"loc", "msg", "type"} <= set(d) for d in detail), detail


# -- 1. integers and NUL bytes ---------------------------------------------------------------


async def test_out_of_range_integers_answer_422(client: httpx.AsyncClient, world: World) -> None:
    wf, job = world.running, world.job
    urls = [
        f"/api/workflows/{BIG}",
        f"/api/workflows/{SMALL}",
        f"/api/workflows/{wf}?after={BIG}",
        f"/api/jobs/{BIG}",
        f"/api/jobs/{BIG}/events",
        f"/api/jobs/{job}/events?after={BIG}",
        f"/api/jobs/{job}/events?after={SMALL}",
        f"/api/tasks/{BIG}/events",
        f"/api/dlq?workflow={BIG}",
        f"/workflows/{BIG}",
        f"/workflows/{wf}?after={BIG}",
        f"/jobs/{BIG}",
        f"/jobs/{job}?after={BIG}",
        f"/jobs/{BIG}/log",
        f"/dlq?workflow={BIG}",
    ]
    for url in urls:
        assert_validation_error(await client.get(url))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert_validation_error(await client.post(f"/api/workflows/{BIG}/cancel", headers=auth))
    for field in ("workflow", "job", "event", "limit"):
        assert_validation_error(await client.post("/api/replay", json={field: BIG, "dry_run": True}, headers=auth))


async def test_nul_bytes_in_parameters_answer_422(client: httpx.AsyncClient, world: World) -> None:
    task = (await client.get(f"/api/workflows/{world.running}")).json()["tasks"][0]["id"]
    for url in (
        f"/api/workflows/{world.running}",
        f"/api/jobs/{world.job}/events",
        f"/api/tasks/{task}/events",
        f"/workflows/{world.running}",
        f"/jobs/{world.job}",
    ):
        for status in ("\x00", "running\x00", "bogus"):
            assert_validation_error(await client.get(url, params={"status": status}))
    assert_validation_error(await client.get("/api/workflows/%00"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for field in ("task", "reason"):
        r = await client.post("/api/replay", json={field: "a\x00b", "dry_run": True}, headers=auth)
        assert_validation_error(r)
    # (that the states offered are the ones the bookkeeping has: tests/test_states.py)


def _schemas(spec: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A parameter's schema and its alternatives (anyOf: [..., null]), references followed."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if "anyOf" in schema:
        return [s for alt in schema["anyOf"] for s in _schemas(spec, alt)]
    return [schema]


async def test_openapi_bounds_every_parameter_and_documents_every_error(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    ops = {(method, path): op for path, item in spec["paths"].items() for method, op in item.items()}
    checked = 0
    for (method, path), op in ops.items():
        schemas = [(p["name"], s) for p in op.get("parameters", []) for s in _schemas(spec, p["schema"])]
        if "requestBody" in op:
            body = _schemas(spec, op["requestBody"]["content"]["application/json"]["schema"])[0]
            schemas += [(name, s) for name, prop in body["properties"].items() for s in _schemas(spec, prop)]
        for name, s in schemas:
            where = f"{method.upper()} {path} {name}"
            if s.get("type") == "integer":
                assert -(2**63) <= s["minimum"] and s["maximum"] <= INT64_MAX, where
                checked += 1
            elif s.get("type") == "string":
                assert "enum" in s or s.get("pattern") == "^[^\\x00]*$", where
                checked += 1
        codes = set(op["responses"])
        assert "422" in codes or not schemas, (method, path)
        for code in codes - {"200"}:
            content = op["responses"][code].get("content", {})
            assert "application/json" in content, (method, path, code)
        if path.startswith("/api/") and method == "get":
            assert "401" in codes, path  # when a read token is set
    for op, expected in (
        (("get", "/api/workflows/{workflow_id}"), {"200", "401", "404", "422"}),
        (("get", "/api/jobs/{job_id}"), {"200", "401", "404", "422"}),
        (("post", "/api/workflows/{workflow_id}/cancel"), {"200", "401", "403", "404", "409", "422", "503"}),
        (("post", "/api/replay"), {"200", "400", "401", "403", "422", "503"}),
    ):
        assert set(ops[op]["responses"]) == expected, op
    assert checked >= 15
    # tokens travel in the Authorization header, declared as such; no token parameter anywhere
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    names = {p["name"].lower() for op in ops.values() for p in op.get("parameters", [])}
    assert not names & {"token", "authorization", "x-dispatcher-token"}


# -- 2. schemathesis against a real server ----------------------------------------------------

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


async def _listening(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        for _ in range(100):
            try:
                await c.get("/openapi.json")
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"the monitor did not listen on port {port}")


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    store: Store, broker: Broker, settings: Settings, tmp_path: Path
) -> None:
    world = await make_world(store, tmp_path)
    assert world.running  # data for the operations to find: workflows, jobs, events, a failure, a worker
    port = _free_port()
    stop = asyncio.Event()
    # one token for reading and acting: schemathesis sends it, and checks that requests without it are refused
    config = MonitorConfig(token=TOKEN, read_token=TOKEN, log_dir=settings.log_dir)
    server = asyncio.create_task(serve(create_app(store, broker, config), "127.0.0.1", port, stop))
    try:
        await _listening(port)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            str(SCHEMATHESIS),
            "run",
            f"http://127.0.0.1:{port}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--max-examples",
            os.environ.get("DISPATCHER_TEST_SCHEMATHESIS_EXAMPLES", "30"),
            "--seed",
            os.environ.get("DISPATCHER_TEST_SCHEMATHESIS_SEED", "20260101"),
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "10",
            "--no-color",
            cwd=tmp_path,  # its reports and caches go there
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        took = time.monotonic() - started
    finally:
        stop.set()
        await server
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "No issues found" in text or "passed" in text, text
    assert took < 90, f"schemathesis took {took:.0f} s"


# -- 3. tokens only in the Authorization header; a login form and a session cookie ----------


@pytest.fixture
async def guarded(store: Store, broker: Broker) -> AsyncIterator[httpx.AsyncClient]:
    """A monitor with a read token and an action token."""
    async with app_client(create_app(store, broker, MonitorConfig(token=TOKEN, read_token=READ))) as c:
        yield c


async def test_tokens_in_urls_or_other_headers_are_refused(guarded: httpx.AsyncClient, world: World) -> None:
    c = guarded
    assert (await c.get("/api/workflows", params={"token": READ})).status_code == 401
    assert (await c.get("/api/workflows", headers={"X-Dispatcher-Token": READ})).status_code == 401
    r = await c.get("/api/workflows")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert (await c.get("/api/workflows", headers={"Authorization": f"Bearer {READ}"})).status_code == 200
    assert (await c.get("/metrics", headers={"Authorization": f"Bearer {READ}"})).status_code == 200
    url = f"/api/workflows/{world.running}/cancel"
    assert (await c.post(url, params={"token": TOKEN})).status_code == 401
    assert (await c.post(url, headers={"X-Dispatcher-Token": TOKEN})).status_code == 401
    assert (await c.post(url, headers={"Authorization": f"Bearer {READ}"})).status_code == 403
    assert (await c.get("/", params={"token": READ})).status_code == 303  # to the login form


async def test_login_form_sets_a_session_cookie_for_reading_only(
    store: Store, guarded: httpx.AsyncClient, world: World
) -> None:
    c = guarded
    r = await c.get(f"/jobs/{world.job}")
    assert r.status_code == 303 and r.headers["location"] == f"/login?next=/jobs/{world.job}"
    form = await c.get(r.headers["location"])
    assert form.status_code == 200 and 'method="post" action="/login"' in form.text
    assert 'type="password" name="token"' in form.text
    # a wrong token: the form again, no cookie
    r = await c.post("/login", data={"token": "wrong", "next": "/"})
    assert r.status_code == 401 and "wrong token" in r.text and SESSION_COOKIE not in r.cookies
    r = await c.post("/login", data={"token": READ, "next": f"/jobs/{world.job}"})
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{world.job}"
    cookie = r.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/" in cookie.lower()
    session = r.cookies[SESSION_COOKIE]
    assert READ not in session  # an HMAC of the token, not the token
    # the cookie reads pages, the job log route and the GET API ...
    assert (await c.get(f"/jobs/{world.job}")).status_code == 200
    assert (await c.get("/api/workflows")).status_code == 200
    assert (await c.get("/metrics")).status_code == 200
    # ... but never acts, even when it could have been made from the action token
    url = f"/api/workflows/{world.running}/cancel"
    assert (await c.post(url)).status_code == 401
    assert (await c.post("/api/replay", json={"dry_run": True})).status_code == 401
    assert await store.pool.fetchval("SELECT status FROM workflows WHERE id = $1", world.running) == "running"
    # a forged or tampered cookie is no session
    for forged in (READ, session[:-1] + ("0" if session[-1] != "0" else "1"), "9999999999.abc", ""):
        c.cookies.set(SESSION_COOKIE, forged)
        assert (await c.get("/api/workflows")).status_code == 401, forged
    # logging out ends it
    c.cookies.clear()
    assert (await c.post("/login", data={"token": READ})).status_code == 303 and SESSION_COOKIE in c.cookies
    r = await c.post("/logout")
    assert r.status_code == 303 and SESSION_COOKIE not in c.cookies
    assert (await c.get("/")).status_code == 303


async def test_a_session_made_with_the_same_token_still_cannot_act(store: Store, broker: Broker, world: World) -> None:
    app = create_app(store, broker, MonitorConfig(token=TOKEN, read_token=TOKEN))
    async with app_client(app) as c:
        assert (await c.post("/login", data={"token": TOKEN})).status_code == 303
        assert (await c.get("/api/workflows")).status_code == 200
        assert (await c.post(f"/api/workflows/{world.running}/cancel")).status_code == 401
        r = await c.post(f"/api/workflows/{world.running}/cancel", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200


async def test_login_redirects_only_within_the_monitor(guarded: httpx.AsyncClient) -> None:
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:alert(1)", "/\r\nX: y"):
        r = await guarded.post("/login", data={"token": READ, "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/", target
    r = await guarded.get("/login", params={"next": "//evil.example/"})
    assert 'value="/"' in r.text and "evil.example" not in r.text


async def test_without_a_read_token_pages_need_no_login(client: httpx.AsyncClient, world: World) -> None:
    assert (await client.get("/")).status_code == 200
    r = await client.get("/login")
    assert r.status_code == 303 and r.headers["location"] == "/"


# -- 4. the Host header ----------------------------------------------------------------------


async def test_host_header_must_name_the_monitor(store: Store, world: World) -> None:
    app = create_app(store, None, MonitorConfig())
    for host in ("localhost", "127.0.0.1:8321", "[::1]:8321", "LOCALHOST:1"):
        async with app_client(app, host) as c:
            assert (await c.get("/api/workflows")).status_code == 200, host
    for host in ("testserver", "evil.example", "localhost.evil.example", "127.0.0.2"):
        async with app_client(app, host) as c:
            assert (await c.get("/api/workflows")).status_code == 400, host
    named = create_app(store, None, MonitorConfig(hosts=("monitor.example.org", "::1")))
    async with app_client(named, "monitor.example.org:8443") as c:
        assert (await c.get("/api/workflows")).status_code == 200
    async with app_client(named, "[::1]") as c:
        assert (await c.get("/api/workflows")).status_code == 200
    async with app_client(named, "localhost") as c:
        assert (await c.get("/api/workflows")).status_code == 400


async def test_settings_and_cli_pass_host_names_and_log_dir(store: Store, settings: Settings, world: World) -> None:
    env = {"DISPATCHER_MONITOR_HOSTS": " monitor.example.org, ::1 ,", "DISPATCHER_MONITOR_HOST": "10.0.0.5"}
    assert Settings.from_env(env).monitor_hosts == ("monitor.example.org", "::1")
    assert Settings.from_env({}).monitor_hosts == ()
    # unset: the monitor's own address and the loopback names
    default = monitor_app(Settings(monitor_host="10.0.0.5"), store, None)
    for host, code in (("10.0.0.5:8321", 200), ("localhost", 200), ("[::1]", 200), ("evil.example", 400)):
        async with app_client(default, host) as c:
            assert (await c.get("/api/workflows")).status_code == code, host
    named = monitor_app(settings.override(monitor_hosts=("monitor.example.org",)), store, None)
    async with app_client(named, "monitor.example.org") as c:
        assert (await c.get("/api/workflows")).status_code == 200
        # and the log directory reaches the monitor
        log = _write_log(settings.log_dir, (await c.get(f"/api/jobs/{world.job}")).json()["workflow_id"], world.job)
        r = await c.get(f"/jobs/{world.job}/log")
        assert r.status_code == 200 and r.text == log.read_text()


# -- 5. job logs only from under the log directory ---------------------------------------------


def _write_log(log_dir: Path, workflow_id: int, job_id: int, text: str = "=== job setup\nhello\n") -> Path:
    """Where and how a worker writes a job's log (workers/joblog.py)."""
    path = log_dir / f"workflow-{workflow_id}" / f"job-{job_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


async def test_job_logs_come_only_from_the_log_directory(
    store: Store, client: httpx.AsyncClient, settings: Settings, world: World, tmp_path: Path
) -> None:
    job = (await client.get(f"/api/jobs/{world.job}")).json()
    other = world.job + 1
    # a forged log path (a worker's message may claim any path): not served
    await store.apply([], logs=[JobLog(job_id=world.job, path="/etc/passwd")])
    assert (await client.get(f"/api/jobs/{world.job}")).json()["log_path"] == "/etc/passwd"
    r = await client.get(f"/jobs/{world.job}/log")
    assert r.status_code == 404 and "root:" not in r.text
    # a symlink inside the log directory pointing outside: not served either
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    link = settings.log_dir / f"workflow-{job['workflow_id']}" / f"job-{other}.log"
    link.parent.mkdir(parents=True)
    link.symlink_to(secret)
    await store.apply([], logs=[JobLog(job_id=other, path=str(link))])
    r = await client.get(f"/jobs/{other}/log")
    assert r.status_code == 404 and "top secret" not in r.text
    # a directory of the workflow's that is a symlink out of the log directory: no
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"job-{world.job + 2}.log").write_text("outside\n")
    wf_dir = settings.log_dir / f"workflow-{world.finished}"
    wf_dir.symlink_to(outside, target_is_directory=True)
    await store.apply([], logs=[JobLog(job_id=world.job + 2, path=str(wf_dir / f"job-{world.job + 2}.log"))])
    # a real log, where the worker wrote it, is served (whatever the stored path says)
    real = _write_log(settings.log_dir, job["workflow_id"], world.job, "=== job setup: true\nevent 0 ok\n")
    r = await client.get(f"/jobs/{world.job}/log")
    assert r.status_code == 200 and r.text == real.read_text()
    assert r.headers["content-type"].startswith("text/plain")
    # a job with no log yet
    assert (await client.get(f"/jobs/{world.job + 3}/log")).status_code == 404


async def test_job_logs_served_only_with_a_log_directory(store: Store, settings: Settings, world: World) -> None:
    app = create_app(store, None, MonitorConfig())  # no log directory: no log is served
    async with app_client(app) as c:
        workflow_id = (await c.get(f"/api/jobs/{world.job}")).json()["workflow_id"]
        path = _write_log(settings.log_dir, workflow_id, world.job)
        await store.apply([], logs=[JobLog(job_id=world.job, path=str(path))])
        assert (await c.get(f"/jobs/{world.job}/log")).status_code == 404


# -- 6. a deep DAG -----------------------------------------------------------------------------


def _view(label: str, parents: list[str], i: int = 0) -> TaskView:
    return TaskView(
        id=i,
        label=label,
        status="waiting",
        parents=parents,
        event_service=False,
        max_payloads_per_job=1,
        n_events=1,
        n_jobs=1,
        events={},
        jobs={},
    )


def test_levels_of_a_long_chain_and_of_a_diamond() -> None:
    n = 5000
    chain = [_view(f"t{i}", [f"t{i - 1}"] if i else [], i) for i in reversed(range(n))]  # children first
    levels = list(_levels(chain))
    assert [[t.label for t in col] for col in levels] == [[f"t{i}"] for i in range(n)]
    diamond = [_view("a", []), _view("b", ["a"]), _view("c", ["a"]), _view("d", ["b", "c"]), _view("e", ["a"])]
    assert [[t.label for t in col] for col in _levels(diamond)] == [["a"], ["b", "c", "e"], ["d"]]
    # a cycle or an unknown parent (neither can be submitted) still draws, last
    odd = [_view("x", ["y"]), _view("y", ["x"]), _view("z", ["gone"])]
    assert sorted(t.label for col in _levels(odd) for t in col) == ["x", "y", "z"]


async def test_a_1500_task_chain_renders(store: Store, client: httpx.AsyncClient, tmp_path: Path) -> None:
    n = 1500
    payload = PayloadSpec(command="echo {payload}")
    plans = [
        LabelPlan(
            label=f"t{i}",
            parents=(f"t{i - 1}",) if i else (),
            event_service=False,
            max_payloads_per_job=1,
            request_walltime=None,
            max_attempts=3,
            retry_delay=1.0,
            events_per_range=1,
            payload=payload,
        )
        for i in range(n)
    ]
    mapping = tmp_path / "chain.json"
    mapping.write_text("{}")
    # children first: nothing promises that task ids follow the dependency order, and the
    # old recursive drawing went 1,500 calls deep when they did not
    wf = await store.insert_workflow(
        "chain", {"name": "chain"}, str(mapping), plans[::-1], lambda ids: ((ids[p.label], 0, "p") for p in plans)
    )
    started = time.monotonic()
    r = await client.get(f"/workflows/{wf}")
    assert r.status_code == 200, r.text[-2000:]
    assert r.text.count('<div class="col">') == n
    assert r.text.index('id="task-t0"') < r.text.index('id="task-t1499"')
    assert time.monotonic() - started < 30
    assert len((await client.get(f"/api/workflows/{wf}")).json()["tasks"]) == n


# -- the login in a real browser --------------------------------------------------------------


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM} (scripts/install-tools.sh)")
async def test_login_in_chromium_then_pages_read_with_the_cookie(store: Store, broker: Broker, world: World) -> None:
    playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    port = _free_port()
    stop = asyncio.Event()
    config = MonitorConfig(token=TOKEN, read_token=READ, refresh_ms=300)
    server = asyncio.create_task(serve(create_app(store, broker, config), "127.0.0.1", port, stop))
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        await _listening(port)
        async with playwright_api.async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-quic"]
            )
            context = await browser.new_context()
            page = await context.new_page()
            await page.goto(f"http://127.0.0.1:{port}/jobs/{world.job}")
            assert page.url.endswith(f"/login?next=/jobs/{world.job}")
            await page.fill('input[name="token"]', "wrong")
            await page.click('button[type="submit"]')
            assert "wrong token" in await page.content()
            await page.fill('input[name="token"]', READ)
            await page.click('button[type="submit"]')
            await page.wait_for_url(f"**/jobs/{world.job}")
            assert "running" in await page.locator("#events tr").nth(1).inner_text()
            [cookie] = await context.cookies()
            assert cookie["name"] == SESSION_COOKIE and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert await page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it
            # the live refresh keeps working with the cookie: the page still shows the events after a few rounds
            await page.wait_for_timeout(1000)
            assert await page.locator("#events").count() == 1
            await page.screenshot(path=str(artifacts / "monitor-login.png"), full_page=True)
            # the session ends (cookie gone): the live refresh takes the page to the login form
            await context.clear_cookies()
            await page.wait_for_url(f"**/login?next=/jobs/{world.job}", timeout=10_000)
            # log in again, then out with the button
            await page.fill('input[name="token"]', READ)
            await page.click('button[type="submit"]')
            await page.wait_for_url(f"**/jobs/{world.job}")
            await page.click("nav button")
            await page.wait_for_url("**/login")
            assert await context.cookies() == []
            await browser.close()
    finally:
        stop.set()
        await server
