"""`serve --log-format json`: each line one JSON object, with the session and user where a line
is about one, and request lines without their query strings."""

from __future__ import annotations

import json
import logging

from codestation.logformat import JsonFormatter, Redact


def line(logger: str, message: str, *args: object, **extra: object) -> dict[str, object]:
    record = logging.LogRecord(logger, logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    Redact().filter(record)
    parsed: dict[str, object] = json.loads(JsonFormatter().format(record))
    return parsed


def test_a_line_about_a_session_names_it_and_its_user() -> None:
    said = line("codestation", "session %s failed: %s", "cs-abcdefghijklmnop", "no",
                session="cs-abcdefghijklmnop", user="alice")  # fmt: skip
    assert said["event"] == "session cs-abcdefghijklmnop failed: no"
    assert (said["session"], said["user"]) == ("cs-abcdefghijklmnop", "alice")
    assert said["level"] == "info"
    assert str(said["time"]).endswith("+00:00")


def test_a_session_named_only_in_the_message_is_found_there() -> None:
    said = line("codestation.manager", "cannot poll session %s: %s", "cs-qrstuvwxyz234567", "x")
    assert said["session"] == "cs-qrstuvwxyz234567"
    assert "user" not in said
    assert "session" not in line("codestation", "codestation 0.1.0: runtime bwrap")


def test_a_request_line_has_its_fields_and_never_its_query() -> None:
    said = line("uvicorn.access", '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
                "/login?token=csl_secret", "1.1", 303)  # fmt: skip
    assert said["event"] == "request"
    assert (said["method"], said["status"], said["client"]) == ("GET", 303, "127.0.0.1:5000")
    assert said["path"] == "/login?[query hidden]"
    assert "csl_secret" not in json.dumps(said)
