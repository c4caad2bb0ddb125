"""The shapes the HTTP API speaks, shared by the server (`api/`) and the Python client."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from codestation.sessions import Status


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workspace: str = Field(
        description="Absolute path of the directory the agent works in; it is mounted at "
        "/workspace and never deleted or changed by codestation.",
        examples=["/home/me/project"],
    )
    environment: str = Field(
        default="default", description="Name of an environment profile from the config."
    )
    idle_timeout: float | None = Field(
        default=None,
        gt=0,
        description="Stop it after this many seconds without activity; at most the "
        "environment's idle_timeout (unset: the environment's).",
    )
    max_age: float | None = Field(
        default=None,
        gt=0,
        description="Stop it this many seconds after its start; at most the environment's "
        "max_age (unset: the environment's).",
    )


class Auth(BaseModel):
    username: str
    password: str


class SessionInfo(BaseModel):
    id: str
    status: Status
    runtime: str
    url: str | None = Field(description="OpenCode's address; set while the session is running.")
    web_url: str | None = Field(
        description="OpenCode's web UI through codestation, on the session's own host name, "
        "with no password prompt; set while the session is running."
    )
    opencode_url: str | None = Field(
        default=None,
        description="OpenCode's API through codestation on its own address, for OpenCode's "
        "clients: `opencode run --attach <opencode_url> --password <your token>`; set while "
        "the session is running.",
    )
    started_from: Literal["cold", "pool"] = Field(
        default="cold", description="cold: a sandbox was made for it."
    )
    phases: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds each step of its start took: admission (checks, records, a port), "
        "prepare (image or binary), sandbox (its creation), boot (OpenCode, up to its first "
        "answer), and snapshot (of the workspace, alongside prepare and sandbox).",
    )
    agent: Literal["busy", "idle"] | None = Field(
        default=None, description="Whether the agent is working, as last seen; unset: unknown."
    )
    port: int = Field(
        description="The port OpenCode answers on at `url`: one of this host's range, or for "
        "a running Kubernetes session the one in its `url` (else 0)."
    )
    workspace: str
    environment: str
    created_at: datetime
    started_at: datetime | None
    stopped_at: datetime | None
    error: str | None = Field(description="Why the session failed, with its last log lines.")
    step: str | None = Field(description="What a starting or stopping session is doing now.")
    reason: str | None = Field(description="Why it stopped: requested, idle, max_age or shutdown.")
    idle_timeout: float = Field(
        description="Seconds without activity before it is stopped; 0: never."
    )
    max_age: float = Field(description="Seconds after creation it is stopped; 0: never.")
    last_activity: datetime | None
    limits: dict[str, Any] = Field(
        description="Resource limits its runtime enforces (memory, cpus, pids); empty if none."
    )
    owner: str = Field(description="The user who started it.")
    auth: Auth = Field(
        description="HTTP Basic credentials OpenCode asks for (shown to its owner and admins)."
    )


class StartResponse(SessionInfo):
    session_id: str


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class StopAllResponse(BaseModel):
    stopped: list[SessionInfo]


class Me(BaseModel):
    user: str
    admin: bool
    token_id: str = Field(description="The token this request, or its login, stands on.")
    csrf_token: str | None = Field(
        description="Set for a browser logged in by cookie: send it as X-CSRF-Token with every "
        "change (POST, DELETE)."
    )


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=200, description="A token from `codestation token create`.")
    next: str = Field(default="/", max_length=2000, description="Where to go afterwards.")


class LoginResponse(BaseModel):
    user: str
    next: str = Field(description="Where the browser should go now (a path on this origin).")


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong and what to do about it.")
    code: str = Field(description="A stable machine-readable code, e.g. workspace_rejected.")


class Capacity(BaseModel):
    sessions: int = Field(description="Live sessions now.")
    max_sessions: int = Field(description="Live sessions the service may run (max_live_sessions).")
    memory_reserved: int = Field(description="Bytes of memory live sessions' limits reserve.")
    memory_budget: int = Field(description="Bytes those limits may add up to (memory_budget).")
    pool_ready: dict[str, int] = Field(
        default_factory=dict,
        description="Sandboxes started ahead of need and ready to be taken, by environment.",
    )


class Health(BaseModel):
    ok: bool
    runtime: str
    version: str
    capacity: Capacity


class EnvironmentInfo(BaseModel):
    name: str
    description: str
    runtime: str = Field(description="Where its sessions run.")


class EnvironmentList(BaseModel):
    environments: list[EnvironmentInfo]


class PromptRequest(BaseModel):
    """A prompt for a session's agent."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=200_000, description="What to ask the agent.")
    model: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._@-]+/[^\s]+$",
        description="`provider/model`; unset: the environment's default.",
    )
    agent: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="OpenCode's agent, e.g. build."
    )
    opencode_session: str | None = Field(
        default=None,
        pattern=r"^ses_[A-Za-z0-9]{1,64}$",
        description="Continue this OpenCode session; unset: a new one.",
    )
    wait: bool = Field(default=False, description="Answer with the reply once the turn ends.")


class PromptAccepted(BaseModel):
    opencode_session: str
    message: str = Field(description="The id of the prompt's message in OpenCode.")


class Tokens(BaseModel):
    input: int = 0
    output: int = 0
    reasoning: int = 0
    cache_read: int = 0
    cache_write: int = 0

    def plus(self, found: Any) -> Tokens:
        """These tokens and those of one of OpenCode's messages (`tokens` as it reports it)."""
        if not isinstance(found, dict):
            return self
        cache: dict[str, Any] = found["cache"] if isinstance(found.get("cache"), dict) else {}

        def count(value: Any) -> int:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            return int(value) if ok else 0

        return Tokens(
            input=self.input + count(found.get("input")),
            output=self.output + count(found.get("output")),
            reasoning=self.reasoning + count(found.get("reasoning")),
            cache_read=self.cache_read + count(cache.get("read")),
            cache_write=self.cache_write + count(cache.get("write")),
        )


class ToolUse(BaseModel):
    tool: str = Field(description="e.g. write, edit, bash.")
    status: str = Field(description="completed, error, or running while the turn goes on.")
    title: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    output: str | None = Field(default=None, description="Its output or error, shortened.")


class Reply(PromptAccepted):
    """What the agent answered to one prompt."""

    text: str = Field(description="Its text, every step's, in order.")
    tools: list[ToolUse]
    tokens: Tokens
    cost: float = Field(description="As OpenCode reports it, in dollars (0 where unknown).")
    error: str | None = Field(default=None, description="Why the turn failed or was aborted.")
    finished: bool = Field(description="Whether the turn has ended.")


class AbortResponse(BaseModel):
    aborted: list[str] = Field(description="The OpenCode sessions whose turn was ended.")


class AgentEvent(BaseModel):
    """One of the agent's events, as OpenCode sends it: `type` (e.g. `message.part.delta`,
    `message.part.updated`, `session.status`, `session.idle`) and its `properties`."""

    model_config = ConfigDict(extra="allow")

    type: str
    properties: dict[str, Any] = Field(default_factory=dict)
