"""Who may use the service: the one place authentication will slot in.

Until users and tokens exist, codestation answers only clients on this machine (loopback),
whatever address it listens on: the API, the web UI, each session's proxied OpenCode and the
terminal all pass through `LoopbackOnly`, the outermost layer of the app.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send


def origin_allowed(scope: Scope, hosts: set[str], port: int) -> bool:
    """Whether a browser's WebSocket comes from one of our own pages (`hosts` at `port`).

    Browsers let any page open a WebSocket anywhere; Origin is how a server refuses pages of
    other sites. Clients that are not browsers send none.
    """
    origin = Headers(scope=scope).get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.hostname in hosts and (parts.port or 80) == port


def service_hosts() -> set[str]:
    """The names the service's own pages are served under."""
    return {"localhost", "127.0.0.1", "::1"}


def allowed(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return True  # an in-process transport (tests), not the network
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class LoopbackOnly:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": "codestation answers only clients on its own machine until accounts "
                "exist; connect from there (an SSH tunnel works).",
                "code": "forbidden",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
