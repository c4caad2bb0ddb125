"""Settings: `CODESTATION_*` environment variables over an optional TOML file over defaults.

The TOML file is `$CODESTATION_CONFIG`, else `~/.config/codestation/config.toml` when it exists.
Environment profiles live under `[environments.<name>]`; `default` always exists.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

OPENCODE_VERSION = "1.18.33"
DEFAULT_CONFIG_FILE = Path("~/.config/codestation/config.toml")
# A user name is put into paths (`/home/{user}`) and host-only cookies: keep it to a Unix name.
USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SIZE = r"^\d+[bkmg]?$"
_SECRET_KEY = re.compile(r"key|token|secret|password|passwd|credential", re.IGNORECASE)
# OpenCode's own substitutions: a value read from the agent's environment or a file.
_REFERENCE = re.compile(r"\{(env|file):[^{}]+\}")
_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size_bytes(text: str) -> int:
    """A size as settings write it (`512m`, `4g`, `1024`) in bytes."""
    unit = text[-1].lower()
    return int(text[:-1]) * _UNITS[unit] if unit in _UNITS else int(text)


class Limits(BaseModel):
    """What one session may use; unset means no limit. Docker applies them all; bubblewrap
    applies memory, cpus and pids through a cgroup of the session's own when codestation runs
    as root (else none of those), and tmp always. A session's `limits` show what applies."""

    model_config = ConfigDict(extra="forbid")

    memory: str | None = Field(default="4g", pattern=SIZE, description="Memory, e.g. 512m or 4g.")
    cpus: float | None = Field(default=2.0, gt=0, description="CPUs, e.g. 1.5.")
    pids: int | None = Field(default=1024, gt=0, description="Processes and threads.")
    tmp: str | None = Field(
        default="1g",
        pattern=SIZE,
        description="Size of the sandbox's /tmp (also its HOME), held in memory: it counts "
        "against memory, so keep it well below.",
    )


# A secret travels to the sandbox as an environment variable of this name.
SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
_RESERVED_ENV = ("OPENCODE_", "HOME", "PATH", "CODESTATION_")


class SecretRef(BaseModel):
    """Where a secret's value is kept: a variable of the service's environment, or a file.
    Only the reference lives in the settings; the value is read when a session starts."""

    model_config = ConfigDict(extra="forbid")

    env: str | None = Field(default=None, description="A variable of codestation's environment.")
    file: Path | None = Field(default=None, description="A file holding the value.")

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret names exactly one source: { env = \"VAR\" } or "
                             "{ file = \"/path\" }")  # fmt: skip
        return self

    def value(self) -> SecretStr | None:
        """The secret's value, or None if its source is missing or empty."""
        if self.env is not None:
            found = os.environ.get(self.env, "")
        else:
            assert self.file is not None
            try:
                with open(self.file, "rb") as f:
                    found = f.read(65537).decode().strip()
            except (OSError, UnicodeDecodeError):
                return None
        return SecretStr(found) if found else None

    def __str__(self) -> str:
        return f"the variable {self.env}" if self.env else f"the file {self.file}"


class KubernetesStorage(BaseModel):
    """Where a Kubernetes session's Pod finds its workspace (`[environments.<name>.kubernetes]`).

    `hostPath`: the workspace's own path on the node, for a single-node cluster whose node is
    the machine codestation checks workspaces on. `claim`: a PersistentVolumeClaim of many
    workspaces (ReadWriteMany for more than one node), which codestation sees mounted at
    `root`: a workspace `<root>/a/b` is the claim's subPath `a/b`.
    """

    model_config = ConfigDict(extra="forbid")

    volume: Literal["hostPath", "claim"] = Field(
        default="hostPath", description="hostPath (single node) or claim (a shared volume)."
    )
    claim: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
        description="The PersistentVolumeClaim, in codestation's namespace, for volume = claim.",
    )
    root: Path | None = Field(
        default=None,
        description="Where codestation itself sees the claim's volume; every workspace of "
        "such an environment lies beneath it.",
    )

    @model_validator(mode="after")
    def _claim_needs_root(self) -> KubernetesStorage:
        if self.volume == "claim" and (self.claim is None or self.root is None):
            raise ValueError("volume = claim needs both claim (its name) and root (its mount)")
        if self.root is not None and not self.root.is_absolute():
            raise ValueError(f"root {self.root} must be an absolute path")
        return self


