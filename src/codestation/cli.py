"""The `codestation` command: run the service, and drive it from a shell."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from codestation.client import DEFAULT_URL, Client
from codestation.config import Settings, config_file_path, masked
from codestation.errors import CodestationError
from codestation.schemas import SessionInfo
from codestation.sessions import Status

app = typer.Typer(
    help="OpenCode coding agents in sandboxes, one per workspace.", no_args_is_help=True
)
image_app = typer.Typer(help="The sandbox image Docker sessions run.", no_args_is_help=True)
app.add_typer(image_app, name="image")

out = Console()
err = Console(stderr=True)

UrlOption = Annotated[
    str, typer.Option("--url", envvar="CODESTATION_URL", help="Where the service answers.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

STATUS_STYLE = {
    Status.STARTING: "yellow",
    Status.RUNNING: "green",
    Status.STOPPING: "yellow",
    Status.STOPPED: "dim",
    Status.FAILED: "red",
}


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


@contextmanager
def _service(url: str) -> Iterator[Client]:
    """A client whose errors end the command with their sentence and exit status 1."""
    with Client(url) as client:
        try:
            yield client
        except CodestationError as exc:
            raise _fail(str(exc)) from None


def _age(session: SessionInfo) -> str:
    seconds = int((datetime.now(UTC) - session.created_at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _print_session(session: SessionInfo) -> None:
    style = STATUS_STYLE[session.status]
    state = f"[{style}]{session.status}[/{style}]"
    out.print(f"[bold]{session.id}[/bold]  {state}  ({session.runtime})")
    out.print(f"  workspace    {session.workspace}  [dim]environment {session.environment}[/dim]")
    if session.url:
        out.print(f"  url          {session.url}")
        out.print(f"  username     {session.auth.username}")
        out.print(f"  password     {session.auth.password}")
    elif session.step:
        out.print(f"  step         {session.step}")
    if session.error:
        out.print(f"  [red]error[/red]        {session.error}", highlight=False)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
) -> None:
    """Run the codestation service (the API on http://127.0.0.1:8585 by default)."""
    import asyncio

    import uvicorn

    from codestation.api import create_app
    from codestation.runtimes import choose_runtime, make_runtimes

    settings = Settings()
    settings.host = host or settings.host
    settings.port = port or settings.port
    # Say plainly, before the server starts, which runtime sessions get, or why none can run.
    try:
        chosen = asyncio.run(choose_runtime(settings, make_runtimes(settings)))
    except CodestationError as exc:
        raise _fail(str(exc)) from None
    how = "chosen automatically" if settings.runtime == "auto" else "as configured"
    err.print(f"codestation: sessions run in {chosen} ({how}); data in {settings.data_dir}")
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)]
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness probe
    # Open event streams and terminals would hold a graceful shutdown forever: end them.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=3,
    )


@app.command()
def start(
    workspace: Annotated[Path, typer.Argument(help="The directory the agent works in.")],
    environment: Annotated[str, typer.Option("--environment", "-e")] = "default",
    wait: Annotated[bool, typer.Option(help="Wait until OpenCode answers.")] = True,
    url: UrlOption = DEFAULT_URL,
    as_json: JsonOption = False,
) -> None:
    """Start a session on WORKSPACE and (by default) wait until it runs."""
    with _service(url) as client:
        session: SessionInfo = client.start(str(workspace.absolute()), environment)
        if wait:
            with err.status(f"starting {session.id}") as status:
                session = client.wait(
                    session.id,
                    on_update=lambda s: status.update(f"{s.id}: {s.step or s.status}"),
                )
    if as_json:
        out.print_json(session.model_dump_json())
    else:
        _print_session(session)
    if session.status is Status.FAILED:
        raise typer.Exit(1)


