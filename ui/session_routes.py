"""The two HTTP routes that give a browser its session cookie and take it away.

Streamlit pages talk to the server over a WebSocket and cannot set cookies, and a cookie written by JavaScript
cannot be HttpOnly. So the console is served as an `st.App` (app.py) with two small routes of its own:
- GET SESSION_PATH?handoff=CODE&next=PAGE trades the one-time code the sign-in page just made for the cookie
  (HttpOnly, SameSite=Strict, expiring with the session), then redirects to the page the person asked for.
- GET SIGN_OUT_PATH revokes the cookie's session, deletes the cookie and redirects to the start page.
Both ignore requests that another site started (Sec-Fetch-Site), so a link elsewhere can neither sign a
browser into someone else's account nor out of its own. Pages read the cookie with `st.context.cookies`.
"""

from __future__ import annotations

import re
from datetime import datetime
from urllib.parse import urlencode

from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from streamlit import config

from core import console_sessions
from db.engine import transaction
from db.models import utcnow

COOKIE_NAME = "imagegate_session"
SESSION_PATH = "/_imagegate/session"
SIGN_OUT_PATH = "/_imagegate/sign-out"
FLASH_PARAM = "flash"
FLASHES = {"admin-created": "Your admin account was created. You are signed in."}
"""Messages the page shows once after the redirect; only these keys pass, so a link cannot inject text."""

# Page URL paths as st.Page makes them: a redirect can only ever stay on this console.
_PAGE_PATH = re.compile(r"^[A-Za-z0-9_-]{0,64}$")
# Fetch metadata of a request the console's own page started, or one the person typed.
_OWN_REQUEST = {"same-origin", "none"}

_served = False


def routes() -> list[BaseRoute]:
    """The routes app.py mounts; calling this also tells the pages that the cookie can be set.

    st.App mounts its own routes under server.baseUrlPath but ours as given, so they carry the prefix here."""
    global _served
    _served = True
    base = base_path()
    return [
        Route(f"{base}{SESSION_PATH}", _collect, methods=["GET"]),
        Route(f"{base}{SIGN_OUT_PATH}", _sign_out, methods=["GET"]),
    ]


def served() -> bool:
    """True when this process serves the routes (started as `streamlit run app.py`). Without them (AppTest, or
    `streamlit run ui/console.py`), a sign-in lasts as long as the browser tab's Streamlit session."""
    return _served


def base_path() -> str:
    """The console's URL prefix ("" or "/prefix"), from Streamlit's server.baseUrlPath."""
    base = str(config.get_option("server.baseUrlPath") or "").strip("/")
    return f"/{base}" if base else ""


def page_url(page: str, flash: str | None = None) -> str:
    page = page if _PAGE_PATH.match(page) else ""
    query = f"?{urlencode({FLASH_PARAM: flash})}" if flash in FLASHES else ""
    return f"{base_path()}/{page}{query}"


def collect_url(handoff: str, page: str, flash: str | None = None) -> str:
    params = {"handoff": handoff, "next": page if _PAGE_PATH.match(page) else ""}
    if flash in FLASHES:
        params[FLASH_PARAM] = str(flash)
    return f"{base_path()}{SESSION_PATH}?{urlencode(params)}"


def sign_out_url() -> str:
    return f"{base_path()}{SIGN_OUT_PATH}"


def _started_here(request: Request) -> bool:
    # Browsers that send no fetch metadata at all (old ones) are let through: SameSite=Strict still holds.
    site = request.headers.get("sec-fetch-site")
    return site is None or site in _OWN_REQUEST


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _factory() -> sessionmaker[Session]:
    from ui.state import runtime  # the pages' cached runtime (one engine per process); imported late: a cycle

    return runtime().sessions


def _collect(request: Request) -> Response:
    """Runs in Starlette's thread pool (a plain function), so the database calls do not block the event loop."""
    query = request.query_params
    response = RedirectResponse(page_url(query.get("next", ""), query.get(FLASH_PARAM)), status_code=303)
    response.headers["Cache-Control"] = "no-store"
    handoff = query.get("handoff", "")
    if not _started_here(request):
        return response
    with transaction(_factory()) as session:
        issued = console_sessions.collect(session, handoff)
    if issued is not None:
        _set_cookie(response, request, issued.token, issued.session.expires_at)
    return response


def _sign_out(request: Request) -> Response:
    response = RedirectResponse(page_url(""), status_code=303)
    response.headers["Cache-Control"] = "no-store"
    if not _started_here(request):
        return response
    token = request.cookies.get(COOKIE_NAME)
    if token:
        with transaction(_factory()) as session:
            console_sessions.revoke_token(session, token)
    response.delete_cookie(
        COOKIE_NAME, path=base_path() or "/", secure=_secure(request), httponly=True, samesite="strict"
    )
    return response


def _set_cookie(response: Response, request: Request, token: str, expires_at: datetime) -> None:
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=max(0, int((expires_at - utcnow()).total_seconds())),
        path=base_path() or "/",
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
