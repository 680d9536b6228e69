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

The app is four routers: ``api`` (JSON reads, /metrics), ``actions`` (cancel, replay),
``pages`` (HTML, login, job logs) and ``panda`` (the PanDA pilot's calls, with a token of
their own), over ``views`` (what they show), ``auth`` (who may read or act) and
``params`` (what routes take and answer).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from dispatcher.monitor import actions, api, pages, panda
from dispatcher.monitor.auth import SESSION_COOKIE, Guards, LoginNeeded
from dispatcher.monitor.config import MonitorConfig, default_hosts, host_pattern
from dispatcher.monitor.server import serve
from dispatcher.monitor.views import Views
from dispatcher.pilot import Pilots
from dispatcher.store import Store
from schemas.api import ReplayRequest
from transport.interface import Transport

__all__ = ["SESSION_COOKIE", "MonitorConfig", "create_app", "default_hosts", "serve"]


def create_app(store: Store, broker: Transport | None, config: MonitorConfig) -> FastAPI:
    app = FastAPI(title="EventService dispatcher monitor", version="1", docs_url=None, redoc_url=None)
    # DNS rebinding: a page of another site resolving its name to 127.0.0.1 reaches the monitor
    # with its own name in Host; the browser would then let that page read the answers
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[host_pattern(h) for h in config.hosts])
    guards = Guards(config)
    views = Views(store, broker)
    app.add_exception_handler(LoginNeeded, pages.to_login)
    # in this order: the OpenAPI lists paths in the order they were added
    app.include_router(api.router(views, guards))
    app.include_router(actions.router(store, broker, guards))
    app.include_router(api.metrics_router(views, guards))
    app.include_router(pages.router(views, guards))
    if broker is not None:  # the pilots' ranges come off the job queues
        pilots = Pilots(store, broker, lease=config.pilot_lease, wait=config.pilot_wait)
        app.include_router(panda.router(store, pilots, token=config.pilot_token, origin=config.pilot_origin))

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
