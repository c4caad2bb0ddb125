"""Browsers in and out: the login page, the login link, logout, and the way to a session's host.

A browser shows a token once, pasted into the login page, and gets a login cookie for the
service's own origin in return. A login link (`codestation serve` prints one at its first
start, `codestation token link` makes more) carries a one-time login code instead, never a
token: a URL ends up in history and logs. A login by link is refused when another site sent
the browser there (`Sec-Fetch-Site`): that would log the person in as someone else (login
CSRF). `GET /open/{id}` takes a logged-in browser to a session's own host name with a
single-use ticket, which that host turns into its own cookie (`api/proxy.py`).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from codestation.accounts import Accounts
from codestation.api.access import (
    SERVICE_COOKIE,
    TICKET_PATH,
    from_another_site,
    login_cookie,
    safe_next,
    secure,
)
from codestation.api.routes import CallerDep, Manager, errors
from codestation.api.web import page
from codestation.errors import Forbidden, Unauthorized
from codestation.identity import TOKEN_PREFIX
from codestation.schemas import LoginRequest, LoginResponse

router = APIRouter(tags=["login"], responses=errors(400, 401, 403, 413, 422))

# Where a navigation came from, as the browser says: typed, a bookmark or another program
# ("none"), our own page ("same-origin"); absent from old browsers and non-browsers.
_OUR_NAVIGATIONS = {None, "none", "same-origin"}


def _accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _logged_in(request: Request, cookie: str, max_age: int, where: str) -> Response:
    response = RedirectResponse(where, status_code=303)
    response.headers.append(
        "set-cookie", login_cookie(SERVICE_COOKIE, cookie, max_age, https=secure(request.scope))
    )
    response.headers["cache-control"] = "no-store"
    return response


@router.get("/login", include_in_schema=False, response_model=None)
async def login_page(
    request: Request,
    token: Annotated[str | None, Query(max_length=200)] = None,
    next: Annotated[str, Query(max_length=2000)] = "/",
) -> Response:
    """The login page; with `?token=<login code>`, the login link: log in and go on."""
    if token is None:
        return page("login.html")
    back = {"next": safe_next(next)}
    if request.headers.get("sec-fetch-site") not in _OUR_NAVIGATIONS:
        return RedirectResponse(f"/login?{urlencode({**back, 'error': 'cross_site'})}", 303)
    if token.startswith(TOKEN_PREFIX):
        return RedirectResponse(f"/login?{urlencode({**back, 'error': 'token_in_url'})}", 303)
    who = _accounts(request).by_code(token)
    if who is None:
        return RedirectResponse(f"/login?{urlencode({**back, 'error': 'invalid'})}", 303)
    cookie, max_age = _accounts(request).login(who)
    return _logged_in(request, cookie, max_age, safe_next(next))


@router.post("/login", response_model=LoginResponse)
async def login(request: Request, body: LoginRequest) -> Response:
    """Exchange a token for a login cookie (what the login page does)."""
    if from_another_site(request.scope):
        raise Forbidden("logging in from another site's page is refused.")
    who = _accounts(request).by_token(body.token)
    if who is None:
        raise Unauthorized(
            "that token is not valid: unknown, revoked or expired. An admin makes a new one "
            "with `codestation token create --user NAME`."
        )
    cookie, max_age = _accounts(request).login(who)
    answer = LoginResponse(user=who.user, next=safe_next(body.next))
    response = JSONResponse(answer.model_dump())
    response.headers.append(
        "set-cookie", login_cookie(SERVICE_COOKIE, cookie, max_age, https=secure(request.scope))
    )
    response.headers["cache-control"] = "no-store"
    return response


@router.post("/logout", status_code=204)
async def logout(request: Request, who: CallerDep) -> Response:
    """End this browser's login (and its logins on sessions' host names)."""
    _accounts(request).logout(who)
    response = Response(status_code=204)
    response.headers.append(
        "set-cookie", login_cookie(SERVICE_COOKIE, "", 0, https=secure(request.scope))
    )
    return response


@router.get("/open/{session_id}", include_in_schema=False)
async def open_session(
    request: Request,
    session_id: str,
    manager: Manager,
    who: CallerDep,
    next: Annotated[str, Query(max_length=2000)] = "/",
    state: Annotated[str, Query(max_length=100)] = "",
) -> RedirectResponse:
    """To the session's own host name. Sent here by that host with a `state` (see
    `api/access.py`), go back with a ticket bound to it that logs this browser in there."""
    session = manager.get(who, session_id)
    target = manager.web_url(session).rstrip("/")
    after = quote(safe_next(next), safe="")
    if not state:  # the host starts the handshake itself, from its own cookie
        return RedirectResponse(f"{target}{safe_next(next)}", 303)
    ticket = quote(_accounts(request).ticket(who, session.id, state), safe="")
    return RedirectResponse(
        f"{target}{TICKET_PATH}?ticket={ticket}&next={after}",
        303,
        headers={"cache-control": "no-store"},
    )
