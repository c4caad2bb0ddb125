"""codestation: OpenCode coding agents in sandboxes, one per workspace, reachable in seconds.

The public face is the Python client and the settings; everything else may change.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("codestation")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

from codestation.client import Client
from codestation.config import EnvironmentProfile, Settings, UserProfile
from codestation.errors import (
    AtCapacity,
    BadRequest,
    CodestationError,
    CsrfFailed,
    Forbidden,
    NoFreePort,
    PayloadTooLarge,
    RuntimeUnavailable,
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
from codestation.schemas import SessionInfo
from codestation.sessions import Status

__all__ = [
    "AtCapacity",
    "BadRequest",
    "Client",
    "CodestationError",
    "CsrfFailed",
    "EnvironmentProfile",
    "Forbidden",
    "NoFreePort",
    "PayloadTooLarge",
    "RuntimeUnavailable",
    "SessionInfo",
    "SessionNotFound",
    "Settings",
    "StartFailed",
    "Status",
    "TooManySessions",
    "TooManyStreams",
    "Unauthorized",
    "Unavailable",
    "UnknownEnvironment",
    "UnknownHost",
    "UserProfile",
    "WorkspaceRejected",
    "__version__",
]
