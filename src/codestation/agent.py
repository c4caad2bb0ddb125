"""OpenCode, the agent every session runs: its binary, its command line, its environment, the
probe that says it is ready, and how its answers are read.

Whatever answers on a session's port is the agent's to write (it may have replaced OpenCode):
`ask` reads an answer bounded in size, time and shape, so no answer can exhaust the service's
memory, stall its loops or reach a handler as anything but JSON of sane depth and numbers.

The binary is the pinned `opencode-ai` release from npm, installed once per version under the
cache directory (`npm` must be on PATH), unless `opencode_binary` names one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from websockets.asyncio.client import connect

from codestation.config import EnvironmentProfile, Settings
from codestation.errors import AgentExited, RuntimeUnavailable, SecretMissing, StartTimeout
from codestation.workspaces import Workspace

USERNAME = "opencode"
# Where OpenCode listens inside a container; the runtime publishes it on the leased host port.
CONTAINER_PORT = 8080
WORKSPACE = "/workspace"
# Every request to an agent names its project: a sandbox started ahead of need (the warm
# pool) runs OpenCode from another directory, so its default project is not the workspace.
DIRECTORY = {"x-opencode-directory": WORKSPACE}
# Keep a session off the network for things it does not need: updates, model lists, sharing.
OFFLINE_ENV = {
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
}

_install_lock = threading.Lock()


# Run first, inside the sandbox: OpenCode starts only if /workspace, and each path pinned in it,
# is the very file that was checked (device and inode, `path=dev:ino` words in $0; or the
# inode alone, `path=ino`, where the sandbox's mount of the same file system has a device
# number of its own). Engines mount by path, and a path can be swapped for a symlink between
# codestation's check and the engine's mount; this check cannot be raced, since it looks at
# what is mounted, from where the agent will run.
_GUARD = (
    "for want in $0; do path=${want%=*}; case ${want#*=} in *:*) f=%d:%i;; *) f=%i;; esac; "
    'got=$(stat -c $f "$path"); '
    '[ "$path=$got" = "$want" ] || { echo "codestation: $path was replaced while the session '
    'started ($got, not ${want#*=}); start it again." >&2; exit 97; }; done; exec "$@"'
)


def serve_args(hostname: str, port: int, binary: str = "opencode") -> list[str]:
    """`opencode serve`. It takes no directory: it serves its working directory. Its log goes
    to stderr so that the session's `logs` show what it did."""
    return [binary, "serve", "--port", str(port), "--hostname", hostname, "--print-logs",
            "--log-level", "INFO"]  # fmt: skip


def serve_command(
    hostname: str,
    port: int,
    workspace: Workspace | None,
    binary: str = "opencode",
    *,
    inode_only: bool = False,
) -> list[str]:
    """A sandbox's command: the workspace guard, then `opencode serve`. A sandbox started
    without a workspace (the warm pool) has nothing to guard yet: its slot is checked when a
    workspace is mounted on it (`slots.py`). `inode_only`: the sandbox sees the workspace's
    file system under another device number (a network volume mounted on a node)."""
    if workspace is None:
        return serve_args(hostname, port, binary)
    identities = workspace.identities()
    if inode_only:
        identities = {path: ids.rsplit(":", 1)[1] for path, ids in identities.items()}
    pairs = " ".join(f"{path}={ids}" for path, ids in identities.items())
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
    if profile.catalog == "configured":  # the models `provider` lists, and no others
        env["OPENCODE_MODELS_PATH"] = f"{CONFIG_INSIDE}/{NO_CATALOG}"
    config = profile.agent_config()
    if config:
        env["OPENCODE_CONFIG_CONTENT"] = json.dumps(config)
    env.update({name: value.get_secret_value() for name, value in secrets.items()})
    env["OPENCODE_SERVER_USERNAME"] = USERNAME
    env["OPENCODE_SERVER_PASSWORD"] = password.get_secret_value()
    return env


ANSWER_LIMIT = 8 << 20  # bytes of one answer from an agent
_DEPTH_LIMIT = 64


class BadAnswer(ValueError):
    """An answer from an agent that is too large, too slow, or not sane JSON."""


