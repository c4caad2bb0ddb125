"""Work for a session's agent: prompts, aborts and its event stream, through OpenCode's API.

codestation drives the OpenCode in each sandbox the way OpenCode's own clients do, over HTTP
with the session's password, always for the project `/workspace`. A prompt goes to an OpenCode
session (made on first use) with a message id codestation chooses, so that a prompt sent
without waiting can still be named; a reply is read back from OpenCode's messages: every
assistant message answering that prompt (a turn with tool calls has several), summed.

What OpenCode answers is the agent's to write (it may have replaced OpenCode): every answer
is read as untrusted, an answer of the wrong shape is `AgentUnavailable`, never a 500.
"""

from __future__ import annotations

import re
import secrets
import string
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from codestation.agent import DIRECTORY, BadAnswer, ask, basic
from codestation.errors import AgentUnavailable, BadRequest
from codestation.schemas import PromptAccepted, PromptRequest, Reply, Tokens, ToolUse

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
TOOL_OUTPUT_SHOWN = 2000  # characters of each tool's output a reply carries
SESSION_ID = re.compile(r"ses_[A-Za-z0-9]{1,64}")  # what may go into a path to OpenCode
MOST_ABORTED = 64


@dataclass(frozen=True)
class Agent:
    """One running session's OpenCode, as the service reaches it."""

    session_id: str
    url: str
    password: SecretStr
    http: httpx.AsyncClient

    async def call(
        self, method: str, path: str, *, json: Any = None, seconds: float | None = 30.0
    ) -> Any:
        """OpenCode's JSON answer to one request (None for an empty one), within `seconds`."""
        try:
            status, answer = await ask(
                self.http, method, f"{self.url}{path}", self.password,
                seconds=seconds, json_body=json,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise AgentUnavailable(
                f"the agent of session {self.session_id} did not answer ({exc!r}); see its logs."
            ) from exc
        except BadAnswer as exc:
            raise AgentUnavailable(
                f"the agent of session {self.session_id} answered {method} {path} with {exc}."
            ) from exc
        if status == 404:
            raise BadRequest(
                f"the agent of session {self.session_id} has nothing at {path}: is the "
                "opencode_session one of its own (GET .../opencode/session lists them)?"
            )
        if status >= 400:
            raise AgentUnavailable(
                f"the agent of session {self.session_id} answered {status} to {method} {path}."
            )
        return answer


def message_id() -> str:
    """An id of OpenCode's own shape for a new message: `msg_`, 12 hex digits of the time
    (OpenCode orders a session's messages by id), then 14 random characters."""
    stamp = (int(time.time() * 1000) * 0x1000) & 0xFFFF_FFFF_FFFF
    return f"msg_{stamp:012x}" + "".join(secrets.choice(_BASE62) for _ in range(14))


async def prompt(agent: Agent, request: PromptRequest) -> PromptAccepted | Reply:
    """Send `request` to the agent; with `wait`, return its reply once the turn ends."""
    await _check_choices(agent, request)
    opencode_session = request.opencode_session
    if opencode_session is None:
        made = await agent.call("POST", "/session", json={"title": request.text[:60]})
        opencode_session = _field(made, "id", str)
    body: dict[str, Any] = {
        "messageID": message_id(),
        "parts": [{"type": "text", "text": request.text}],
    }
    if request.model:
        provider, _, model = request.model.partition("/")
        body["model"] = {"providerID": provider, "modelID": model}
    if request.agent:
        body["agent"] = request.agent
    path = f"/session/{opencode_session}"
    if not request.wait:
        await agent.call("POST", f"{path}/prompt_async", json=body)
        return PromptAccepted(opencode_session=opencode_session, message=body["messageID"])
    # The turn may take as long as the model does; the session's end ends the connection.
    await agent.call("POST", f"{path}/message", json=body, seconds=None)
    return await reply(agent, opencode_session, body["messageID"])


async def _check_choices(agent: Agent, request: PromptRequest) -> None:
    """A model or agent the session's OpenCode does not have is the caller's mistake: say so
    (OpenCode itself would fail the turn with an internal error)."""
    if request.model:
        found = await agent.call("GET", "/config/providers")
        providers = found.get("providers") if isinstance(found, dict) else None
        models = {
            f"{p.get('id')}/{m}"
            for p in (providers if isinstance(providers, list) else [])
            if isinstance(p, dict) and isinstance(p.get("models"), dict)
            for m in p["models"]
        }
        if request.model not in models:
            raise BadRequest(
                f"model {request.model!r} is not one this session's agent has; it has: "
                f"{', '.join(sorted(models)[:20]) or 'none (its environment names no provider)'}."
            )
    if request.agent:
        found = await agent.call("GET", "/agent")
        names = {
            str(a.get("name"))
            for a in (found if isinstance(found, list) else [])
            if isinstance(a, dict) and a.get("mode") != "subagent" and not a.get("hidden")
        }
        if request.agent not in names:
            raise BadRequest(
                f"agent {request.agent!r} is not one of this session's: {', '.join(sorted(names))}."
            )


async def reply(agent: Agent, opencode_session: str, message: str) -> Reply:
    """The agent's reply to the prompt `message` so far: its text, the tools it used, and the
    tokens and cost OpenCode counted, over every assistant message answering it."""
    messages = await agent.call("GET", f"/session/{opencode_session}/message")
    try:
        return _reply(messages, opencode_session, message)
    except (TypeError, AttributeError, ValueError, KeyError) as exc:
        raise AgentUnavailable(
            f"the agent of session {agent.session_id} listed its messages in a shape not "
            f"OpenCode's ({exc!r})."
        ) from exc


def _reply(messages: Any, opencode_session: str, message: str) -> Reply:
    if not isinstance(messages, list):
        raise TypeError("not a list")
    answers = [
        m for m in messages
        if isinstance(m, dict) and isinstance(m.get("info"), dict)
        and m["info"].get("parentID") == message
    ]  # fmt: skip
    texts: list[str] = []
    tools: list[ToolUse] = []
    tokens = Tokens()
    cost = 0.0
    error = None
    done = bool(answers)
    for answer in answers:
        info = answer["info"]
        done = done and bool((info.get("time") or {}).get("completed"))
        if isinstance(info.get("error"), dict):
            found = info["error"]
            error = str((found.get("data") or {}).get("message") or found.get("name") or found)
        cost += _number(info.get("cost"))
        tokens = tokens.plus(info.get("tokens"))
        for part in answer.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "text" and not part.get("synthetic"):
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "tool":
                tools.append(_tool(part))
    return Reply(
        opencode_session=opencode_session,
        message=message,
        text="\n".join(t for t in texts if t),
        tools=tools,
        tokens=tokens,
        cost=cost,
        error=error,
        finished=done,
    )


async def abort(agent: Agent, opencode_session: str | None) -> list[str]:
    """End the turn under way in `opencode_session`, or in every busy one of the agent's;
    return the OpenCode sessions it was asked to abort."""
    if opencode_session is None:
        statuses = await agent.call("GET", "/session/status")
        if not isinstance(statuses, dict):
            raise AgentUnavailable(f"the agent of session {agent.session_id} gave no statuses.")
        busy = [
            k for k, v in statuses.items()
            if SESSION_ID.fullmatch(k) and isinstance(v, dict) and v.get("type") != "idle"
        ][:MOST_ABORTED]  # fmt: skip
    else:
        busy = [opencode_session]
    for found in busy:
        await agent.call("POST", f"/session/{found}/abort")
    return busy


async def events(agent: Agent) -> AsyncGenerator[bytes, None]:
    """OpenCode's event stream for /workspace, as raw server-sent events, as they come."""
    request = agent.http.build_request(
        "GET",
        f"{agent.url}/event",
        headers={**DIRECTORY, "accept": "text/event-stream"},
        timeout=httpx.Timeout(30.0, read=None),
    )
    try:
        response = await agent.http.send(request, auth=basic(agent.password), stream=True)
    except httpx.HTTPError as exc:
        raise AgentUnavailable(
            f"the agent of session {agent.session_id} did not answer ({exc!r}); see its logs."
        ) from exc
    try:
        if response.is_error:
            raise AgentUnavailable(
                f"the agent of session {agent.session_id} answered {response.status_code} "
                "for its events."
            )
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        return  # the sandbox went away: the stream ends with it
    finally:
        await response.aclose()


def _tool(part: dict[str, Any]) -> ToolUse:
    state = part.get("state") if isinstance(part.get("state"), dict) else {}
    assert isinstance(state, dict)
    output = state.get("output") if state.get("status") == "completed" else state.get("error")
    return ToolUse(
        tool=str(part.get("tool", "")),
        status=str(state.get("status", "")),
        title=str(state["title"]) if state.get("title") else None,
        input=state.get("input") if isinstance(state.get("input"), dict) else {},
        output=str(output)[:TOOL_OUTPUT_SHOWN] if output is not None else None,
    )


def _field(value: Any, name: str, kind: type[str]) -> str:
    found = value.get(name) if isinstance(value, dict) else None
    if not isinstance(found, kind):
        raise AgentUnavailable(f"the agent answered without a {name}.")
    return found


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