class EnvironmentProfile(BaseModel):
    """What a session started with `environment=<name>` gets."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    runtime: Literal["docker", "bwrap", "kubernetes"] | None = Field(
        default=None, description="Where this environment's sessions run; unset: the service's."
    )
    image: str | None = Field(
        default=None,
        description="Container image with OpenCode at /usr/local/bin/opencode, and sh and stat "
        "(the workspace guard); "
        "unset means codestation's own sandbox image, built on first need.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables for the agent; shown as they are, so keep "
        "keys and tokens in secrets.",
    )
    opencode_config: dict[str, Any] = Field(
        default_factory=dict,
        description="OpenCode configuration (provider, model, ...), "
        "passed as OPENCODE_CONFIG_CONTENT.",
    )
    provider: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="OpenCode's `provider` block: the model providers this environment's agent "
        "may use, e.g. an @ai-sdk/openai-compatible one with options.baseURL. Write a key as "
        "{env:NAME} and give NAME in secrets.",
    )
    model: str | None = Field(
        default=None, description="The default model, as OpenCode names it: `provider/model`."
    )
    catalog: Literal["builtin", "configured"] = Field(
        default="builtin",
        description="The models OpenCode knows: builtin, every provider and model of its "
        "built-in models.dev catalog (what logging in to a provider in its UI needs); "
        "configured, only those `provider` lists (each with its `npm` package and `models`). "
        "OpenCode rebuilds its whole catalog each time it opens a project, some 0.4 s of CPU, "
        "which configured saves: starts from the pool are that much faster.",
    )
    secrets: dict[str, SecretRef] = Field(
        default_factory=dict,
        description="Environment variables for the agent whose values are read, when a session "
        "starts, from codestation's own environment or a file: "
        '`API_KEY = { env = "OPENAI_API_KEY" }`. Only the sandbox gets the values.',
    )
    limits: Limits | None = Field(default=None, description="Unset: the service's limits.")
    network: Literal["none", "egress", "full"] = Field(
        default="egress",
        description="What the agent may reach: none; egress (the outside world, never this host, "
        "other sessions, link-local or private addresses but those in allow); full (anything "
        "the host can reach, the host included: unsafe).",
    )
    allow: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Private or link-local networks (CIDR) that egress may reach, e.g. a "
        "package mirror at 10.1.2.3/32. Never this host or other sessions.",
    )
    git_writable: bool = Field(
        default=False,
        description="Let the agent change the workspace's .git/config and .git/hooks. Risky: "
        "both say what the user's own git runs on the host (core.fsmonitor, hooks), so the "
        "agent could run code as the user outside its sandbox. Commits work either way.",
    )
    idle_timeout: float | None = Field(
        default=None, ge=0, description="Unset: the service's idle_timeout."
    )
    max_age: float | None = Field(default=None, ge=0, description="Unset: the service's max_age.")
    kubernetes: KubernetesStorage = Field(
        default_factory=KubernetesStorage,
        description="For the kubernetes runtime: where a session's Pod finds its workspace.",
    )
    pool: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Sandboxes kept started ahead of need, for each runtime and workspace owner "
        "that started a session in this environment: a start then takes one in milliseconds "
        "instead of booting OpenCode. They use only spare room (max_live_sessions, the memory "
        "budget, the port range) and need codestation to run as root.",
    )

    @model_validator(mode="after")
    def _secrets_by_reference(self) -> EnvironmentProfile:
        for name in self.secrets:
            if not SECRET_NAME.match(name) or name.startswith(_RESERVED_ENV):
                raise ValueError(
                    f"secret name {name!r}: use capitals, digits and _, not beginning with "
                    f"{', '.join(_RESERVED_ENV)}"
                )
            if name in self.env:
                raise ValueError(f"{name} is both in env and in secrets; keep it in secrets")
        if self.catalog == "configured":
            self._check_configured_catalog()
        for path, value in _leaves(self.agent_config().get("provider", {})):
            literal = isinstance(value, str) and not _REFERENCE.fullmatch(value.strip())
            if literal and value.strip() and _SECRET_KEY.search(path.rsplit(".", 1)[-1]):
                raise ValueError(
                    f"provider {path} holds a literal value; name a secret instead: write "
                    '"{env:API_KEY}" there and API_KEY = { env = "..." } under secrets'
                )
        return self

    def _check_configured_catalog(self) -> None:
        providers = self.agent_config().get("provider", {})
        if not providers:
            raise ValueError(
                'catalog = "configured" needs the providers and their models under provider'
            )
        for name, block in providers.items():
            if not isinstance(block, dict) or not block.get("npm") or not block.get("models"):
                raise ValueError(
                    f'catalog = "configured": provider {name} must give its npm package and '
                    "models, since OpenCode then knows no others"
                )
        wanted = self.agent_config().get("model")
        if isinstance(wanted, str):
            provider, _, model = wanted.partition("/")
            if model not in (providers.get(provider) or {}).get("models", {}):
                raise ValueError(
                    f'catalog = "configured": model {wanted} is not among the models provider lists'
                )

    def agent_config(self) -> dict[str, Any]:
        """OpenCode's configuration for this environment: `opencode_config`, then the
        provider and model named on their own."""
        config = dict(self.opencode_config)
        if self.provider:
            config["provider"] = {**config.get("provider", {}), **self.provider}
        if self.model:
            config["model"] = self.model
        return config


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}".strip("."))]
    return [(path, value)]


class UserProfile(BaseModel):
    """What one user may do, over the service's defaults (`[users.<name>]`)."""

    model_config = ConfigDict(extra="forbid")

    allowed_roots: list[Path] | None = Field(
        default=None,
        description="Where this user's workspaces may lie ({user} is replaced by the name); "
        "unset: the service's allowed_roots.",
    )
    max_sessions: int | None = Field(
        default=None, ge=1, description="Live sessions at once; unset: max_sessions_per_user."
    )
    uid: int | None = Field(
        default=None,
        ge=0,
        description="The Unix uid whose workspaces this user may start sessions on; unset: the "
        "uid of the Unix account of the same name, if there is one.",
    )


