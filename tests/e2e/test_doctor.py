"""`codestation doctor` on this host: all well here, and each thing broken on purpose is named
with its fix, exit status 1, since no session could start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def doctor(
    tmp_path: Path, env: dict[str, str] | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    """`codestation doctor` with these settings (and more of the environment in `env`)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CODESTATION_")},
        "CODESTATION_DATA_DIR": str(tmp_path / "data"),
        "COLUMNS": "200",
        **{f"CODESTATION_{k.upper()}": v for k, v in settings.items()},
        **(env or {}),
    }
    return subprocess.run([sys.executable, "-m", "codestation.cli", "doctor"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_this_host_can_start_sessions(tmp_path: Path) -> None:
    said = doctor(tmp_path)
    assert said.returncode == 0, said.stdout + said.stderr
    for name in ("runtime docker", "runtime bwrap", "sessions run in", "user namespaces",
                 "cgroups", "data directory", "cache directory", "ports", "OpenCode",
                 "sandbox image"):  # fmt: skip
        assert name in said.stdout, name
    assert " no " not in said.stdout
    assert "A session can start here." in said.stdout


def test_an_engine_that_does_not_answer_is_named_with_its_fix(tmp_path: Path) -> None:
    nowhere = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    said = doctor(tmp_path, env=nowhere, runtime="docker")
    assert said.returncode == 1, said.stdout
    assert "runtime docker" in said.stdout
    assert "No session can start here" in said.stdout
    assert "fix:" in said.stdout


def test_a_data_directory_that_is_a_file_or_open_to_others_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    said = doctor(tmp_path)
    assert said.returncode == 1
    assert "data directory" in said.stdout
    assert "set data_dir" in said.stdout

    (tmp_path / "data").unlink()
    (tmp_path / "data").mkdir(mode=0o755)
    (tmp_path / "data").chmod(0o755)
    said = doctor(tmp_path)
    assert said.returncode == 1
    assert "chmod 700" in said.stdout


def test_a_port_range_all_held_is_named(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        start = held.getsockname()[1]
        said = doctor(tmp_path, port_range_start=str(start), port_range_end=str(start))
    assert said.returncode == 1
    assert f"0 of 1 free in {start}-{start}" in said.stdout


def test_a_cache_others_may_write_is_named(tmp_path: Path) -> None:
    """What the cache holds runs in every sandbox: OpenCode and its configuration's plugins."""
    cache = tmp_path / "cache"
    plugins = cache / "opencode" / "1.0.0" / "config-2" / "opencode" / "node_modules"
    plugins.mkdir(parents=True)
    (plugins / "index.js").write_text("// a plugin\n")
    (plugins / "index.js").chmod(0o664)
    said = doctor(tmp_path, cache_dir=str(cache), opencode_version="1.0.0")
    text = " ".join(said.stdout.split())  # long paths wrap
    assert "cache directory" in text
    assert f"{plugins / 'index.js'} belongs to uid {os.geteuid()}, mode 664" in text
    assert f"chmod -R go-w {cache}" in text

    (plugins / "index.js").chmod(0o644)
    os.chown(plugins, 4242, 4242)
    said = doctor(tmp_path, cache_dir=str(cache), opencode_version="1.0.0")
    assert f"{plugins} belongs to uid 4242" in " ".join(said.stdout.split())

    os.chown(plugins, os.geteuid(), os.getegid())
    said = doctor(tmp_path, cache_dir=str(cache), opencode_version="1.0.0")
    assert "cache directory" in said.stdout
    assert "only its owner and root write it" in said.stdout
