from pathlib import Path

import pytest
from pydantic import ValidationError

from codestation.config import Settings, masked


def test_default_environment_always_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODESTATION_CONFIG", raising=False)
    assert "default" in Settings().environments


def test_toml_file_and_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        """
port = 9000
port_range_start = 31000
port_range_end = 31010

[environments.gpt]
description = "a hosted model"
env = { OPENAI_API_KEY = "sk-secret" }
opencode_config = { model = "openai/gpt-5" }
"""
    )
    monkeypatch.setenv("CODESTATION_CONFIG", str(config))
    monkeypatch.setenv("CODESTATION_PORT", "9100")  # variables win over the file
    s = Settings()
    assert s.port == 9100
    assert (s.port_range_start, s.port_range_end) == (31000, 31010)
    assert s.environments["gpt"].env["OPENAI_API_KEY"] == "sk-secret"
    assert set(s.environments) == {"default", "gpt"}


def test_a_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODESTATION_CONFIG", "/nonexistent/config.toml")
    with pytest.raises(FileNotFoundError, match="not a file"):
        Settings()


def test_an_inverted_port_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODESTATION_CONFIG", raising=False)
    with pytest.raises(ValidationError, match="must not exceed"):
        Settings(port_range_start=30100, port_range_end=30000)


def test_masked_hides_secret_looking_values_at_any_depth() -> None:
    provider = {"p": {"options": {"apiKey": "k"}}}
    shown = masked(
        {"environments": {"x": {"env": {"OPENAI_API_KEY": "sk-1", "LANG": "C"},
                                "opencode_config": {"provider": provider}}}}
    )  # fmt: skip
    env = shown["environments"]["x"]["env"]
    assert env == {"OPENAI_API_KEY": "********", "LANG": "C"}
    assert shown["environments"]["x"]["opencode_config"]["provider"]["p"]["options"] == {
        "apiKey": "********"
    }
