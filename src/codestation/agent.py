"""OpenCode, the agent every session runs: its binary, its command line, its environment and
the probe that says it is ready.

The binary is the pinned `opencode-ai` release from npm, installed once per version under the
cache directory (`npm` must be on PATH), unless `opencode_binary` names one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import SecretStr

from codestation.config import EnvironmentProfile, Settings
from codestation.errors import RuntimeUnavailable, SecretMissing
from codestation.workspaces import Workspace

USERNAME = "opencode"
# Where OpenCode listens inside a container; the runtime publishes it on the leased host port.
CONTAINER_PORT = 8080
# Keep a session off the network for things it does not need: updates, model lists, sharing.
OFFLINE_ENV = {
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
}

_install_lock = threading.Lock()


# Run first, inside the sandbox: OpenCode starts only if /workspace, and each path pinned in it,
# is the very file that was checked (device and inode; `path=dev:ino` words in $0). Engines
# mount by path, and a path can be swapped for a symlink between codestation's check and the
# engine's mount; this check cannot be raced, since it looks at what is mounted, from where
# the agent will run.
_GUARD = (
    'for want in $0; do path=${want%=*}; got=$(stat -c %d:%i "$path"); '
    '[ "$path=$got" = "$want" ] || { echo "codestation: $path was replaced while the session '
    'started ($got, not ${want#*=}); start it again." >&2; exit 97; }; done; exec "$@"'
)


def serve_args(hostname: str, port: int, binary: str = "opencode") -> list[str]:
    """`opencode serve`. It takes no directory: it serves its working directory. Its log goes
    to stderr so that the session's `logs` show what it did."""
    return [binary, "serve", "--port", str(port), "--hostname", hostname, "--print-logs",
            "--log-level", "INFO"]  # fmt: skip


def serve_command(
    hostname: str, port: int, workspace: Workspace, binary: str = "opencode"
) -> list[str]:
    """A sandbox's command: the workspace guard, then `opencode serve`."""
    pairs = " ".join(f"{path}={ids}" for path, ids in workspace.identities().items())
    guard = ["sh", "-c", _GUARD, pairs]
    return [*guard, *serve_args(hostname, port, binary)]


def secret_values(profile: EnvironmentProfile, environment: str) -> dict[str, SecretStr]:
    """The values of the environment's secrets, read now; SecretMissing names any not set."""
    found = {name: ref.value() for name, ref in profile.secrets.items()}
    missing = [f"{name} (from {profile.secrets[name]})" for name, v in found.items() if v is None]
    if missing:
        raise SecretMissing(
            f"environment {environment!r} needs the secret {', '.join(missing)}, which is unset "
            "or empty where codestation runs; set it (a variable in codestation's environment, "
            "then restart it; a file is read at every start), or fix the environment's secrets."
        )
    return {name: v for name, v in found.items() if v is not None}


def agent_env(
    password: SecretStr, profile: EnvironmentProfile, secrets: dict[str, SecretStr]
) -> dict[str, str]:
    """The environment OpenCode runs with. The profile cannot override the credentials.
    Secrets are unwrapped here, where they leave for the sandbox, and nowhere else."""
    env = {**OFFLINE_ENV, **profile.env}
    config = profile.agent_config()
    if config:
        env["OPENCODE_CONFIG_CONTENT"] = json.dumps(config)
    env.update({name: value.get_secret_value() for name, value in secrets.items()})
    env["OPENCODE_SERVER_USERNAME"] = USERNAME
    env["OPENCODE_SERVER_PASSWORD"] = password.get_secret_value()
    return env


def basic(password: SecretStr) -> tuple[str, str]:
    """OpenCode's HTTP Basic credentials, unwrapped for a request to it."""
    return (USERNAME, password.get_secret_value())


