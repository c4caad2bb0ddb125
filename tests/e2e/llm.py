"""A scripted OpenAI-compatible LLM server: the test double for the model provider.

The provider is the one thing the agent needs from off this machine, so tests run this small real
HTTP server instead. The last user message picks the reply, so tests need no control channel:

- ``write NAME: CONTENT`` (e.g. "please write hello.txt: Hello from the agent") -> a call of the
  ``write`` tool with ``{"filePath": NAME, "content": CONTENT}`` (CONTENT runs to the end of the
  message); once the tool result comes back, a short text: "Wrote NAME."
- the word ``slow`` -> text streamed slowly (a chunk every 0.5 s for 120 s), to be aborted; the
  stream ends at the first write after the client went away.
- anything else -> a short text. A request without tools (OpenCode's title) -> a short title.

Every request is recorded; ``GET /_requests`` lists them and ``POST /_reset`` forgets them.
In-process: ``with ScriptedLLM() as llm: ...`` (``llm.base_url``, ``llm.requests``). As a
process, e.g. in a network namespace: ``python -m tests.e2e.llm --host H --port P`` prints its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

Json = dict[str, Any]

MODEL = "mock-model"
WRITE = re.compile(r"\bwrite (\S+?): (.+)", re.DOTALL)
SLOW = re.compile(r"\bslow\b", re.IGNORECASE)
CHUNK_DELAY = 0.05
SLOW_INTERVAL = 0.5
SLOW_CHUNKS = 240


def _text(message: Json) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def script(body: Json) -> tuple[Iterable[str], Json | None, float]:
    """The reply to a chat request: text chunks or a tool call, and the delay between chunks."""
    messages: list[Json] = body.get("messages") or [{}]
    prompt = next((_text(m) for m in reversed(messages) if m.get("role") == "user"), "")
    if len(prompt) > 1 and prompt[0] == prompt[-1] == '"':
        prompt = prompt[1:-1]  # `opencode run "a b"` sends the message quoted: "\"a b\""
    tools = {t.get("function", {}).get("name") for t in body.get("tools") or []}
    write = WRITE.search(prompt)
    if not tools:
        return ["Mock title"], None, 0.0
    if write and messages[-1].get("role") == "tool":
        return ["Wrote ", write[1], "."], None, CHUNK_DELAY
    if write and "write" in tools:
        arguments = json.dumps({"filePath": write[1], "content": write[2]})
        return [], {"name": "write", "arguments": arguments}, 0.0
    if SLOW.search(prompt):
        return (f"tick {i}. " for i in range(SLOW_CHUNKS)), None, SLOW_INTERVAL
    return ["Hello ", "from ", "the ", "mock ", "model."], None, CHUNK_DELAY


def _chunk(ident: str, choice: Json, usage: Json | None = None) -> Json:
    """A streamed chunk or, given a ``message`` choice, a whole (non-streamed) completion."""
    kind = "chat.completion" if "message" in choice else "chat.completion.chunk"
    value = {"id": ident, "object": kind, "created": int(time.time()), "model": MODEL}
    return value | {"choices": [{"index": 0} | choice]} | ({"usage": usage} if usage else {})


def _usage(request: bytes, reply: str) -> Json:
    p, c = len(request) // 4, max(1, len(reply) // 4)  # roughly 4 bytes a token
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedLLM
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # /_requests is the log

    def do_GET(self) -> None:
        if self.path == "/_requests":
            return self._json(200, {"requests": self.server.requests})
        self._record(None)
        if self.path.rstrip("/") != "/v1/models":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/_reset":
            self.server.reset()
            return self._json(200, {"ok": True})
        body: Json = json.loads(raw or b"{}")
        self._record(body)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        chunks, tool, delay = script(body)
        ident = f"chatcmpl-{next(self.server.ids)}"
        calls = [{"index": 0, "id": f"call_{ident}", "type": "function", "function": tool}]
        message: Json = {"role": "assistant"} | ({"tool_calls": calls} if tool else {})
        finish = "tool_calls" if tool else "stop"
        sent = json.dumps(tool) if tool else ""
        if not body.get("stream"):
            text = "".join(chunks)
            choice = {"message": message | {"content": text or None}, "finish_reason": finish}
            return self._json(200, _chunk(ident, choice, _usage(raw, sent + text)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self._event(_chunk(ident, {"delta": message if tool else message | {"content": ""}}))
            for text in chunks:
                if self.server.stopping.wait(delay):
                    return
                sent += text
                self._event(_chunk(ident, {"delta": {"content": text}}))
            last = {"delta": {}, "finish_reason": finish}
            self._event(_chunk(ident, last, _usage(raw, sent)))
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (an aborted turn): stop streaming

    def _record(self, body: Json | None) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        entry: Json = {"method": self.command, "path": self.path, "headers": headers, "body": None}
        if body is not None:
            messages = body.get("messages") or [{}]
            entry["body"] = {
                "model": body.get("model"),
                "stream": body.get("stream", False),
                "tools": [t.get("function", {}).get("name") for t in body.get("tools") or []],
                "roles": [m.get("role") for m in messages],
                "last": _text(messages[-1]),
            }
        with self.server.lock:
            self.server.recorded.append(entry)

    def _json(self, status: int, value: object) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, value: Json) -> None:
        self.wfile.write(b"data: " + json.dumps(value).encode() + b"\n\n")


class ScriptedLLM(ThreadingHTTPServer):
    """The server, bound at once; ``start`` serves it from a thread. Port 0 picks a free port."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _Handler)
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.stopping = threading.Event()  # ends slow streams on stop
        self.recorded: list[Json] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client's ``baseURL`` should be."""
        return f"{self.url}/v1"

    @property
    def requests(self) -> list[Json]:
        """Every request so far: method, path, headers (lower-case names) and a body summary."""
        with self.lock:
            return list(self.recorded)

    def reset(self) -> None:
        with self.lock:
            self.recorded.clear()

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._thread.is_alive():  # shutdown() waits forever on a server never served
            self.shutdown()
        self.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible LLM server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    llm = ScriptedLLM(args.host, args.port)
    print(llm.url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        llm.serve_forever()


if __name__ == "__main__":
    main()
