"""Who is asking, decided once, before any handler runs: the service's own door.

Every request, on loopback too, passes `Access`, the outermost layer but one (`headers.py`):

1. Host allowlist. The service answers only the names it is configured for (127.0.0.1,
   localhost, [::1], its `public_url`'s and `public_host`) and `<session id>.<proxy_domain>`;
   anything else is a 400 before any handler runs. That ends DNS rebinding: a page on a name
   that resolves here still sends its own name.
2. Authentication. `Authorization: Bearer <token>` (programs), HTTP Basic with a token as the
   password (OpenCode's own clients), or a login cookie (browsers):
   the service's cookie on its own names, a session's own cookie on that session's name (host-
   only, so one never travels to the other). The caller goes into the request's scope
   (`caller(scope)`); handlers never look at credentials themselves. Only `/healthz`, the login
   page and its two static files answer without credentials; a session host's ticket door too.
3. Cross-site requests. A cookie rides along with any request the browser makes, whichever page
   asked, so a state-changing request that authenticates by cookie must prove it comes from our
   own page: on the service's names by the CSRF token (header `X-CSRF-Token`, from
   `GET /api/v1/code/me`; JupyterHub's way), on a session's name (OpenCode's own UI, which we
   cannot teach a header) by its Origin. Bearer and Basic requests need neither: browsers never
   add a Bearer header, and add Basic credentials only after a password prompt, which
   codestation never asks for (it challenges with `Bearer` only).
   Every WebSocket must come from a page of the very host it connects to (Origin == Host).

Unauthenticated browsers asking for a page are sent to log in (on a session's name: through
the service's `/open`, with a fresh state cookie that binds the ticket they come back with to
this browser; see `accounts.py`); everyone else gets 401.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from urllib.parse import quote, urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from codestation.accounts import Accounts
from codestation.config import Settings
from codestation.errors import (
    CodestationError,
    CsrfFailed,
    Forbidden,
    Unauthorized,
    UnknownHost,
)
from codestation.identity import Caller, new_secret
from codestation.logformat import REQUEST_USER

SERVICE_COOKIE = "codestation"
SESSION_COOKIE = "codestation_session"
STATE_COOKIE = "codestation_state"  # a session host's half of the ticket handshake
OURS = (SERVICE_COOKIE, SESSION_COOKIE, STATE_COOKIE)
CSRF_HEADER = "x-csrf-token"
TICKET_PATH = "/_codestation/auth"  # a session host's door: a ticket in, a cookie out
PUBLIC = {"/healthz", "/login", "/static/style.css", "/static/login.js"}
METRICS_PATH = "/metrics"
# Who reads the metrics with `metrics_token`: no user's account, and no admin.
SCRAPER = Caller(user="", admin=False, token_id="metrics")
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


# OpenCode's API for programs, on the service's own names: no DNS set-up needed (OpenCode's CLI
# resolves host names through the system, which knows no `*.localhost`).
OPENCODE_PATH = re.compile(rb"^/api/v1/code/session/([A-Za-z0-9_-]+)/opencode(?=/|$)")


def opencode_path(scope: Scope) -> tuple[str, bytes] | None:
    """The session id, and the raw path left after the prefix, of a request to a session's
    OpenCode under the service's own names (`/api/v1/code/session/{id}/opencode/...`)."""
    raw: bytes = scope.get("raw_path") or b""
    found = OPENCODE_PATH.match(raw)
    if found is None:
        return None
    return found.group(1).decode(), raw[found.end() :] or b"/"


def caller(scope: Scope) -> Caller | None:
    """The authenticated caller of this request (None only on the public paths)."""
    found: Caller | None = scope.get("codestation.caller")
    return found


def session_host(scope: Scope) -> str | None:
    """The session id whose host name this request was sent to, if any."""
    found: str | None = scope.get("codestation.session")
    return found


def secure(scope: Scope) -> bool:
    """Whether the browser reached us over TLS (directly, or as the proxy in front says)."""
    return scope.get("scheme") in ("https", "wss")


