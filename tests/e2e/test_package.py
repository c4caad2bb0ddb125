"""codestation as people install it: the sdist and wheel `python -m build` makes of this
checkout, the wheel installed into a fresh virtual environment outside the checkout, then that
installation's `codestation` serving: a session starts, and its terminal page loads its
scripts (xterm.js, which the wheel carries) in a real browser and reaches a shell.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from codestation import Status
from tests.e2e.browser import log_in
from tests.e2e.conftest import ServiceFactory

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# What the page's xterm.js shows, as text.
SCREEN = """() => { const b = window.codestationTerminal.buffer.active; const out = [];
  for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
  return out.join("\\n"); }"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh virtual environment with the wheel installed."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    [wheel] = dist.glob("*.whl")
    subprocess.run(
        [venv / "bin" / "pip", "install", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return venv / "bin"


def test_the_wheel_holds_the_web_ui_and_the_sdist_what_builds_it(dist: Path) -> None:
    [wheel] = dist.glob(f"codestation-{VERSION}-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "codestation/web/terminal.html",
        "codestation/web/vendor/@xterm/xterm/lib/xterm.js",
        "codestation/web/vendor/@xterm/xterm/css/xterm.css",
        "codestation/web/vendor/@xterm/xterm/LICENSE",
        "codestation/web/vendor/@xterm/addon-fit/lib/addon-fit.js",
        "codestation/web/vendor/swagger-ui-dist/swagger-ui-bundle.js",
    ):
        assert needed in names, needed
    assert not [n for n in names if "node_modules" in n or "/.vendor" in n]
    [sdist] = dist.glob(f"codestation-{VERSION}.tar.gz")
    with tarfile.open(sdist) as archive:
        inside = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"hatch_build.py", "package.json", "package-lock.json", "CHANGELOG.md"} <= inside
    assert not [n for n in inside if n.startswith(("node_modules", "tests/", ".venv"))]


def test_the_installed_command_says_its_version_from_its_own_files(
    installed: Path, tmp_path: Path
) -> None:
    said = subprocess.run(
        [installed / "codestation", "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip() == f"codestation {VERSION}"
    where = subprocess.run(
        [installed / "python", "-c", "import codestation; print(codestation.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout


def test_the_installed_service_starts_a_session_and_its_terminal_reaches_a_shell(
    installed: Path, launch_service: ServiceFactory, workspace: Path, page: Page
) -> None:
    service = launch_service(runtime="bwrap", command=[str(installed / "codestation"), "serve"])
    (workspace / "made-on-host.txt").write_text("hello\n")
    session = service.client.wait(service.client.start(str(workspace), wait=False).id)
    assert session.status is Status.RUNNING, session.error

    log_in(page, service)
    scripts: list[str] = []
    page.on("response", lambda r: scripts.append(f"{r.status} {r.url}"))
    page.goto(f"{service.url}/terminal/{session.id}?mode=shell")
    expect(page.locator("#state")).to_have_text("connected")
    assert f"200 {service.url}/static/vendor/@xterm/xterm/lib/xterm.js" in scripts, scripts
    assert f"200 {service.url}/static/vendor/@xterm/addon-fit/lib/addon-fit.js" in scripts
    page.locator("#terminal").click()
    page.keyboard.type("ls /workspace\n")
    deadline = time.monotonic() + 20
    while "made-on-host.txt" not in (screen := str(page.evaluate(SCREEN))):
        assert time.monotonic() < deadline, f"no listing on screen:\n{screen}"
        page.wait_for_timeout(200)
    service.client.stop(session.id)
