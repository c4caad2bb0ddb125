"""codestation: OpenCode coding agents in sandboxes, one per workspace, reachable in seconds.

The public face is the Python client and the settings; everything else may change.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("codestation")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

from codestation.changes import Changes, FileChange
from codestation.client import AsyncClient, AsyncSession, Client, Session
from codestation.config import EnvironmentProfile, Settings, UserProfile
from codestation.errors import (
    AgentUnavailable,
    AtCapacity,
    BadRequest,
    CodestationError,
    CsrfFailed,
    Forbidden,
    NoFreePort,
    NotRunning,
    PayloadTooLarge,
    RuntimeUnavailable,
    SecretMissing,
    SessionNotFound,
    StartFailed,
    TooManySessions,
    TooManyStreams,
    Unauthorized,
    Unavailable,
    UnknownEnvironment,
    UnknownHost,
    WorkspaceRejected,
)
from codestation.schemas import AgentEvent, PromptAccepted, Reply, SessionInfo, Tokens, ToolUse
from codestation.sessions import Status

__all__ = [
    "AgentEvent",
    "AgentUnavailable",
    "AsyncClient",
    "AsyncSession",
    "AtCapacity",
    "BadRequest",
    "Changes",
    "Client",
    "CodestationError",
    "CsrfFailed",
    "EnvironmentProfile",
    "FileChange",
    "Forbidden",
    "NoFreePort",
    "NotRunning",
    "PayloadTooLarge",
    "PromptAccepted",
    "Reply",
    "RuntimeUnavailable",
    "SecretMissing",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "Settings",
    "StartFailed",
    "Status",
    "Tokens",
    "TooManySessions",
    "TooManyStreams",
    "ToolUse",
    "Unauthorized",
    "Unavailable",
    "UnknownEnvironment",
    "UnknownHost",
    "UserProfile",
    "WorkspaceRejected",
    "__version__",
]
