import json
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from codestation.agent import CONFIG_INSIDE, agent_env, secret_values
from codestation.config import EnvironmentProfile, Settings, masked
from codestation.errors import SecretMissing
from codestation.image import image_tag


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


def test_per_user_roots_limits_and_uids() -> None:
    s = Settings(
        allowed_roots=["/home/{user}", "/srv/shared"],
        max_sessions_per_user=4,
        users={
            "alice": {"max_sessions": 1, "uid": 4321},
            "bob": {"allowed_roots": ["/data/{user}"]},
        },
    )
    assert s.roots_for("carol") == [Path("/home/carol"), Path("/srv/shared")]
    assert s.roots_for("bob") == [Path("/data/bob")]
    assert (s.max_sessions("alice"), s.max_sessions("bob")) == (1, 4)
    assert s.user("alice").uid == 4321
    assert s.user("nobody").uid is None
    with pytest.raises(ValueError, match="not lowercase Unix names"):
        Settings(users={"../etc": {}})


def test_where_the_service_is_reached() -> None:
    local = Settings(port=8585)
    assert local.service_url == "http://127.0.0.1:8585"
    assert local.web_url("cs-abc") == "http://cs-abc.localhost:8585/"
    assert local.allowed_hosts == {"127.0.0.1", "localhost", "::1"}
    team = Settings(
        host="0.0.0.0",
        public_url="https://code.example.com",
        proxy_domain="code.example.com",
        public_host="box.example.com",
    )
    assert team.service_url == "https://code.example.com"
    assert team.web_url("cs-abc") == "https://cs-abc.code.example.com/"
    assert {"code.example.com", "box.example.com"} <= team.allowed_hosts
    assert "0.0.0.0" not in team.allowed_hosts
    with pytest.raises(ValueError, match="public_url"):
        Settings(public_url="https://code.example.com/path?x")


def test_codestation_s_own_directories_are_reserved(tmp_path: Path) -> None:
    import sys

    import codestation

    s = Settings(data_dir=tmp_path / "d", cache_dir=tmp_path / "c", token_file=tmp_path / "t" / "x")
    reserved = s.reserved_dirs
    for own in (tmp_path / "d", tmp_path / "c", tmp_path / "t", Path(sys.prefix).resolve(),
                Path(codestation.__file__).parent.resolve()):  # fmt: skip
        assert own.resolve() in reserved


def test_the_image_tag_covers_every_input_of_the_build(tmp_path: Path) -> None:
    binary = tmp_path / "opencode"
    binary.write_bytes(b"#!/bin/sh\necho one\n")
    binary.chmod(0o755)
    base = Settings(opencode_binary=binary, cache_dir=tmp_path / "cache")
    assert image_tag(base) == image_tag(Settings(opencode_binary=binary, cache_dir=tmp_path))
    other_base = Settings(opencode_binary=binary, sandbox_base_image="ubuntu:24.04")
    assert image_tag(other_base) != image_tag(base)
    other_version = Settings(opencode_binary=binary, opencode_version="1.0.0")
    assert image_tag(other_version) != image_tag(base)
    before = image_tag(base)
    binary.write_bytes(b"#!/bin/sh\necho second\n")
    assert image_tag(base) != before
    copy = tmp_path / "elsewhere"
    copy.write_bytes(binary.read_bytes())
    copy.chmod(0o755)
    assert image_tag(Settings(opencode_binary=copy)) == image_tag(Settings(opencode_binary=binary))


