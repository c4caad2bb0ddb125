"""What the agent writes reaches the user's terminal as text: no markup, no control codes."""

from __future__ import annotations

import pytest
import typer

from codestation.cli import _fail, _printable


def test_control_codes_go_and_lines_stay() -> None:
    hostile = "title\x1b]0;pwned\x07 clip\x1b]52;c;ZXZpbA==\x07 \x9b31m red\r\nnext\tline"
    assert _printable(hostile) == "title]0;pwned clip]52;c;ZXZpbA== 31m red\nnext\tline"


def test_markup_in_a_message_is_shown_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    exit_ = _fail("a[i] = b[i] + c[/i]; d[b] [/x]")
    assert isinstance(exit_, typer.Exit)
    assert "a[i] = b[i] + c[/i]; d[b] [/x]" in capsys.readouterr().err
