"""The FastAPI application: its lifespan, and the one place errors become HTTP answers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from codestation import __version__
from codestation.accounts import Accounts
from codestation.api import login, web
from codestation.api.access import Access
from codestation.api.headers import Hardening
from codestation.api.proxy import SessionProxy
from codestation.api.routes import router
from codestation.config import Settings
from codestation.errors import CodestationError
from codestation.manager import SessionManager
from codestation.metrics import Metrics
from codestation.runtimes import make_runtimes
from codestation.store import Store
from codestation.terminals import Terminals

log = logging.getLogger("codestation")

EXAMPLES = {
    "/login": 'send a JSON object such as {"token": "cst_..."}',
    "/api/v1/code/start": 'send a JSON object such as {"workspace": "/home/me/project", '
    '"environment": "default"}',
}


async def _sweep_terminals(terminals: Terminals, manager: SessionManager, every: float) -> None:
    while True:
        try:
            await terminals.sweep(manager.running())
        except Exception:  # a sweep that dies would end no terminal again; log and go on
            log.exception("sweeping terminals failed; trying again in %g s", every)
        await asyncio.sleep(every)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.db_path)
        manager = SessionManager(settings, store, make_runtimes(settings), app.state.metrics)
        try:
            await manager.open()
        except BaseException:
            store.close()
            raise
        app.state.manager = manager
        app.state.accounts = Accounts(store, settings)
        terminals = app.state.terminals = Terminals(manager.agent_url, settings.terminal_keep)
        sweeping = asyncio.create_task(_sweep_terminals(terminals, manager, settings.cull_interval))
        log.info("codestation %s: runtime %s, data in %s", __version__,
                 manager.default_runtime, settings.data_dir)  # fmt: skip
        try:
            yield
        finally:
            sweeping.cancel()
            await asyncio.gather(sweeping, return_exceptions=True)
            await terminals.close()
            await manager.close()
            store.close()

    app = FastAPI(
        title="codestation",
        version=__version__,
        summary="OpenCode coding agents in sandboxes, one per workspace.",
        lifespan=lifespan,
        docs_url=None,  # served by `web` from the installed swagger-ui-dist, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    # Read at each scrape, from whatever the lifespan made last.
    app.state.metrics.watch(lambda: app.state.manager.census(app.state.terminals.attached()))
    app.include_router(router)
    app.include_router(login.router)
    web.mount(app)
    # Added innermost first: a request meets Hardening, then Access, then the proxy.
    app.add_middleware(SessionProxy)
    app.add_middleware(Access, settings=settings)
    app.add_middleware(Hardening, max_body_size=settings.max_body_size)
    app.add_exception_handler(CodestationError, _codestation_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


async def _codestation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CodestationError)
    if exc.status_code >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return _error(exc.status_code, str(exc), exc.code)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: list[dict[str, Any]] = list(exc.errors())
    example = EXAMPLES.get(request.url.path, "send a JSON object; /docs shows its fields")
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, f"the request body is not valid JSON; {example}", "malformed_json")
    problems = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request body"
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(problems)
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        message += f"; {example}"
    return _error(422, message, "invalid_request")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = (
        f"there is no {request.method} {request.url.path}; see /docs for the API."
        if exc.status_code in codes
        else str(exc.detail)
    )
    return _error(exc.status_code, message, codes.get(exc.status_code, "http_error"))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {exc!r}; see the service log.", "internal_error")