@app.command("ls")
def list_sessions(url: UrlOption = DEFAULT_URL, as_json: JsonOption = False) -> None:
    """List sessions."""
    with _service(url) as client:
        sessions = client.sessions()
    if as_json:
        out.print_json(json.dumps([json.loads(s.model_dump_json()) for s in sessions]))
        return
    table = Table("ID", "STATUS", "RUNTIME", "URL", "WORKSPACE", "ENV", "AGE", box=None)
    for s in sessions:
        style = STATUS_STYLE[s.status]
        table.add_row(
            s.id, f"[{style}]{s.status}[/{style}]", s.runtime, s.url or "-", s.workspace,
            s.environment, _age(s),
        )  # fmt: skip
    out.print(table)


@app.command()
def status(session_id: str, url: UrlOption = DEFAULT_URL, as_json: JsonOption = False) -> None:
    """Show one session, with its URL and credentials."""
    with _service(url) as client:
        session = client.session(session_id)
    if as_json:
        out.print_json(session.model_dump_json())
    else:
        _print_session(session)


@app.command()
def logs(
    session_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    tail: Annotated[int, typer.Option("--tail", "-n", help="How many last lines.")] = 200,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Print a session's OpenCode log."""
    with _service(url) as client, contextlib.suppress(KeyboardInterrupt):
        if follow:
            for text in client.follow_logs(session_id, tail):
                sys.stdout.write(text)
                sys.stdout.flush()
        else:
            sys.stdout.write(client.logs(session_id, tail))


@app.command()
def stop(
    session_id: Annotated[str | None, typer.Argument()] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every live session.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Stop a session (or --all); its workspace is left as it is."""
    if (session_id is None) == (not all_):
        raise _fail("give a session id, or --all (not both).")
    with _service(url) as client:
        stopped = client.stop_all() if all_ else [client.stop(session_id or "")]
    for s in stopped:
        out.print(f"{s.id} {s.status}")


@app.command("rm")
def remove(session_id: str, url: UrlOption = DEFAULT_URL) -> None:
    """Stop a session and forget it."""
    with _service(url) as client:
        client.delete(session_id)
    out.print(f"{session_id} removed")


@app.command()
def config() -> None:
    """Print the effective configuration (secrets masked) and where it came from."""
    settings = Settings()
    source = config_file_path()
    err.print(f"config file: {source or 'none'}; CODESTATION_* variables override it")
    out.print_json(json.dumps(masked(settings.model_dump(mode="json"))))


@app.command()
def prepare() -> None:
    """Get every runtime that can run here ready for the default environment (the sandbox
    image for Docker, the pinned OpenCode for bubblewrap), showing progress."""
    import asyncio

    from codestation.runtimes import make_runtimes

    settings = Settings()
    profile = settings.environments["default"]
    ready = []
    for name, runtime in make_runtimes(settings).items():
        try:
            asyncio.run(runtime.check())
        except CodestationError as exc:
            err.print(f"[yellow]{name}: not available[/yellow] ({exc})", highlight=False)
            continue
        with err.status(f"{name}: preparing") as progress:
            try:
                asyncio.run(runtime.prepare(profile, lambda line: progress.update(line[:100])))
            except CodestationError as exc:
                raise _fail(f"{name}: {exc}") from None
        err.print(f"{name}: ready")
        ready.append(name)
    if not ready:
        raise _fail("no runtime can run sessions here; start Docker or install bubblewrap.")


@image_app.command("build")
def image_build() -> None:
    """Build the sandbox image now (it is also built on first need), showing progress."""
    from codestation.errors import RuntimeUnavailable
    from codestation.image import ensure_image, image_tag
    from codestation.runtimes.docker import DockerRuntime

    settings = Settings()
    runtime = DockerRuntime(settings)
    try:
        with err.status(f"building {image_tag(settings)}") as progress:
            tag = ensure_image(
                runtime.client, settings, lambda line: progress.update(line[:120] or "...")
            )
    except (CodestationError, RuntimeUnavailable) as exc:
        raise _fail(str(exc)) from None
    out.print(tag)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