def _default_roots() -> list[Path]:
    return [Path.home().resolve(), Path(tempfile.gettempdir()).resolve()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CODESTATION_", extra="forbid")

    runtime: Literal["auto", "docker", "bwrap", "kubernetes"] = Field(
        default="auto",
        description="Where sessions run: auto takes Docker when an engine answers, "
        "else bubblewrap; kubernetes is never taken unless named.",
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
    public_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#@]+/?$",
        description="Where people open codestation, e.g. https://codestation.example.com behind "
        "a TLS proxy: the login link, redirects and session host names use it. Unset: "
        "http://127.0.0.1:<port>.",
    )
    allowed_roots: list[Path] = Field(
        default_factory=_default_roots,
        description="Workspaces must lie inside one of these directories; {user} is replaced "
        "by the requesting user's name (e.g. /home/{user}).",
    )
    users: dict[str, UserProfile] = Field(
        default_factory=dict, description="Per-user settings, by codestation user name."
    )
    max_live_sessions: int = Field(
        default=100, ge=1, description="Live sessions at once, of everyone; more get 503."
    )
    memory_budget: str | None = Field(
        default=None,
        pattern=SIZE,
        description="Memory that live sessions' limits may add up to (e.g. 20g); a start that "
        "would pass it gets 503. Unset: the host's memory less memory_reserve.",
    )
    memory_reserve: str = Field(
        default="2g", pattern=SIZE, description="Memory kept for the host and the service."
    )
    max_sessions_per_user: int = Field(
        default=10, ge=1, description="Live sessions one user may have at once."
    )
    admin_any_owner: bool = Field(
        default=True,
        description="Admins may start sessions on workspaces owned by anyone, root included "
        "(the agent then runs as that owner); false holds admins to the owner rule too.",
    )
    token_file: Path = Field(
        default=Path("~/.config/codestation/token"),
        description="Where the CLI looks for a token when neither --token nor "
        "CODESTATION_TOKEN gives one (it must be mode 0600); `serve` writes the first admin "
        "token there.",
    )
    login_days: float = Field(
        default=7, gt=0, description="Days a browser login lasts (never beyond its token's)."
    )
    max_body_size: int = Field(
        default=1 << 20, ge=1024, description="Bytes a request body to the API may have (413)."
    )
    proxy_max_requests: int = Field(
        default=64,
        ge=1,
        description="Requests (event streams and terminals included) one session may have open "
        "through the proxy at once; more get 503, so no session can starve the others.",
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
    log_max_size: str = Field(
        default="10m",
        pattern=SIZE,
        description="Size a session's log may grow to; then its older half is dropped (Docker: "
        "the engine rotates at this size, keeping one file before).",
    )
    max_streams_per_user: int = Field(
        default=16, ge=1, description="Event streams and followed logs one user may hold open."
    )
    max_streams: int = Field(
        default=256, ge=1, description="Event streams and followed logs open at once, of everyone."
    )
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
    terminal_keep: float = Field(
        default=300,
        gt=0,
        description="Seconds a browser terminal lives on after its tab closed, for the tab to "
        "come back to; then it is ended.",
    )
    cull_interval: float = Field(
        default=30, gt=0, description="Seconds between checks for idle and old sessions."
    )
    stop_on_shutdown: bool = Field(
        default=False,
        description="Stop every session when the service stops; by default they keep running "
        "and are re-adopted at the next start.",
    )
    kubernetes_namespace: str = Field(
        default="codestation",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="The namespace the kubernetes runtime makes sessions' Pods and Secrets in.",
    )
    kubernetes_config: Path | None = Field(
        default=None,
        description="A kubeconfig for the kubernetes runtime; unset: the Pod's own service "
        "account inside a cluster, else $KUBECONFIG or ~/.kube/config.",
    )
    kubernetes_reach: Literal["auto", "pod", "port-forward"] = Field(
        default="auto",
        description="How codestation reaches a Kubernetes session's OpenCode: at the Pod's IP "
        "(pod: it runs in the cluster or on a node), through the API server's port-forward "
        "(port-forward: from anywhere the API server answers, slower), or the Pod's IP where "
        "this host routes to it, else port-forward (auto).",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="How `codestation serve` logs: text for people, or json (one object per "
        "line: time, level, logger, event, session, user; a request's client, method, path, "
        "status).",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        min_length=32,
        description="A token that may read GET /metrics and nothing else (a Prometheus "
        "scraper's, as `Authorization: Bearer ...`); unset: only admins' tokens may.",
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
        self.token_file = self.token_file.expanduser()
        self.allowed_roots = [p.expanduser() for p in self.allowed_roots]
        bad = [name for name in self.users if not USER_NAME.match(name)]
        if bad:
            raise ValueError(f"user names {bad} are not lowercase Unix names ({USER_NAME.pattern})")
        self.environments.setdefault("default", EnvironmentProfile())
        return self

    def user(self, name: str) -> UserProfile:
        return self.users.get(name) or UserProfile()

    def roots_for(self, user: str) -> list[Path]:
        """The directories `user`'s workspaces must lie in, resolved, {user} replaced."""
        roots = self.user(user).allowed_roots or self.allowed_roots
        return [Path(str(r).replace("{user}", user)).expanduser().resolve() for r in roots]

    def max_sessions(self, user: str) -> int:
        return self.user(user).max_sessions or self.max_sessions_per_user

    @property
    def reserved_dirs(self) -> list[Path]:
        """codestation's own directories: no workspace may hold one or lie inside one."""
        dirs = [
            self.data_dir, self.cache_dir, DEFAULT_CONFIG_FILE.expanduser().parent,
            self.token_file.parent, Path(sys.prefix), Path(sys.base_prefix),
            Path(sys.exec_prefix), Path(__file__).parent,  # the codestation package
        ]  # fmt: skip
        explicit = os.environ.get("CODESTATION_CONFIG")
        if explicit:
            dirs.append(Path(explicit).expanduser().parent)
        if self.opencode_binary is not None:
            dirs.append(self.opencode_binary.parent)
        return sorted({d.resolve() for d in dirs})

    @property
    def service_url(self) -> str:
        """The origin people reach the service at (no trailing slash)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """Host names the service answers to (besides sessions' `<id>.<proxy_domain>`)."""
        hosts = set(LOOPBACK_HOSTS)
        hosts.add((urlsplit(self.service_url).hostname or "").lower())
        if self.public_host:
            hosts.add(self.public_host.lower())
        if self.host not in ("0.0.0.0", "", "::"):
            hosts.add(self.host.lower())
        return frozenset(hosts)

    def web_url(self, session_id: str) -> str:
        """A session's OpenCode UI through codestation: its own host name, the service's port."""
        parts = urlsplit(self.service_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{session_id}.{self.proxy_domain}{port}/"

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
