"""The wheel's web UI front-end files: xterm.js, its fit addon and Swagger UI, taken from npm
(package.json, package-lock.json) when the wheel is built and placed in the package as
`codestation/web/vendor`, with their licences. Never committed: a source checkout serves
them from its node_modules (`codestation.api.web`).

Uses the checkout's node_modules when `npm ci` made it from the same lock file, else runs
`npm ci` in a directory of its own (npm and its registry are needed then).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# What the pages load (codestation/web/*.html), and each package's licence.
VENDOR = {
    "@xterm/xterm": ["lib/xterm.js", "css/xterm.css", "LICENSE"],
    "@xterm/addon-fit": ["lib/addon-fit.js", "LICENSE"],
    "swagger-ui-dist": [
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-bundle.js.LICENSE.txt",
        "LICENSE",
        "NOTICE",
    ],
}


class VendorHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        staged = self._staged = Path(tempfile.mkdtemp(prefix="codestation-vendor-"))
        with tempfile.TemporaryDirectory(prefix="codestation-npm-") as scratch:
            modules = _node_modules(root, Path(scratch))
            for package, files in VENDOR.items():
                for name in files:
                    source = modules / package / name
                    if not source.is_file():
                        raise RuntimeError(f"{source} is missing: is package-lock.json current?")
                    target = staged / package / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
        build_data["force_include"][str(staged)] = "codestation/web/vendor"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        staged = getattr(self, "_staged", None)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)


def _node_modules(root: Path, scratch: Path) -> Path:
    """node_modules installed from root's lock file: the checkout's if it matches, else new."""
    lock = json.loads((root / "package-lock.json").read_text())
    installed = root / "node_modules" / ".package-lock.json"
    if installed.is_file() and _same_packages(lock, json.loads(installed.read_text())):
        return root / "node_modules"
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(root / name, scratch / name)
    subprocess.run(
        ["npm", "ci", "--omit=dev", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=scratch,
        check=True,
    )
    return scratch / "node_modules"


def _same_packages(lock: dict[str, Any], installed: dict[str, Any]) -> bool:
    """Whether node_modules holds each vendored package at the lock file's version."""
    wanted, have = lock.get("packages", {}), installed.get("packages", {})
    for package in VENDOR:
        version = wanted.get(f"node_modules/{package}", {}).get("version")
        if version is None or have.get(f"node_modules/{package}", {}).get("version") != version:
            return False
    return True
