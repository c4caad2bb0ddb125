"""The shapes the HTTP API speaks, shared by the server (`api/`) and the Python client."""

from __future__ import annotations

from datetime import datetime
from typing import Any

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
    port: int
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
