"""The least a Python proxy on codestation's stack does, as an anchor for `proxy.py`: uvicorn
(with uvloop and httptools, as the service runs) and httpcore, forwarding each GET to one
OpenCode with its password and nothing else: no caller, no session, no checks. `/_constant`
answers a fixed body without forwarding: what uvicorn itself costs a request.

    FORWARD_TO=http://127.0.0.1:PORT FORWARD_AUTH='Basic ...' uvicorn forwarder:app
"""

from __future__ import annotations

import os

import httpcore
from starlette.types import Receive, Scope, Send

UPSTREAM = os.environ.get("FORWARD_TO", "")
AUTHORIZATION = os.environ.get("FORWARD_AUTH", "")
CONSTANT = b'{"healthy":true}'

pool = httpcore.AsyncConnectionPool(max_keepalive_connections=8)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/_constant":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": CONSTANT})
        return
    url = UPSTREAM + scope["raw_path"].decode("latin-1")
    async with pool.stream("GET", url, headers=[("authorization", AUTHORIZATION)]) as answer:
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": answer.headers})  # fmt: skip
        async for chunk in answer.aiter_stream():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