async def is_healthy(
    client: httpx.AsyncClient, url: str, password: SecretStr, seconds: float
) -> bool:
    """One probe of `/global/health`, bounded by `seconds` (a connect can hang on docker-proxy)."""
    try:
        response = await client.get(f"{url}/global/health", auth=basic(password), timeout=seconds)
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    try:
        return bool(response.json().get("healthy"))
    except (ValueError, AttributeError):  # not JSON, or not an object
        return False


async def is_busy(client: httpx.AsyncClient, url: str, password: SecretStr) -> bool | None:
    """Whether a session of the agent's OpenCode is working a turn now; None if it won't say."""
    try:
        statuses = (
            await client.get(f"{url}/session/status", auth=basic(password), timeout=2)
        ).json()
        return any(isinstance(s, dict) and s.get("type") != "idle" for s in statuses.values())
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


# The title of the PTYs codestation's browser terminals run in (`terminals.py`).
TERMINAL = "codestation:"


async def last_activity(
    client: httpx.AsyncClient, url: str, password: SecretStr
) -> datetime | None:
    """When the agent last did something, as OpenCode tells: now if a session of it is working
    or a shell of it runs, else the last change to any of its sessions. None if it won't say.

    codestation's own browser terminals are not counted: typing in one is activity (the API
    sees it), an open one left alone is not."""
    auth = basic(password)
    try:
        statuses = (await client.get(f"{url}/session/status", auth=auth, timeout=5)).json()
        shells = (await client.get(f"{url}/pty", auth=auth, timeout=5)).json()
        sessions = (await client.get(f"{url}/session", auth=auth, timeout=5)).json()
    except (httpx.HTTPError, ValueError):
        return None
    # The agent can answer anything here (it may have replaced OpenCode): an answer of
    # another shape says nothing, and must not break the cull round.
    try:
        busy = any(s.get("type") != "idle" for s in statuses.values()) or any(
            p.get("status") == "running" and not str(p.get("title", "")).startswith(TERMINAL)
            for p in shells
        )
        if busy:
            return datetime.now(UTC)
        updated = [
            float(s["time"]["updated"]) for s in sessions if s.get("time", {}).get("updated")
        ]
        return datetime.fromtimestamp(max(updated) / 1000, UTC) if updated else None
    except (AttributeError, TypeError, KeyError, ValueError, OverflowError, OSError):
        return None


def _npm_platform_package() -> str:
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    if arch is None or platform.system() != "Linux":
        raise RuntimeUnavailable(
            f"no OpenCode build for {platform.system()} {platform.machine()}; "
            "set opencode_binary to an OpenCode binary for this machine."
        )
    return f"opencode-linux-{arch}"


def opencode_binary(settings: Settings) -> Path:
    """The OpenCode binary sessions run, installing the pinned version from npm on first need."""
    if settings.opencode_binary is not None:
        if not os.access(settings.opencode_binary, os.X_OK):
            raise RuntimeUnavailable(
                f"opencode_binary {settings.opencode_binary} is not an executable file."
            )
        return settings.opencode_binary
    version = settings.opencode_version
    target = settings.cache_dir / "opencode" / version / "opencode"
    with _install_lock:
        if target.is_file():
            return target
        _install(version, target)
    return target


def _install(version: str, target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeUnavailable(
            "npm is needed to install OpenCode; install Node.js and npm, "
            "or set opencode_binary to an OpenCode binary."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".install-") as tmp:
        result = subprocess.run(
            [npm, "install", "--prefix", tmp, "--no-save", "--no-package-lock", "--no-audit",
             "--no-fund", "--ignore-scripts", f"opencode-ai@{version}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        built = Path(tmp) / "node_modules" / _npm_platform_package() / "bin" / "opencode"
        if result.returncode != 0 or not built.is_file():
            raise RuntimeUnavailable(
                f"installing opencode-ai@{version} from npm failed; check that the npm registry "
                f"is reachable. npm said: {result.stderr.strip()[-800:]}"
            )
        built.chmod(0o755)
        # Rename within one file system, so a concurrent reader never sees half a binary.
        os.replace(built, target)
