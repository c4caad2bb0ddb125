"""The README's Python examples, run as written against a real service whose `local-llm`
environment uses the scripted model: only the workspace's path is put in."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Model, ServiceFactory

README = Path(__file__).parents[2] / "README.md"


def python_examples() -> list[str]:
    section = README.read_text().split("### Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readme_has_both_examples() -> None:
    examples = python_examples()
    assert len(examples) == 2
    assert "AsyncClient" in examples[1]


@pytest.mark.runtimes("bwrap")
@pytest.mark.parametrize("example", [0, 1])
def test_the_readme_s_python_examples_run(
    start_service: ServiceFactory, model: Model, workspace: Path, example: int
) -> None:
    service = start_service(
        environments=json.dumps({"local-llm": model.environment()}),
        env={model.env_var: model.key},
    )
    code = python_examples()[example].replace("/home/me/project", str(workspace))
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**service.env, "CODESTATION_URL": service.url, "CODESTATION_TOKEN": service.token},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    if example == 0:
        assert (workspace / "hello.txt").read_text() == "Hello from the agent"
        assert "Wrote hello.txt." in done.stdout
        assert "added hello.txt" in done.stdout
        assert "+Hello from the agent" in done.stdout
    else:
        assert (workspace / "notes.txt").read_text() == "streamed"
        assert "Wrote notes.txt." in done.stdout
        assert "True None" in done.stdout
    assert all(s.status == "stopped" for s in service.client.sessions())