async def ask(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    password: SecretStr,
    *,
    seconds: float | None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """The status and the JSON (None if empty) of one request to an agent, within `seconds`
    in all (None: no limit, for a turn that lasts as long as the model takes). httpx.HTTPError
    if it does not answer; BadAnswer if its answer is too large or not sane JSON."""

    async def read() -> tuple[int, bytes]:
        request = client.build_request(method, url, json=json_body,
                                       headers={**DIRECTORY, **(headers or {})},
                                       timeout=httpx.Timeout(30.0, read=seconds))  # fmt: skip
        response = await client.send(request, auth=basic(password), stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > ANSWER_LIMIT:
                    raise BadAnswer(f"an answer over {ANSWER_LIMIT >> 20} MiB")
            return response.status_code, bytes(body)
        finally:
            await response.aclose()

    try:
        status, body = await asyncio.wait_for(read(), seconds)
    except TimeoutError:
        raise BadAnswer(f"no whole answer within {seconds:g} s") from None
    return status, parse(body) if body.strip() else None


def parse(body: bytes) -> Any:
    """JSON from an agent: finite numbers, integers of sane length, nesting of sane depth."""

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise BadAnswer(f"a number out of range: {text[:20]}")
        return value

    def refuse(text: str) -> Any:
        raise BadAnswer(f"not a JSON number: {text}")

    try:
        found = json.loads(body, parse_float=finite, parse_constant=refuse)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers over 4,300 digits
        raise BadAnswer(f"not JSON: {str(exc)[:100]}") from None
    if _depth(found) > _DEPTH_LIMIT:
        raise BadAnswer(f"JSON nested deeper than {_DEPTH_LIMIT}")
    return found


def _depth(value: Any) -> int:
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        deepest = max(deepest, depth)
        if depth > _DEPTH_LIMIT:
            break
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        level.extend((child, depth + 1) for child in children)
    return deepest


def basic(password: SecretStr) -> tuple[str, str]:
    """OpenCode's HTTP Basic credentials, unwrapped for a request to it."""
    return (USERNAME, password.get_secret_value())


async def is_healthy(
    client: httpx.AsyncClient, url: str, password: SecretStr, seconds: float
) -> bool:
    """One probe of `/global/health`, its whole answer bounded by `seconds` and in size (a
    connect can hang on docker-proxy; whatever listens there may trickle)."""
    try:
        status, answer = await ask(client, "GET", f"{url}/global/health", password,
                                   seconds=seconds)  # fmt: skip
    except (httpx.HTTPError, BadAnswer):
        return False
    return status == 200 and isinstance(answer, dict) and bool(answer.get("healthy"))


PROBE_INTERVAL = 0.05  # seconds between readiness probes
PROBE_TIMEOUT = 1.0
# Probes open at once, at most: those that get no answer must not take every connection of
# the service's client, which all sessions' probes and polls share.
PROBES_AT_ONCE = 3
# Asking the runtime whether the agent has ended costs more (Docker: an inspect in the engine,
# whose CPU the booting agent needs): less often.
ENDED_INTERVAL = 0.2


async def wait_ready(
    client: httpx.AsyncClient,
    url: str,
    password: SecretStr,
    seconds: float,
    ended: Callable[[], Awaitable[str | None]],
) -> None:
    """Probe until OpenCode answers healthy. AgentExited if `ended()` says why it ended first;
    StartTimeout after `seconds`.

    Probes overlap: a new one each PROBE_INTERVAL, whether the last has answered or not, and
    the first healthy answer counts. A probe that reaches the port just as OpenCode starts to
    listen can go unanswered (behind pasta, one did so on every start, and held the session
    back by its whole timeout, about 0.6 s on average, while the next was answered at once).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    ask_ended = loop.time() + ENDED_INTERVAL
    probes: set[asyncio.Task[bool]] = set()
    try:
        while True:
            remaining = deadline - loop.time()
            timeout = max(0.05, min(PROBE_TIMEOUT, remaining))
            if len(probes) < PROBES_AT_ONCE:
                probes.add(asyncio.create_task(is_healthy(client, url, password, timeout)))
            next_probe = loop.time() + PROBE_INTERVAL
            while probes and (wait := next_probe - loop.time()) > 0:
                done, probes = await asyncio.wait(
                    probes, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                answers = [task.exception() or task.result() for task in done]
                if True in answers:
                    return
                for answer in answers:
                    if isinstance(answer, BaseException):
                        raise answer
            if loop.time() >= ask_ended or loop.time() >= deadline:
                ask_ended = loop.time() + ENDED_INTERVAL
                reason = await ended()
                if reason is not None:
                    raise AgentExited(f"OpenCode ended before it was ready: {reason}")
            if loop.time() >= deadline:
                raise StartTimeout(
                    f"OpenCode did not answer {url}/global/health within {seconds:g} s "
                    "(start_timeout)"
                )
            await asyncio.sleep(max(0.0, next_probe - loop.time()))
    finally:
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)


async def warm_up(client: httpx.AsyncClient, url: str, password: SecretStr) -> None:
    """Have a fresh OpenCode open a scratch project once, then drop it: the first project an
    OpenCode process opens costs some 0.3 s more than any later one (code it loads once), which
    a sandbox started ahead should pay before a start takes it, not after."""
    scratch = {"x-opencode-directory": "/tmp"}
    try:
        await ask(client, "GET", f"{url}/file?path=.", password, seconds=30, headers=scratch)
        await ask(client, "POST", f"{url}/instance/dispose", password, seconds=30, headers=scratch)
    except (httpx.HTTPError, BadAnswer):
        pass  # a warm-up only: the start that takes it pays the cost instead


async def is_busy(client: httpx.AsyncClient, url: str, password: SecretStr) -> bool | None:
    """Whether a session of the agent's OpenCode is working a turn now; None if it won't say."""
    try:
        _, statuses = await ask(client, "GET", f"{url}/session/status", password, seconds=2)
        return any(isinstance(s, dict) and s.get("type") != "idle" for s in statuses.values())
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


# The title of the PTYs codestation's browser terminals run in (`terminals.py`).
TERMINAL = "codestation:"


# OpenCode's terminal frames are 64 KiB at most (seen on 1.18.33); whatever answers on a
# session's port is the agent's to write, and a frame is held whole before it is passed on.
MAX_FRAME = 1 << 20


def websocket(url: str, password: SecretStr, headers: dict[str, str]) -> connect:
    """A WebSocket to the agent (`ws://...`), with its credentials and `headers`.

    Frames over MAX_FRAME end it (1009); at most two wait to be read. No keepalive pings: the
    agent is on this host, where a connection that ends is seen at once, while OpenCode whose
    output waits on a slow reader answers no ping until the reader catches up (seen: 40 s
    into a terminal printing a big file), and a ping timeout would cut that healthy stream.
    """
    token = base64.b64encode(":".join(basic(password)).encode()).decode()
    # Two frames waiting at most, uncompressed: the agent is on this host.
    return connect(url, additional_headers={"Authorization": f"Basic {token}", **headers},
                   max_size=MAX_FRAME, max_queue=2, compression=None,
                   ping_interval=None, proxy=None)  # fmt: skip


async def last_activity(
    client: httpx.AsyncClient, url: str, password: SecretStr
) -> datetime | None:
    """When the agent last did something, as OpenCode tells: now if a session of it is working
    or a shell of it runs, else the last change to any of its sessions. None if it won't say.

    codestation's own browser terminals are not counted: typing in one is activity (the API
    sees it), an open one left alone is not."""
    try:
        _, statuses = await ask(client, "GET", f"{url}/session/status", password, seconds=5)
        _, shells = await ask(client, "GET", f"{url}/pty", password, seconds=5)
        _, sessions = await ask(client, "GET", f"{url}/session", password, seconds=5)
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


# OpenCode's global configuration directory, as every sandbox sees it (HOME is /tmp there).
CONFIG_INSIDE = "/tmp/.config/opencode"
NO_CATALOG = "codestation-no-catalog.json"  # an empty models.dev catalog, there
_CONFIG_LAYOUT = 2
_PLUGIN = "@opencode-ai/plugin"


def opencode_config(settings: Settings) -> Path:
    """OpenCode's global configuration directory, made once per version with its plugin SDK
    installed, which sandboxes get read-only.

    Why: OpenCode installs `@opencode-ai/plugin` into its configuration directory (an npm
    install inside its own process) every time it loads a project. In a sandbox whose HOME is
    fresh, that is a download at every start, about 95 MB of its in-memory /tmp and some
    300 MB more of OpenCode's memory (measured on 1.18.33). Found in place, read-only and
    shared, there is nothing to download or write, and no session can change what another's
    OpenCode loads."""
    version = settings.opencode_version
    # Named by its layout: running sessions keep the one they mounted, whatever comes after.
    target = settings.cache_dir / "opencode" / version / f"config-{_CONFIG_LAYOUT}"
    with _install_lock:
        made = target / "opencode"
        if all(
            (made / name).is_file()
            for name in (f"node_modules/{_PLUGIN}/package.json", ".gitignore", NO_CATALOG)
        ):
            return made
        npm = _npm("install OpenCode's plugin SDK")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".config-"))
        try:
            made = tmp / "opencode"
            made.mkdir()
            # Each file as OpenCode writes it when it is missing: present, it writes nothing.
            (made / "package.json").write_text(
                json.dumps({"dependencies": {_PLUGIN: version}}, indent=2) + "\n"
            )
            (made / "opencode.jsonc").write_text(
                '{\n  "$schema": "https://opencode.ai/config.json"\n}'
            )
            (made / ".gitignore").write_text(
                "node_modules\npackage.json\npackage-lock.json\nbun.lock\n.gitignore"
            )
            (made / NO_CATALOG).write_text("{}\n")
            result = subprocess.run(
                [npm, "install", "--prefix", str(made), "--no-audit", "--no-fund",
                 "--ignore-scripts"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise RuntimeUnavailable(
                    f"installing {_PLUGIN}@{version} from npm failed; check that the npm "
                    f"registry is reachable. npm said: {result.stderr.strip()[-800:]}"
                )
            for path in [tmp, *tmp.rglob("*")]:  # every sandbox's user may read it
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "opencode"


def _npm(why: str) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeUnavailable(
            f"npm is needed to {why}; install Node.js and npm, "
            "or set opencode_binary to an OpenCode binary."
        )
    return npm


def _install(version: str, target: Path) -> None:
    npm = _npm("install OpenCode")
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
