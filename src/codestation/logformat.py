"""How `codestation serve` writes its log: for a person (Rich at a terminal, plain lines in a
file or a journal), or `json`: one object per line for a log pipeline, with `time` (UTC, ISO
8601), `level`, `logger`, `event` (the message), and `session` and `user` where a line is about
one; a request's line adds `client`, `method`, `path` and `status`, and `user` when a token or
a login came with it.

Request lines never carry a query string (a login link's code, a session host's ticket) and
no line carries a header: tokens, passwords and cookies never reach the log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

from rich.logging import RichHandler

LogFormat = Literal["text", "json"]
# A session id (sessions.new_session_id), wherever a message names one.
SESSION_ID = re.compile(r"\bcs-[a-z2-7]{16}\b")
# Who the request being answered is from: set by the access check, read when uvicorn logs the
# request (in the request's own task, after the check).
REQUEST_USER: ContextVar[str | None] = ContextVar("codestation_request_user", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if (
            record.name == "uvicorn.access"
            and isinstance(record.args, tuple)
            and len(record.args) == 5
        ):
            client, method, path, _, status = record.args
            entry.update(event="request", client=client, method=method, path=path, status=status)
        else:
            entry["event"] = record.getMessage()
        session = getattr(record, "session", None)
        if session is None and (named := SESSION_ID.search(str(entry["event"]))):
            session = named.group(0)
        if session is not None:
            entry["session"] = session
        user = getattr(record, "user", None)
        if user is not None:
            entry["user"] = user
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class Redact(logging.Filter):
    """Keep query strings out of request lines, however they are encoded; name who asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (user := REQUEST_USER.get()) and not hasattr(record, "user"):
            record.user = user
        if isinstance(record.args, tuple):
            record.args = tuple(
                a.split("?", 1)[0] + "?[query hidden]" if isinstance(a, str) and "?" in a else a
                for a in record.args
            )
        return True


def configure(form: LogFormat) -> None:
    """The root logger's one handler, on stderr, in `form`."""
    handler: logging.Handler
    if form == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        handler = RichHandler(show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # plain lines, never wrapped, for a file or a journal
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness probe
    logging.getLogger("uvicorn.access").addFilter(Redact())
