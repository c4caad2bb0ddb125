"""Settings: `CODESTATION_*` environment variables over an optional TOML file over defaults.

The TOML file is `$CODESTATION_CONFIG`, else `~/.config/codestation/config.toml` when it exists.
Environment profiles live under `[environments.<name>]`; `default` always exists.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

OPENCODE_VERSION = "1.18.33"
DEFAULT_CONFIG_FILE = Path("~/.config/codestation/config.toml")


class Limits(BaseModel):
    """What one session may use; unset means no limit. The Docker runtime applies them;
    bubblewrap cannot (it has no cgroup of its own) and says so in the session's `limits`."""

    model_config = ConfigDict(extra="forbid")

    memory: str | None = Field(
        default="4g", pattern=r"^\d+[bkmg]?$", description="Memory, e.g. 512m or 4g."
    )
    cpus: float | None = Field(default=2.0, gt=0, description="CPUs, e.g. 1.5.")
    pids: int | None = Field(default=1024, gt=0, description="Processes and threads.")


class EnvironmentProfile(BaseModel):
    """What a session started with `environment=<name>` gets."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    runtime: Literal["docker", "bwrap"] | None = Field(
        default=None, description="Where this environment's sessions run; unset: the service's."
    )
    image: str | None = Field(
        default=None,
        description="Container image with OpenCode at /usr/local/bin/opencode; "
        "unset means codestation's own sandbox image, built on first need.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables, e.g. a provider's API key."
    )
    opencode_config: dict[str, Any] = Field(
        default_factory=dict,
        description="OpenCode configuration (provider, model, ...), "
        "passed as OPENCODE_CONFIG_CONTENT.",
    )
    limits: Limits | None = Field(default=None, description="Unset: the service's limits.")
    idle_timeout: float | None = Field(
        default=None, ge=0, description="Unset: the service's idle_timeout."
    )
    max_age: float | None = Field(default=None, ge=0, description="Unset: the service's max_age.")


def _default_roots() -> list[Path]:
    return [Path.home().resolve(), Path(tempfile.gettempdir()).resolve()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CODESTATION_", extra="forbid")

    runtime: Literal["auto", "docker", "bwrap"] = Field(
        default="auto",
        description="Where sessions run: auto takes Docker when an engine answers, "
        "else bubblewrap.",
    )
    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8585, ge=1, le=65535, description="Port the API listens on.")
    data_dir: Path = Field(
        default=Path("~/.local/share/codestation"),
        description="Where the session store, caches and logs live.",
    )
    cache_dir: Path = Field(
        default=Path("~/.cache/codestation"),
        description="Downloads and builds shared by every data directory (OpenCode, image inputs).",
    )
    port_range_start: int = Field(default=30000, ge=1, le=65535)
    port_range_end: int = Field(default=30099, ge=1, le=65535)
    publish_address: str = Field(
        default="127.0.0.1", description="Host address sessions' ports are published on."
    )
    public_host: str | None = Field(
        default=None,
        description="Host name put in session URLs; defaults to the publish address "
        "(127.0.0.1 when publishing on all addresses).",
    )
    proxy_domain: str = Field(
        default="localhost",
        description="Each session's OpenCode UI is served at http://<session id>.<proxy_domain>"
        ":<port>/ (browsers resolve *.localhost to this machine; use a wildcard DNS name in "
        "a real deployment).",
    )
    allowed_roots: list[Path] = Field(
        default_factory=_default_roots,
        description="Workspaces must lie inside one of these directories.",
    )
    start_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds from launching OpenCode to its first healthy answer.",
    )
    stop_timeout: float = Field(
        default=10.0, ge=0, description="Seconds OpenCode gets to exit after SIGTERM."
    )
    opencode_version: str = Field(default=OPENCODE_VERSION)
    opencode_binary: Path | None = Field(
        default=None,
        description="An OpenCode binary to use instead of the pinned one codestation installs.",
    )
    sandbox_base_image: str = Field(
        default="debian:bookworm-slim",
        description="Base of the sandbox image; when it cannot be pulled, one is built "
        "from Debian's mirror with debootstrap.",
    )
    debian_mirror: str | None = Field(
        default=None, description="Mirror for debootstrap; defaults to the one apt uses."
    )
    log_tail_lines: int = Field(default=40, ge=1, le=10000)
    limits: Limits = Field(default_factory=Limits)
    idle_timeout: float = Field(
        default=3600,
        ge=0,
        description="Seconds a running session may go without activity before it is stopped "
        "(0: never). Activity: API calls about it, the agent working, its shell running.",
    )
    max_age: float = Field(
        default=86400, ge=0, description="Seconds after its start a session is stopped (0: never)."
    )
    watch_interval: float = Field(
        default=1.0,
        gt=0,
        description="Seconds between polls of running sessions for a dead agent (the backstop "
        "of the runtime's events).",
    )
    cull_interval: float = Field(
        default=30, gt=0, description="Seconds between checks for idle and old sessions."
    )
    stop_on_shutdown: bool = Field(
        default=False,
        description="Stop every session when the service stops; by default they keep running "
        "and are re-adopted at the next start.",
    )
    environments: dict[str, EnvironmentProfile] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _normalise(self) -> Settings:
        if self.port_range_start > self.port_range_end:
            raise ValueError(
                f"port_range_start ({self.port_range_start}) must not exceed "
                f"port_range_end ({self.port_range_end})"
            )
        self.data_dir = self.data_dir.expanduser()
        self.cache_dir = self.cache_dir.expanduser()
        self.allowed_roots = [p.expanduser().resolve() for p in self.allowed_roots]
        self.environments.setdefault("default", EnvironmentProfile())
        return self

    @property
    def local_host(self) -> str:
        """Where this machine reaches a session's port (the readiness probe, for one)."""
        wildcard = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}
        return wildcard.get(self.publish_address, self.publish_address)

    @property
    def session_host(self) -> str:
        """The host name put in session URLs."""
        return self.public_host or self.local_host

    @property
    def db_path(self) -> Path:
        return self.data_dir / "codestation.db"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = config_file_path()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def config_file_path() -> Path | None:
    """The TOML file settings are read from, if any."""
    explicit = os.environ.get("CODESTATION_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CODESTATION_CONFIG names {path}, which is not a file")
        return path
    default = DEFAULT_CONFIG_FILE.expanduser()
    return default if default.is_file() else None


_SECRET_KEY = re.compile(r"key|token|secret|password|passwd|credential", re.IGNORECASE)


def masked(value: Any) -> Any:
    """`value` with every entry whose key looks like a secret replaced, for printing."""
    if isinstance(value, dict):
        return {
            k: "********" if _SECRET_KEY.search(str(k)) and v else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value
