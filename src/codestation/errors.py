"""Every error codestation raises on purpose, drawn once.

    CodestationError                  500 internal_error
    ├── SessionNotFound               404 session_not_found   (also: another user's session)
    ├── BadRequest                    400 bad_request
    │   ├── WorkspaceRejected         400 workspace_rejected
    │   ├── UnknownEnvironment        400 unknown_environment
    │   └── UnknownHost               400 unknown_host        (DNS rebinding ends here)
    ├── Unauthorized                  401 unauthorized        (no token, or a bad one)
    ├── Forbidden                     403 forbidden
    │   └── CsrfFailed                403 csrf_failed
    ├── NotRunning                    409 not_running         (a prompt to a stopped session)
    ├── PayloadTooLarge               413 payload_too_large
    ├── TooManySessions               429 too_many_sessions
    ├── TooManyStreams                429 too_many_streams    (event streams, followed logs)
    ├── Unavailable                   503 unavailable
    │   ├── NoFreePort                503 no_free_port
    │   ├── AtCapacity                503 capacity            (the host is full)
    │   ├── SecretMissing             503 secret_missing      (an environment's secret is unset)
    │   ├── AgentUnavailable          503 agent_unavailable   (the session's OpenCode won't answer)
    │   └── RuntimeUnavailable        503 runtime_unavailable
    └── StartFailed                   (a session's failure reason, never an HTTP answer)
        ├── StartTimeout
        ├── AgentExited
        └── ImageBuildFailed

Each class carries the HTTP status and the machine-readable code the API answers with;
`codestation.api.app` maps them to `{"error": str(exc), "code": exc.code}` in one handler.
The message is a sentence for the person who must fix the problem: say what to do.
The Python client raises the same classes, rebuilt from the answer's `code`.
"""

from __future__ import annotations


class CodestationError(Exception):
    status_code: int = 500
    code: str = "internal_error"


class SessionNotFound(CodestationError):
    status_code = 404
    code = "session_not_found"


class BadRequest(CodestationError):
    status_code = 400
    code = "bad_request"


class WorkspaceRejected(BadRequest):
    code = "workspace_rejected"


class UnknownEnvironment(BadRequest):
    code = "unknown_environment"


class UnknownHost(BadRequest):
    code = "unknown_host"


class Unauthorized(CodestationError):
    status_code = 401
    code = "unauthorized"


class Forbidden(CodestationError):
    status_code = 403
    code = "forbidden"


class CsrfFailed(Forbidden):
    code = "csrf_failed"


class NotRunning(CodestationError):
    status_code = 409
    code = "not_running"


class PayloadTooLarge(CodestationError):
    status_code = 413
    code = "payload_too_large"


class TooManySessions(CodestationError):
    status_code = 429
    code = "too_many_sessions"


class TooManyStreams(CodestationError):
    status_code = 429
    code = "too_many_streams"


class Unavailable(CodestationError):
    status_code = 503
    code = "unavailable"


class NoFreePort(Unavailable):
    code = "no_free_port"


class AtCapacity(Unavailable):
    code = "capacity"


class SecretMissing(Unavailable):
    code = "secret_missing"


class AgentUnavailable(Unavailable):
    code = "agent_unavailable"


class RuntimeUnavailable(Unavailable):
    code = "runtime_unavailable"


class StartFailed(CodestationError):
    code = "start_failed"

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        # The agent's last lines, where the runtime read them before it removed the sandbox.
        self.log_tail = log_tail


class StartTimeout(StartFailed):
    code = "start_timeout"


class AgentExited(StartFailed):
    code = "agent_exited"


class ImageBuildFailed(StartFailed):
    code = "image_build_failed"


def error_for_code(code: str) -> type[CodestationError]:
    """The class the API's `code` stands for (CodestationError for one this version lacks)."""
    pending: list[type[CodestationError]] = [CodestationError]
    while pending:
        cls = pending.pop()
        if cls.code == code:
            return cls
        pending.extend(cls.__subclasses__())
    return CodestationError