def host_and_port(scope: Scope) -> tuple[str, int] | None:
    """The Host header's name (lowercase) and port, or None if it has none or is malformed."""
    raw = Headers(scope=scope).get("host")
    if not raw:
        return None
    try:
        parts = urlsplit(f"//{raw}")
        port = parts.port or _DEFAULT_PORTS.get(scope.get("scheme", "http"), 80)
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path:
        return None
    return parts.hostname.lower(), port


def same_origin(scope: Scope, origin: str) -> bool:
    """Whether `origin` names the very host and port this request was sent to."""
    target = host_and_port(scope)
    try:
        parts = urlsplit(origin)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, -1)
    except ValueError:
        return False
    return target is not None and (parts.hostname or "").lower() == target[0] and port == target[1]


def from_another_site(scope: Scope) -> bool:
    """Whether a browser says another page sent this request: an Origin other than this very
    host, or `Sec-Fetch-Site` naming another site or a sibling host."""
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    if origin is not None and not same_origin(scope, origin):
        return True
    return headers.get("sec-fetch-site") in ("cross-site", "same-site")


def cookie_pairs(scope: Scope) -> list[tuple[str, str]]:
    """Every `name=value` the browser sent, in order, as browsers write them: leniently, so a
    cookie another site set in a shape a strict parser rejects cannot hide ours."""
    pairs = []
    for header in Headers(scope=scope).getlist("cookie"):
        for chunk in header.split(";"):
            name, sep, value = chunk.strip().partition("=")
            if sep and name:
                pairs.append((name.strip(), value.strip()))
    return pairs


def cookie_values(scope: Scope, name: str) -> list[str]:
    """Every value sent under `name` (a page on a sibling host can add a second one)."""
    return [v for k, v in cookie_pairs(scope) if k == name][:8]


def login_cookie(name: str, value: str, max_age: int, *, https: bool) -> str:
    """A Set-Cookie value: host-only (no Domain), HttpOnly, SameSite=Lax, Secure over TLS."""
    flags = f"Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax" + ("; Secure" if https else "")
    return f"{name}={value}; {flags}"


def safe_next(raw: str | None, default: str = "/") -> str:
    """A redirect target that stays on the same host: a path, never `//host` or a scheme."""
    if not raw or not raw.startswith("/") or raw.startswith(("//", "/\\")):
        return default
    if any(c in raw for c in "\r\n\t\x00"):
        return default
    return raw


