"""Who may read and who may act: the read token or its session cookie, the monitor token.

Tokens travel only in the ``Authorization: Bearer`` header (never in a URL, which ends up
in logs and browser history). The session cookie the login form sets is an HMAC of the
read token (HttpOnly, SameSite=Strict): it reads and never acts.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.params import Depends as Dependency
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from dispatcher.monitor.config import MonitorConfig

SESSION_COOKIE = "dispatcher_session"
SESSION_SECONDS = 12 * 3600

# module level: with postponed annotations FastAPI resolves these names in the module
CHALLENGE = {"WWW-Authenticate": "Bearer"}
_bearer = HTTPBearer(auto_error=False, scheme_name="bearer")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, scheme_name="session")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
Session = Annotated[str | None, Security(_cookie)]


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


def secret_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(errors="replace"), expected.encode())


class LoginNeeded(Exception):
    """An HTML page asked for without credentials: answered with a redirect to the form."""

    def __init__(self, target: str) -> None:
        self.target = target


class Guards:
    """The dependencies of a monitor's routes: ``read`` (JSON and /metrics), ``page_read``
    (HTML: a redirect to the login form instead of a 401) and ``act`` (cancel, replay)."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.read_token = config.read_token
        read_token = config.read_token

        def reader(credentials: HTTPAuthorizationCredentials | None, session: str | None) -> bool:
            assert read_token is not None
            return secret_matches(credentials.credentials if credentials else None, read_token) or session_valid(
                session, read_token
            )

        # With no read token reading is open, and the OpenAPI says so (no security on reads)
        async def open_read() -> None:
            return None

        async def guarded_read(credentials: Credentials, session: Session) -> None:
            if not reader(credentials, session):
                raise HTTPException(401, "reading needs the monitor's read token", headers=CHALLENGE)

        async def guarded_page(request: Request, credentials: Credentials, session: Session) -> None:
            if not reader(credentials, session):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                raise LoginNeeded(target)

        async def may_act(credentials: Credentials) -> None:
            # the header only: a cookie is sent by the browser on its own, a token is not
            if not config.token:
                raise HTTPException(403, "actions are disabled: start the monitor with DISPATCHER_MONITOR_TOKEN set")
            if credentials is None:
                raise HTTPException(
                    401, "this action needs the monitor token (Authorization: Bearer ...)", headers=CHALLENGE
                )
            if not secret_matches(credentials.credentials, config.token):
                raise HTTPException(403, "wrong monitor token")

        self.read: list[Dependency] = [Depends(guarded_read if read_token else open_read)]
        self.page_read: list[Dependency] = [Depends(guarded_page if read_token else open_read)]
        self.act: list[Dependency] = [Depends(may_act)]

    def logged_in(self, request: Request) -> bool:
        """The request carries a valid session (the pages offer to log out)."""
        return self.read_token is not None and session_valid(request.cookies.get(SESSION_COOKIE), self.read_token)
