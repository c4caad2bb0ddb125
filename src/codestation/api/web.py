"""The web UI: the sessions page, each session's terminal page, the API's documentation, and
their static files.

The pages are plain HTML and ES modules in `codestation/web`; xterm.js and Swagger UI come from
npm (the repository's package.json) and are served on this origin, nothing from a CDN: from
`codestation/web/vendor` in an installed wheel (put there when it was built: hatch_build.py),
else from a source checkout's node_modules (installed by `scripts/setup.sh`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGES = Path(str(resources.files("codestation") / "web"))
PACKAGED = PAGES / "vendor"
# A source checkout: src/codestation/api/web.py -> the repository's node_modules.
NODE_MODULES = Path(__file__).resolve().parents[3] / "node_modules"
VENDOR = PACKAGED if PACKAGED.is_dir() else NODE_MODULES

router = APIRouter(include_in_schema=False)


def page(name: str) -> FileResponse:
    """A page that only a logged-in browser may see: never from a cache, so one shown after
    logging out goes back to the door."""
    return FileResponse(PAGES / name, headers={"cache-control": "no-store"})


@router.get("/")
async def sessions_page() -> FileResponse:
    return page("index.html")


@router.get("/terminal/{session_id}")
async def terminal_page(session_id: str) -> FileResponse:
    return page("terminal.html")


@router.get("/docs")
async def docs_page() -> FileResponse:
    return page("docs.html")


def mount(app: FastAPI) -> None:
    app.include_router(router)
    # The vendor mount first: /static/vendor would otherwise be looked up among the pages.
    app.mount("/static/vendor", StaticFiles(directory=VENDOR, check_dir=False), name="vendor")
    app.mount("/static", StaticFiles(directory=PAGES), name="static")