def test_a_profile_names_its_model_and_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[environments.local]
model = "local/coder"
provider.local = {{ npm = "@ai-sdk/openai-compatible", options = {{ baseURL = "http://10.0.0.5:8080/v1", apiKey = "{{env:API_KEY}}" }}, models = {{ coder = {{}} }} }}
secrets = {{ API_KEY = {{ env = "LOCAL_LLM_KEY" }}, OTHER = {{ file = "{key_file}" }} }}
"""  # noqa: E501
    )
    monkeypatch.setenv("CODESTATION_CONFIG", str(config))
    monkeypatch.setenv("LOCAL_LLM_KEY", "sk-from-env")
    profile = Settings().environments["local"]
    assert profile.agent_config()["model"] == "local/coder"
    assert profile.agent_config()["provider"]["local"]["options"]["apiKey"] == "{env:API_KEY}"
    env = agent_env(SecretStr("pw"), profile, secret_values(profile, "local"))
    assert env["API_KEY"] == "sk-from-env"
    assert env["OTHER"] == "sk-from-file"
    assert "sk-from" not in env["OPENCODE_CONFIG_CONTENT"]
    # Settings, as `codestation config` prints them, hold the references only.
    assert "sk-from" not in json.dumps(Settings().model_dump(mode="json"))


def test_a_missing_secret_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    profile = EnvironmentProfile(
        secrets={"A_KEY": {"env": "NOT_SET_HERE"}, "B_KEY": {"file": str(tmp_path / "none")}}
    )
    with pytest.raises(SecretMissing, match=r"A_KEY \(from the variable NOT_SET_HERE\).*B_KEY"):
        secret_values(profile, "x")


@pytest.mark.parametrize(
    ("profile", "said"),
    [
        ({"provider": {"p": {"options": {"apiKey": "sk-literal"}}}}, "literal value"),
        ({"opencode_config": {"provider": {"p": {"options": {"apiKey": "k"}}}}}, "literal"),
        ({"secrets": {"lower": {"env": "X"}}}, "capitals"),
        ({"secrets": {"OPENCODE_SERVER_PASSWORD": {"env": "X"}}}, "not beginning"),
        ({"secrets": {"A": {"env": "X", "file": "/f"}}}, "exactly one"),
        ({"secrets": {"A": {}}}, "exactly one"),
        ({"secrets": {"A": {"env": "X"}}, "env": {"A": "1"}}, "both in env and in secrets"),
    ],
)
def test_secrets_are_by_reference_only(profile: dict[str, object], said: str) -> None:
    with pytest.raises(ValidationError, match=said):
        EnvironmentProfile.model_validate(profile)


SCRIPTED = {
    "npm": "@ai-sdk/openai-compatible",
    "options": {"baseURL": "http://model.example/v1"},
    "models": {"m": {"name": "M"}},
}


@pytest.mark.parametrize(
    ("profile", "says"),
    [
        ({}, "needs the providers"),
        ({"provider": {"p": {"models": {"m": {}}}}}, "npm package and models"),
        ({"provider": {"p": {"npm": "@ai-sdk/openai-compatible"}}}, "npm package and models"),
        ({"provider": {"p": SCRIPTED}, "model": "p/other"}, "not among the models"),
        ({"provider": {"p": SCRIPTED}, "model": "openai/gpt-5"}, "not among the models"),
    ],
)
def test_a_configured_catalog_must_list_every_model_it_uses(
    profile: dict[str, object], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        EnvironmentProfile(catalog="configured", **profile)


def test_a_configured_catalog_reaches_opencode_as_an_empty_builtin_one() -> None:
    profile = EnvironmentProfile(catalog="configured", provider={"p": SCRIPTED}, model="p/m")
    env = agent_env(SecretStr("pw"), profile, {})
    assert env["OPENCODE_MODELS_PATH"].startswith(CONFIG_INSIDE + "/")
    assert "OPENCODE_MODELS_PATH" not in agent_env(SecretStr("pw"), EnvironmentProfile(), {})


def test_a_kubernetes_claim_needs_its_name_and_where_codestation_sees_it() -> None:
    with pytest.raises(ValidationError, match="needs both claim"):
        EnvironmentProfile.model_validate({"kubernetes": {"volume": "claim", "claim": "ws"}})
    with pytest.raises(ValidationError, match="must be an absolute path"):
        EnvironmentProfile.model_validate(
            {"kubernetes": {"volume": "claim", "claim": "ws", "root": "srv/ws"}}
        )
    with pytest.raises(ValidationError, match="claim"):
        EnvironmentProfile.model_validate(
            {"kubernetes": {"volume": "claim", "claim": "Not_A_Name", "root": "/srv/ws"}}
        )
    fine = EnvironmentProfile.model_validate(
        {"runtime": "kubernetes", "kubernetes": {"volume": "claim", "claim": "ws", "root": "/srv"}}
    )
    assert fine.kubernetes.claim == "ws"
    assert EnvironmentProfile().kubernetes.volume == "hostPath"
