"""OpenCode's own clients, through codestation's port only: `opencode run --attach` (the pinned
binary, on the host, as a user on a stock machine would type it) and the npm SDK
(`@opencode-ai/sdk`, pinned in package.json). And the environment's secret: it reaches the
model's Authorization header and nowhere else a person or another program could read it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import docker
import pytest

from codestation import Settings
from codestation.agent import opencode_binary
from codestation.image import image_tag
from tests.e2e.conftest import Model, Service, ServiceFactory

REPO = Path(__file__).parents[2]


@pytest.fixture
def working(start_service: ServiceFactory, model: Model) -> Service:
    return start_service(
        environments=json.dumps({"agent": model.environment()}), env={model.env_var: model.key}
    )


def test_opencode_run_attach_completes_a_turn_through_codestation(
    working: Service, workspace: Path, tmp_path: Path
) -> None:
    session = working.client.start(str(workspace), "agent")
    assert session.opencode_url == f"{working.url}/api/v1/code/session/{session.id}/opencode"
    home = tmp_path / "cli-home"
    home.mkdir()
    done = subprocess.run(
        [str(opencode_binary(Settings())), "run", "--attach", session.opencode_url,
         "please write via-cli.txt: from opencode run"],
        env={"PATH": os.environ["PATH"], "HOME": str(home),
             "OPENCODE_SERVER_PASSWORD": working.token},
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (workspace / "via-cli.txt").read_text() == "from opencode run"
    # A wrong token gets nothing done.
    refused = subprocess.run(
        [str(opencode_binary(Settings())), "run", "--attach", session.opencode_url,
         "--password", "not-a-token", "please write nope.txt: no"],
        env={"PATH": os.environ["PATH"], "HOME": str(home)},
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert not (workspace / "nope.txt").exists(), refused.stdout + refused.stderr
    session.stop()


def test_the_npm_sdk_lists_sessions_and_prompts_through_codestation(
    working: Service, workspace: Path, tmp_path: Path
) -> None:
    session = working.client.start(str(workspace), "agent")
    script = tmp_path / "sdk.mjs"
    script.write_text(
        """
const { createOpencodeClient } = await import(process.env.SDK);
const client = createOpencodeClient({
  baseUrl: process.env.BASE_URL,
  headers: { Authorization: `Bearer ${process.env.TOKEN}` },
});
const made = await client.session.create({ body: { title: "from the sdk" } });
if (made.error) throw new Error(JSON.stringify(made.error));
const listed = await client.session.list();
const answer = await client.session.prompt({
  path: { id: made.data.id },
  body: { parts: [{ type: "text", text: "please write via-sdk.txt: from the sdk" }] },
});
if (answer.error) throw new Error(JSON.stringify(answer.error));
console.log(JSON.stringify({ ids: listed.data.map((s) => s.id), made: made.data.id }));
"""
    )
    done = subprocess.run(
        ["node", str(script)],
        env={**os.environ, "BASE_URL": session.opencode_url or "", "TOKEN": working.token,
             "SDK": (REPO / "node_modules/@opencode-ai/sdk/dist/index.js").as_uri()},
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["made"] in printed["ids"]
    assert (workspace / "via-sdk.txt").read_text() == "from the sdk"
    session.stop()


def test_the_secret_reaches_the_model_and_nowhere_else(
    working: Service, workspace: Path, model: Model, runtime: str
) -> None:
    session = working.client.start(str(workspace), "agent")
    session.prompt("please write secret-test.txt: nothing secret here")
    sent = [r for r in model.requests() if r["path"].endswith("/chat/completions")]
    assert sent, "OpenCode never called the model"
    assert {r["headers"].get("authorization") for r in sent} == {f"Bearer {model.key}"}

    http = working.http()
    answers = [
        http.get(path).text
        for path in ("/api/v1/code/sessions", f"/api/v1/code/session/{session.id}",
                     "/api/v1/code/environments", "/healthz", "/", "/static/app.js",
                     f"/api/v1/code/session/{session.id}/logs?tail=10000",
                     f"/api/v1/code/session/{session.id}/changes")
    ]  # fmt: skip
    config = working.cli("config")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    places = {"API answers": "\n".join(answers), "codestation config": config.stdout +
              config.stderr, "ps": ps, "the service's log": working.log.read_text()}  # fmt: skip
    if runtime == "docker":
        image = docker.from_env().images.get(image_tag(Settings()))
        places["docker inspect of the image"] = json.dumps(image.attrs)
        places["the image's history"] = json.dumps(image.history())
    for place, text in places.items():
        assert model.key not in text, f"the secret shows in {place}"
    session.stop()
    time.sleep(0.5)
    assert model.key not in working.log.read_text()


def test_a_missing_secret_fails_the_start_naming_it(
    start_service: ServiceFactory, model: Model, workspace: Path
) -> None:
    service = start_service(environments=json.dumps({"agent": model.environment()}))
    answer = service.http().post(
        "/api/v1/code/start", json={"workspace": str(workspace), "environment": "agent"}
    )
    assert answer.status_code == 503, answer.text
    assert answer.json()["code"] == "secret_missing"
    assert model.env_var in answer.json()["error"]
    assert "MODEL_KEY" in answer.json()["error"]
    assert service.client.sessions() == []
    assert service.leftovers() == []


def test_opencode_attach_works_a_prompt_through_codestation(
    working: Service, workspace: Path, tmp_path: Path
) -> None:
    """OpenCode's TUI, on a terminal of its own (`script` gives it one), attached through
    codestation's address with a token: a prompt typed into it gets done."""
    session = working.client.start(str(workspace), "agent")
    home = tmp_path / "tui-home"
    home.mkdir()
    command = shlex.join([str(opencode_binary(Settings())), "attach", session.opencode_url or "",
                          "--dir", "/workspace"])  # fmt: skip
    tui = subprocess.Popen(
        ["script", "-qfec", command, "/dev/null"],
        env={"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "xterm-256color",
             "COLUMNS": "120", "LINES": "40", "OPENCODE_SERVER_PASSWORD": working.token},
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert tui.stdin is not None
    try:
        written = workspace / "via-tui.txt"
        deadline = time.monotonic() + 90
        typed = time.monotonic() - 22  # the first try after 8 s, when the TUI has drawn
        while not written.exists():
            assert tui.poll() is None, "the TUI ended"
            assert time.monotonic() < deadline, "the prompt typed into the TUI never got done"
            if time.monotonic() - typed > 30:  # again, on a clean line, if it was not up yet
                tui.stdin.write(b"\x15please write via-tui.txt: from the tui")
                tui.stdin.flush()
                time.sleep(0.5)
                tui.stdin.write(b"\r")
                tui.stdin.flush()
                typed = time.monotonic()
            time.sleep(0.5)
        assert written.read_text() == "from the tui"
    finally:
        tui.kill()
        tui.wait(10)
    session.stop()
