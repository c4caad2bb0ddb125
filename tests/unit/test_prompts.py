"""Reading the agent's answers about a prompt: what OpenCode says, summed over a turn, and
nonsense (the agent may have replaced OpenCode) taken as an unavailable agent, never a 500."""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from codestation.agent import ANSWER_LIMIT, BadAnswer, ask, parse
from codestation.api.access import _basic_password
from codestation.errors import AgentUnavailable, BadRequest
from codestation.prompts import Agent, abort, message_id, reply
from codestation.schemas import Reply

TURN = [
    {"info": {"id": "msg_1", "role": "user"}, "parts": [{"type": "text", "text": "go"}]},
    {
        "info": {"id": "msg_2", "parentID": "msg_1", "time": {"completed": 1}, "cost": 0.25,
                 "tokens": {"input": 10, "output": 2, "cache": {"read": 5, "write": "x"}}},
        "parts": [{"type": "tool", "tool": "write",
                   "state": {"status": "completed", "input": {"filePath": "a"}, "title": "a",
                             "output": "ok" * 5000}}],
    },
    {
        "info": {"id": "msg_3", "parentID": "msg_1", "time": {"completed": 2}, "cost": 0.5,
                 "tokens": {"input": 20, "output": 3}},
        "parts": [{"type": "text", "text": "Done."},
                  {"type": "text", "text": "x", "synthetic": True},
                  "nonsense", {"type": "tool", "state": "nonsense"}],
    },
]  # fmt: skip


def read(answer: Any, status: int = 200, ask: str = "msg_1") -> Reply:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["x-opencode-directory"] == "/workspace"
        return httpx.Response(status, json=answer)

    async def run() -> Reply:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await reply(Agent("cs-1", "http://agent", SecretStr("pw"), http), "ses_a", ask)

    return asyncio.run(run())


def test_a_turn_is_summed_over_its_messages() -> None:
    found = read(TURN)
    assert found.text == "Done."
    assert [(t.tool, t.status, t.title) for t in found.tools] == [
        ("write", "completed", "a"),
        ("", "", None),
    ]
    assert found.tools[0].output is not None
    assert len(found.tools[0].output) == 2000
    assert (found.tokens.input, found.tokens.output, found.tokens.cache_read) == (30, 5, 5)
    assert found.cost == 0.75
    assert found.finished
    assert found.error is None


def test_an_unfinished_or_aborted_turn_says_so() -> None:
    assert not read(TURN[:1]).finished  # no answer yet
    error = {"name": "MessageAbortedError", "data": {"message": "Aborted"}}
    aborted = [TURN[0], {"info": {"parentID": "msg_1", "time": {"completed": 3}, "error": error}}]
    assert read(aborted).error == "Aborted"


@pytest.mark.parametrize("answer", [{"not": "a list"}, "text", None, 3])
def test_nonsense_is_an_unavailable_agent(answer: Any) -> None:
    with pytest.raises(AgentUnavailable):
        read(answer)


def test_an_unknown_opencode_session_is_a_400_and_an_error_a_503() -> None:
    with pytest.raises(BadRequest, match="opencode_session"):
        read({"name": "NotFoundError"}, status=404)
    with pytest.raises(AgentUnavailable, match="500"):
        read({}, status=500)


def test_abort_asks_each_busy_session() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.method} {request.url.path}")
        if request.url.path == "/session/status":
            return httpx.Response(200, json={"ses_a": {"type": "busy"}, "ses_b": {"type": "idle"}})
        return httpx.Response(200, json=True)

    async def run() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await abort(Agent("cs-1", "http://agent", SecretStr("pw"), http), None)

    assert asyncio.run(run()) == ["ses_a"]
    assert asked == ["GET /session/status", "POST /session/ses_a/abort"]


def test_message_ids_have_opencode_s_shape_and_order() -> None:
    first = message_id()
    assert re.fullmatch(r"msg_[0-9a-f]{12}[0-9A-Za-z]{14}", first)
    assert message_id()[:16] >= first[:16]


@pytest.mark.parametrize(
    ("header", "password"),
    [
        (base64.b64encode(b"opencode:cst_abc").decode(), "cst_abc"),
        (base64.b64encode(b":cst_abc:with:colons").decode(), "cst_abc:with:colons"),
        (base64.b64encode(b"no-colon").decode(), ""),
        ("not base64!", ""),
        (base64.b64encode(b"\xff\xfe:x").decode(), ""),
    ],
)
def test_basic_credentials_carry_a_token_as_their_password(header: str, password: str) -> None:
    assert _basic_password(header) == password


@pytest.mark.parametrize(
    "body",
    [b"NaN", b"[Infinity]", b'{"a": 1e999}', b"[" * 100 + b"]" * 100, b"[" * 5000 + b"]" * 5000,
     b"1" * 5000, b"{not json"],
)  # fmt: skip
def test_an_agent_s_answer_must_be_sane_json(body: bytes) -> None:
    with pytest.raises(BadAnswer):
        parse(body)


def test_an_answer_too_large_is_refused_without_reading_it_all() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[" + b"1," * (ANSWER_LIMIT // 2) + b"1]")

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            await ask(http, "GET", "http://agent/session", SecretStr("pw"), seconds=5)

    with pytest.raises(BadAnswer, match="MiB"):
        asyncio.run(run())


def test_abort_never_puts_what_the_agent_said_into_a_path() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path == "/session/status":
            return httpx.Response(
                200, json={"ses_a\r\nX: y": {"type": "busy"}, "../x": {"type": "busy"},
                           **{f"ses_{i}": {"type": "busy"} for i in range(200)}},
            )  # fmt: skip
        return httpx.Response(200, json=True)

    async def run() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await abort(Agent("cs-1", "http://agent", SecretStr("pw"), http), None)

    aborted = asyncio.run(run())
    assert len(aborted) == 64
    assert all(re.fullmatch(r"ses_\d+", a) for a in aborted)


def test_odd_shapes_in_a_reply_are_read_or_refused_never_a_500() -> None:
    odd = read([{"info": {"parentID": "msg_1", "tokens": {"input": "x"}}, "parts": "no"}])
    assert odd.tokens.input == 0
    assert odd.tools == []
    with pytest.raises(AgentUnavailable, match="shape"):
        read([{"info": {"parentID": "msg_1", "error": {"data": ["odd"]}}, "parts": []}])