def _basic_password(credential: str) -> str:
    """The password of HTTP Basic credentials (OpenCode's own clients send a codestation token
    there: `opencode run --attach URL --password TOKEN`); the user name is not looked at."""
    try:
        decoded = base64.b64decode(credential.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


class Access:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.hosts = settings.allowed_hosts
        self.suffix = f".{settings.proxy_domain.lower()}"

    def _session_of(self, host: str) -> str | None:
        if host.endswith(self.suffix):
            label = host.removesuffix(self.suffix)
            if label and "." not in label:
                return label
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        target = host_and_port(scope)
        session_id = self._session_of(target[0]) if target else None
        if target is None or (session_id is None and target[0] not in self.hosts):
            shown = Headers(scope=scope).get("host", "")[:100]
            await refuse(scope, send, UnknownHost(
                f"codestation does not answer to the host name {shown!r}; use one it is "
                f"configured for ({', '.join(sorted(self.hosts))}) or add it as public_host."
            ))  # fmt: skip
            return
        scope["codestation.session"] = session_id
        try:
            who = self._authenticate(scope, session_id)
            self._check_cross_site(scope, who, session_id)
        except CodestationError as exc:
            await refuse(scope, send, exc)
            return
        if who is None and not self._public(scope, session_id):
            await self._ask_to_log_in(scope, send, session_id)
            return
        if who is not None and who.login is not None and opencode_path(scope):
            # What OpenCode answers here is the agent's to write: never on the service's
            # origin in a logged-in browser. The UI has the session's own host name.
            await refuse(scope, send, Unauthorized(
                "OpenCode's API under /api/v1/code/session/{id}/opencode takes a token (Bearer, "
                "or Basic with the token as the password), not a browser's login; a browser "
                "opens the session at its own address (web_url)."
            ))  # fmt: skip
            return
        scope["codestation.caller"] = who
        named = REQUEST_USER.set(who.user if who is not None and who.user else None)
        try:
            await self.app(scope, receive, send)
        finally:
            REQUEST_USER.reset(named)

    def _authenticate(self, scope: Scope, session_id: str | None) -> Caller | None:
        accounts: Accounts = scope["app"].state.accounts
        authorization = Headers(scope=scope).get("authorization", "")
        scheme, _, credential = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme in ("bearer", "basic"):
            token = credential.strip() if scheme == "bearer" else _basic_password(credential)
            if self._scraper(scope, session_id, token):
                return SCRAPER
            found = accounts.by_token(token) if token else None
            if found is None:
                raise Unauthorized(
                    "the token is not valid: unknown, revoked or expired. An admin makes a new "
                    "one with `codestation token create --user NAME`."
                )
            return found
        name, scope_of = (
            (SERVICE_COOKIE, "") if session_id is None else (SESSION_COOKIE, session_id)
        )
        for raw in cookie_values(scope, name):
            found = accounts.by_login(raw, scope_of)
            if found is not None:
                return found
        return None

    def _scraper(self, scope: Scope, session_id: str | None, token: str) -> bool:
        """Whether this is a request for the metrics with `metrics_token`."""
        wanted = self.settings.metrics_token
        return (
            wanted is not None
            and session_id is None
            and scope["type"] == "http"
            and scope["path"] == METRICS_PATH
            and hmac.compare_digest(token.encode(), wanted.get_secret_value().encode())
        )

    def _check_cross_site(self, scope: Scope, who: Caller | None, session_id: str | None) -> None:
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if scope["type"] == "websocket":
            if origin is not None and not same_origin(scope, origin):
                raise Forbidden("a WebSocket from another site's page is refused.")
            return
        if who is None or who.login is None or scope["method"] in SAFE_METHODS:
            return
        if session_id is None:
            sent = headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent, who.login.csrf.get_secret_value()):
                raise CsrfFailed(
                    "this request authenticates by cookie, so it must carry the X-CSRF-Token "
                    "header (GET /api/v1/code/me gives it); programs send a Bearer token instead."
                )
            return
        if from_another_site(scope):
            raise Forbidden("a change to this session from another site's page is refused.")

    def _public(self, scope: Scope, session_id: str | None) -> bool:
        if session_id is not None:
            return bool(scope["type"] == "http" and scope["path"] == TICKET_PATH)
        return bool(scope["type"] == "http" and scope["path"] in PUBLIC)

    async def _ask_to_log_in(self, scope: Scope, send: Send, session_id: str | None) -> None:
        headers = Headers(scope=scope)
        wants_page = (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and "text/html" in headers.get("accept", "")
        )
        if not wants_page:
            await refuse(scope, send, Unauthorized(
                "this request carries no credentials; send `Authorization: Bearer <token>` (an "
                "admin makes one with `codestation token create --user NAME`), or log in at "
                f"{self.settings.service_url}/login."
            ))  # fmt: skip
            return
        here = scope["path"] + (
            f"?{scope['query_string'].decode()}" if scope["query_string"] else ""
        )
        after = quote(safe_next(here), safe="")
        answer = [(b"cache-control", b"no-store")]
        if session_id is None:
            location = f"/login?next={after}"
        else:
            state = new_secret()
            cookie = login_cookie(STATE_COOKIE, state, 300, https=secure(scope))
            answer.append((b"set-cookie", cookie.encode()))
            location = f"{self.settings.service_url}/open/{session_id}?next={after}&state={state}"
        answer.append((b"location", location.encode()))
        await send({"type": "http.response.start", "status": 303, "headers": answer})
        await send({"type": "http.response.body", "body": b""})


async def refuse(scope: Scope, send: Send, error: CodestationError) -> None:
    """Answer with `error` as JSON, before any handler ran (a WebSocket is closed: 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps({"error": str(error), "code": error.code}).encode()
    headers = [(b"content-type", b"application/json")]
    if isinstance(error, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="codestation"'))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
