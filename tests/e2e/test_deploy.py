"""The two deployments the README shows, as their users would set them up, on this host's
Docker engine:

- the systemd unit (deploy/systemd), installed by its install.sh on a Debian host booted with
  systemd: a container here, sharing this host's network, engine socket and the paths the
  engine mounts from (a host's own files are the engine's files). The service runs as its own
  user, hardened, and starts sessions, which survive a restart of the unit.
- codestation's image (deploy/Dockerfile, scripts/image.sh) driving this host's engine through
  its socket, run with the README's `docker run` arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import httpx
import pytest

from codestation import Client, Status
from codestation.config import Settings
from codestation.image import FALLBACK_BASE
from codestation.runtimes.docker import LABEL_DATA_DIR
from tests.e2e.conftest import free_port, free_range

ROOT = Path(__file__).resolve().parents[2]
# Where the unit keeps its state and cache (its StateDirectory and CacheDirectory): the engine
# mounts from there, so they are these paths on this host too.
STATE, CACHE = Path("/var/lib/codestation"), Path("/var/cache/codestation")
OWNER = 1000  # a workspace's owner, a person on the host
DEBIAN = "debian:bookworm-slim"

# A Debian host that boots systemd, in a container: the engine's group as its package makes it,
# systemd's units that would change the host's kernel (shared with this one) masked, and the
# container's own cgroups (a private cgroup namespace) made writable for systemd.
SYSTEMD_HOST = """\
ARG BASE
FROM ${BASE}
ARG DOCKER_GID
RUN groupadd --system --gid ${DOCKER_GID} docker
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd \\
    systemd-sysv python3 python3-venv iptables ca-certificates sudo \\
 && rm -rf /var/lib/apt/lists/*
RUN systemctl mask systemd-sysctl.service systemd-binfmt.service systemd-modules-load.service \\
    systemd-udevd.service systemd-logind.service systemd-firstboot.service getty.target \\
    console-getty.service systemd-timesyncd.service
RUN printf '#!/bin/sh\\nfor d in /sys/fs/cgroup /sys/fs/cgroup/*/; do mount -o remount,rw "$d" \\
    2>/dev/null; done\\nexec /sbin/init\\n' > /boot.sh && chmod +x /boot.sh
STOPSIGNAL SIGRTMIN+3
CMD ["/boot.sh"]
"""


def base_image(engine: docker.DockerClient) -> str:
    """Debian's image where the engine has or can pull it, else the one codestation makes (as
    the sandbox image's build does)."""
    try:
        engine.images.get(DEBIAN)
    except docker.errors.ImageNotFound:
        try:
            engine.images.pull(DEBIAN)
        except docker.errors.APIError:
            return FALLBACK_BASE
    return DEBIAN


