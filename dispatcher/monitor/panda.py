"""The PanDA pilot's API, ``POST /server/panda/<method>``: the job dispatcher's calls the
pilot makes (``getJob``, ``updateJob``, ``getEventRanges``, ``updateEventRanges``,
``checkEventsAvailability``), with form-encoded bodies and JSON answers whose
``StatusCode`` is 0 or PanDA's error code, plus the label's mapping file for Rubin pilots
(``GET /server/panda/esmap``). The work is done by ``dispatcher.pilot.Pilots``.

A bad request (a missing or non-integer id, an unknown job, ``eventRanges`` that are not
JSON, an id of another job) is answered with a PanDA error and changes nothing. With
``DISPATCHER_PILOT_TOKEN`` set, every call needs ``Authorization: Bearer <token>`` (what
the pilot sends with ``PANDA_AUTH_TOKEN``), and with ``DISPATCHER_PILOT_ORIGIN`` set, that
``Origin`` (``PANDA_AUTH_ORIGIN``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse

from dispatcher.monitor.auth import secret_matches
from dispatcher.pilot import Pilots
from dispatcher.store import Store
from schemas.panda import INT64, SC_FAILED, SC_INVALID, SC_PERMS, PandaError, answer, refusal
from transport.outage import is_outage

log = logging.getLogger(__name__)

MAX_BODY = 32 * 1024 * 1024  # updateEventRanges of many thousand ranges stays far below
Form = dict[str, str]
# the pilot posts (curl --data); when it cannot write its curl config file it sends the
# fields in a GET's query string instead
METHODS = ["POST", "GET"]
# module level: with postponed annotations FastAPI resolves these names in the module
Auth = Annotated[str | None, Header(alias="Authorization", include_in_schema=False)]
Origin = Annotated[str | None, Header(alias="Origin", include_in_schema=False)]


def router(store: Store, pilots: Pilots, *, token: str | None, origin: str | None) -> APIRouter:
    # PanDA's wire, not the monitor's API: out of its OpenAPI, documented in docs/pilot.md
    api = APIRouter()

    def refused(status: int, code: int, reason: str) -> JSONResponse:
        return JSONResponse(refusal(PandaError(code, reason)), status_code=status)

    def authorized(authorization: str | None, request_origin: str | None) -> JSONResponse | None:
        if token is not None:
            scheme, _, given = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                return refused(401, SC_INVALID, "this dispatcher needs the pilot token (Authorization: Bearer ...)")
            # the pilot sends the token file's contents, quoted for its shell
            if not secret_matches(given.strip().strip("'\"").strip(), token):
                return refused(403, SC_INVALID, "wrong pilot token")
        if origin is not None and request_origin != origin:
            return refused(403, SC_PERMS, f"Origin {request_origin!r} is not this dispatcher's pilot origin")
        return None

    async def form_of(request: Request) -> Form | JSONResponse:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return refused(413, SC_FAILED, f"request body over {MAX_BODY} bytes")
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return refused(400, SC_FAILED, "request body is not UTF-8")
        pairs = parse_qsl(request.url.query, keep_blank_values=True) + parse_qsl(text, keep_blank_values=True)
        return dict(pairs)

    async def call(
        request: Request,
        authorization: str | None,
        request_origin: str | None,
        handler: Callable[[Form], Awaitable[dict[str, Any]]],
    ) -> JSONResponse:
        denied = authorized(authorization, request_origin)
        if denied is not None:
            return denied
        form = await form_of(request)
        if isinstance(form, JSONResponse):
            return form
        try:
            return JSONResponse(await handler(form))
        except PandaError as exc:
            log.warning("pilot call refused", extra={"path": request.url.path, "reason": exc.reason})
            return JSONResponse(refusal(exc))
        except Exception as exc:
            if not is_outage(exc):
                raise
            # the pilot retries a failed call later: nothing was taken
            log.warning("pilot call failed: service unavailable", extra={"error": repr(exc)})
            return JSONResponse(answer(SC_FAILED, errorDialog="the dispatcher's services are unavailable; retry"), 503)

    def host_of(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    @api.api_route("/server/panda/getJob", methods=METHODS, include_in_schema=False)
    async def get_job(request: Request, authorization: Auth = None, origin_: Origin = None) -> JSONResponse:
        return await call(request, authorization, origin_, pilots.get_job)

    @api.api_route("/server/panda/updateJob", methods=METHODS, include_in_schema=False)
    async def update_job(request: Request, authorization: Auth = None, origin_: Origin = None) -> JSONResponse:
        return await call(request, authorization, origin_, lambda f: pilots.update_job(f, host_of(request)))

    @api.api_route("/server/panda/getEventRanges", methods=METHODS, include_in_schema=False)
    async def get_event_ranges(request: Request, authorization: Auth = None, origin_: Origin = None) -> JSONResponse:
        return await call(request, authorization, origin_, lambda f: pilots.get_event_ranges(f, host_of(request)))

    @api.api_route("/server/panda/updateEventRanges", methods=METHODS, include_in_schema=False)
    async def update_event_ranges(request: Request, authorization: Auth = None, origin_: Origin = None) -> JSONResponse:
        return await call(request, authorization, origin_, lambda f: pilots.update_event_ranges(f, host_of(request)))

    @api.api_route("/server/panda/checkEventsAvailability", methods=METHODS, include_in_schema=False)
    async def check_events_availability(
        request: Request, authorization: Auth = None, origin_: Origin = None
    ) -> JSONResponse:
        return await call(request, authorization, origin_, pilots.check_events_availability)

    @api.get("/server/panda/esmap", include_in_schema=False)
    async def es_map(
        request: Request,
        taskID: Annotated[int, Query(ge=1, le=INT64)],  # PanDA's name
        authorization: Auth = None,
        origin_: Origin = None,
    ) -> JSONResponse:
        """A task's label mapping, ``{label: {event number: payload}}``: the file a Rubin
        pilot reads as ``RUBIN_ES_MAP_FILE`` to turn a range into its payload."""

        async def mapping(_: Form) -> dict[str, Any]:
            label = await store.task_label(taskID)
            if label is None:
                raise PandaError(SC_FAILED, f"taskID {taskID}: no such task")
            return {label: await store.task_mapping(taskID)}

        return await call(request, authorization, origin_, mapping)

    @api.post("/server/panda/{method}", include_in_schema=False)
    async def unknown(method: str) -> JSONResponse:
        return JSONResponse(
            refusal(PandaError(SC_FAILED, f"{method[:60]!r} is not a call this dispatcher answers")), 404
        )

    return api
