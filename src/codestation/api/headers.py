"""What every answer carries and every request may weigh: the outermost layer.

The service's own pages and API get a strict Content-Security-Policy (scripts only from the
service itself; no framing: `frame-ancestors 'none'`), `Referrer-Policy: no-referrer` (a
session's host name never leaks through Referer) and `X-Content-Type-Options: nosniff`. A
session's OpenCode keeps its own policy, plus no framing, no referrer and nosniff.

Request bodies to the service itself are capped at `max_body_size`: a larger one gets 413
before a handler reads it (by Content-Length), or as soon as it passes the cap (chunked).
Bodies bound for a session's OpenCode (on its host name, or under
`/api/v1/code/session/{id}/opencode`) are OpenCode's business and pass uncapped.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codestation.api.access import opencode_path, refuse, session_host
from codestation.errors import PayloadTooLarge

SERVICE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'; object-src 'none'"
)
PROXIED_POLICY = "frame-ancestors 'none'"


class Hardening:
    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        responded = False

        async def send_hardened(message: Message) -> None:
            nonlocal responded
            if responded and message["type"].startswith("http.response"):
                return  # we answered 413 already; the handler's answer has nowhere to go
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                proxied = session_host(scope) is not None
                headers.append(
                    "content-security-policy", PROXIED_POLICY if proxied else SERVICE_POLICY
                )
                headers["referrer-policy"] = "no-referrer"
                headers["x-content-type-options"] = "nosniff"
                if not proxied:
                    headers["x-frame-options"] = "DENY"
            await send(message)

        if session_host(scope) is not None or opencode_path(scope) is not None:
            await self.app(scope, receive, send_hardened)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_size:
            await refuse(scope, send_hardened, self._too_large())
            return
        seen = 0

        async def receive_capped() -> Message:
            nonlocal seen, responded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_size and not responded:
                    await refuse(scope, send_hardened, self._too_large())
                    responded = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, receive_capped, send_hardened)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than {self.max_body_size} bytes (max_body_size); "
            "send less."
        )