def run(*argv: str | Path, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_healthy(url: str, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the service did not answer at {url} in 90 s:\n{why()}")


def workspace_of_a_person(root: Path) -> Path:
    """A project in a home only its owner may enter (mode 0700), as people's are."""
    home = root / "alice"
    project = home / "project"
    project.mkdir(parents=True)
    (project / "README.md").write_text("hello\n")
    for path in (home, project, project / "README.md"):
        os.chown(path, OWNER, OWNER)
    home.chmod(0o700)
    return project


def prepared_cache(target: Path) -> None:
    """`codestation prepare` with this cache directory, as the README says to run once on the
    host: the pinned OpenCode and its configuration, and the sandbox image in the engine."""
    env = {**os.environ, "CODESTATION_CACHE_DIR": str(target), "CODESTATION_RUNTIME": "docker"}
    env.pop("CODESTATION_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "codestation.cli", "prepare"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "docker: ready" in done.stderr, done.stderr


def session_works(client: Client, workspace: Path) -> str:
    """Start a session on `workspace`, see it run and read its changes; returns its id."""
    started = client.start(str(workspace), wait=False)
    session = client.wait(started.id, timeout=180)
    assert session.status is Status.RUNNING, (session.error, client.logs(started.id))
    # What the agent changed: the service reads it in the workspace, behind a 0700 home.
    assert session.changes().files == []
    return started.id


def engine_containers(engine: docker.DockerClient, data_dir: Path) -> list[str]:
    found = engine.containers.list(all=True, filters={"label": f"{LABEL_DATA_DIR}={data_dir}"})
    return [str(c.name) for c in found]


@pytest.fixture
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """codestation's wheel and its dependencies' (what pip would fetch from the index)."""
    out = tmp_path_factory.mktemp("wheels")
    run(sys.executable, "-m", "build", "-q", "--wheel", "--outdir", out, ROOT, timeout=900)
    [wheel] = out.glob("codestation-*.whl")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", out, wheel, timeout=900)
    return out


@pytest.fixture
def systemd_host(
    engine: docker.DockerClient, tmp_path: Path, wheels: Path
) -> Iterator[tuple[str, Path]]:
    """A booted systemd host sharing this one's network, engine and paths; its name and the
    root its workspaces lie under."""
    for path in (STATE, CACHE):
        assert not path.exists(), f"{path} exists on this host: the test needs it to itself"
    context = tmp_path / "host"
    context.mkdir()
    (context / "Dockerfile").write_text(SYSTEMD_HOST)
    gid = os.stat("/var/run/docker.sock").st_gid
    image = f"codestation-test-systemd-host:{gid}"
    engine.images.build(
        path=str(context),
        tag=image,
        buildargs={"BASE": base_image(engine), "DOCKER_GID": str(gid)},
        rm=True,
    )
    root = Path(f"/srv/codestation-deploy-{uuid.uuid4().hex[:8]}")
    root.mkdir(parents=True)
    name = f"codestation-test-systemd-{root.name[-8:]}"
    try:
        STATE.mkdir(parents=True)
        CACHE.mkdir(parents=True)
        mounts = [
            "/var/run/docker.sock:/run/docker.sock",
            f"{STATE}:{STATE}",
            f"{CACHE}:{CACHE}",
            f"{root}:{root}",
            f"{wheels}:/wheels:ro",
            f"{ROOT / 'deploy'}:/deploy:ro",
        ]
        run(
            "docker", "run", "-d", "--name", name, "--network", "host", "--cgroupns", "private",
            "--tmpfs", "/run", "--tmpfs", "/run/lock",
            # What systemd needs to sandbox its units, and what the unit grants codestation.
            "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
            "--cap-add", "DAC_READ_SEARCH",
            "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
            *(arg for mount in mounts for arg in ("-v", mount)),
            image,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["docker", "exec", name, "systemctl", "is-system-running"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        assert state == "running", (state, run("docker", "exec", name, "systemctl", "--failed"))
        yield name, root
    finally:
        subprocess.run(["docker", "exec", name, "systemctl", "stop", "codestation"], check=False)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        for container in engine.containers.list(
            all=True, filters={"label": f"{LABEL_DATA_DIR}={STATE}"}
        ):
            container.remove(force=True)
        for path in (STATE, CACHE, root):
            shutil.rmtree(path, ignore_errors=True)


def test_the_systemd_unit_serves_as_its_own_hardened_user_and_its_sessions_survive_a_restart(
    systemd_host: tuple[str, Path], engine: docker.DockerClient
) -> None:
    host, root = systemd_host
    workspace = workspace_of_a_person(root)
    run("docker", "exec", host, "useradd", "--uid", str(OWNER), "--no-create-home", "alice")

    def on_host(*argv: str) -> str:
        return run("docker", "exec", host, *argv)

    def journal() -> str:
        return on_host("journalctl", "-u", "codestation", "--no-pager", "-n", "200")

    # The README's steps: install, configure, prepare as the service's user, start.
    on_host("sh", "/deploy/systemd/install.sh", "--no-index", "--find-links", "/wheels",
            "codestation")  # fmt: skip
    uid = int(on_host("id", "-u", "codestation"))
    assert uid != 0
    # Made by the installer as the unit would, so `prepare` can run before the first start.
    for own in (STATE, CACHE):
        assert own.stat().st_uid == uid
        assert stat.S_IMODE(own.stat().st_mode) == 0o700
    assert on_host("stat", "-c", "%a %U:%G", "/etc/codestation/config.toml").split() == [
        "640",
        "root:codestation",
    ]
    shipped = (ROOT / "deploy/systemd/config.toml").read_text()
    roots = 'allowed_roots = ["/home/{user}"]'
    assert roots in shipped
    port, (first, last) = free_port(), free_range(10)
    config = shipped.replace(roots, f'allowed_roots = ["{root}/{{user}}"]') + (
        f"port = {port}\nport_range_start = {first}\nport_range_end = {last}\n"
    )
    subprocess.run(
        ["docker", "exec", "-i", host, "sh", "-c", "cat > /etc/codestation/config.toml"],
        input=config,
        text=True,
        check=True,
    )
    as_service = ["docker", "exec", host, "sudo", "-u", "codestation", "env",
                  "CODESTATION_CONFIG=/etc/codestation/config.toml",
                  "/opt/codestation/bin/codestation"]  # fmt: skip
    prepared = subprocess.run([*as_service, "prepare"], capture_output=True, text=True)
    # Nothing to fetch: an empty cache is filled with npm, which this host has not.
    assert prepared.returncode != 0
    assert "npm" in prepared.stderr, prepared.stderr
    shutil.copytree(Settings().cache_dir / "opencode", CACHE / "opencode", symlinks=True)
    on_host("chown", "-R", "codestation:codestation", str(CACHE))
    prepared = subprocess.run([*as_service, "prepare"], capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    assert "docker: ready" in prepared.stderr, prepared.stderr
    on_host("systemctl", "enable", "--now", "codestation")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, journal)

    # Its own user, the capabilities the unit names and no others, its directories its own.
    pid = on_host("systemctl", "show", "-p", "MainPID", "--value", "codestation").strip()
    status = on_host("cat", f"/proc/{pid}/status")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["Uid"].split()[0]) == uid
    # CAP_DAC_READ_SEARCH (2), CAP_NET_ADMIN (12), CAP_NET_RAW (13), and nothing else.
    assert int(fields["CapEff"], 16) == (1 << 2) | (1 << 12) | (1 << 13)
    assert fields["NoNewPrivs"].strip() == "1"
    token_file = STATE / "token"
    for own in (STATE, token_file):
        assert own.stat().st_uid == uid
        assert own.stat().st_mode & 0o077 == 0, oct(own.stat().st_mode)
    # The journal is more people's than root's: no login link in it, only how to make one.
    assert "/login?token=" not in journal()
    assert "codestation token link" in journal()
    [admin] = json.loads(run(*as_service, "token", "list", "--json"))
    assert "/login?token=csl_" in run(*as_service, "token", "link", admin["id"])
    doctor = subprocess.run([*as_service, "doctor"], capture_output=True, text=True)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok  cache directory" in doctor.stdout, doctor.stdout
    # systemd's own reading of the unit's exposure (0 is locked down, 10 is wide open).
    analysis = on_host("systemd-analyze", "security", "--no-pager", "codestation.service")
    overall = analysis.strip().splitlines()[-1]
    assert float(overall.split(":")[1].split()[0]) <= 2.2, analysis

    # A token for the person whose workspace it is, made as the README says.
    alice = run(*as_service, "token", "create", "--user", "alice").strip()
    client = Client(url, timeout=120, token=alice)
    try:
        session_id = session_works(client, workspace)
        on_host("systemctl", "restart", "codestation")
        wait_healthy(url, journal)
        session = client.get(session_id)
        assert session.status is Status.RUNNING
        assert session.changes().files == []
        client.stop(session_id)
        assert engine_containers(engine, STATE) == []
    finally:
        client.close()
    # The workspace is the person's still, as it was.
    assert (workspace / "README.md").read_text() == "hello\n"
    assert workspace.stat().st_uid == OWNER


def test_the_image_drives_the_hosts_docker_engine(
    engine: docker.DockerClient, tmp_path: Path
) -> None:
    image = run("bash", ROOT / "scripts/image.sh", timeout=1800).strip().splitlines()[-1]
    data, cache, work = tmp_path / "data", tmp_path / "cache", tmp_path / "work"
    data.mkdir()
    workspace = workspace_of_a_person(work)
    prepared_cache(cache)
    port, (first, last) = free_port(), free_range(10)
    name = f"codestation-test-image-{uuid.uuid4().hex[:8]}"
    # The README's command, with this test's paths and ports.
    settings = {
        "RUNTIME": "docker",
        "DATA_DIR": str(data),
        "CACHE_DIR": str(cache),
        "TOKEN_FILE": str(data / "token"),
        "ALLOWED_ROOTS": f'["{work}/{{user}}"]',
        # The host's people are not in the image's /etc/passwd: each is mapped to a uid.
        "USERS": f'{{"alice": {{"uid": {OWNER}}}}}',
        "PORT": str(port),
        "PORT_RANGE_START": str(first),
        "PORT_RANGE_END": str(last),
    }
    run(
        "docker", "run", "-d", "--name", name, "--network", "host",
        "--user", "0", "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW",
        "--cap-add", "DAC_READ_SEARCH", "--security-opt", "no-new-privileges",
        "--read-only", "--tmpfs", "/tmp",
        "-v", "/var/run/docker.sock:/var/run/docker.sock",
        *(arg for path in (data, cache) for arg in ("-v", f"{path}:{path}")),
        "-v", f"{work}:{work}:ro",
        *(arg for key, value in settings.items() for arg in ("-e", f"CODESTATION_{key}={value}")),
        image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def logs() -> str:
        return run("docker", "logs", name)

    try:
        wait_healthy(url, logs)
        doctor = subprocess.run(
            ["docker", "exec", name, "codestation", "doctor"], capture_output=True, text=True
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        alice = run("docker", "exec", name, "codestation", "token", "create", "--user", "alice")
        client = Client(url, timeout=120, token=alice.strip())
        try:
            session_id = session_works(client, workspace)
            client.stop(session_id)
        finally:
            client.close()
        assert engine_containers(engine, data) == []
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        for container in engine.containers.list(
            all=True, filters={"label": f"{LABEL_DATA_DIR}={data}"}
        ):
            container.remove(force=True)
    assert (workspace / "README.md").read_text() == "hello\n"
