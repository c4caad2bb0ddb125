"""The shapes the HTTP API speaks, shared by the server (`api/`) and the Python client."""

from __future__ import annotations

from datetime import datetime

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


class Auth(BaseModel):
    username: str
    password: str


class SessionInfo(BaseModel):
    id: str
    status: Status
    runtime: str
    url: str | None = Field(description="OpenCode's address; set while the session is running.")
    port: int
    workspace: str
    environment: str
    created_at: datetime
    started_at: datetime | None
    stopped_at: datetime | None
    error: str | None = Field(description="Why the session failed, with its last log lines.")
    step: str | None = Field(description="What a starting or stopping session is doing now.")
    auth: Auth = Field(description="HTTP Basic credentials OpenCode asks for.")


class StartResponse(SessionInfo):
    session_id: str


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class StopAllResponse(BaseModel):
    stopped: list[SessionInfo]


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong and what to do about it.")
    code: str = Field(description="A stable machine-readable code, e.g. workspace_rejected.")


class Health(BaseModel):
    ok: bool
    runtime: str
    version: str
