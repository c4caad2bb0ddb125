"""Every configuration the README shows is one codestation takes as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from codestation.agent import agent_env, secret_values
from codestation.config import Settings

README = Path(__file__).parents[2] / "README.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(), re.DOTALL)


def test_the_readme_shows_configurations() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS)
def test_each_readme_configuration_is_taken(
    block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(block)
    monkeypatch.setenv("CODESTATION_CONFIG", str(config))
    Settings()


def test_the_model_profile_gives_opencode_its_provider_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = next(b for b in BLOCKS if "[environments.local-llm]" in b)
    config = tmp_path / "config.toml"
    config.write_text(block)
    monkeypatch.setenv("CODESTATION_CONFIG", str(config))
    monkeypatch.setenv("LLAMA_API_KEY", "sk-local")
    profile = Settings().environments["local-llm"]
    env = agent_env(SecretStr("pw"), profile, secret_values(profile, "local-llm"))
    assert env["API_KEY"] == "sk-local"
    assert '"apiKey": "{env:API_KEY}"' in env["OPENCODE_CONFIG_CONTENT"]
    assert '"model": "local/qwen"' in env["OPENCODE_CONFIG_CONTENT"]
