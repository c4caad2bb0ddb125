"""The `codestation` command: run the service, and drive it from a shell."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from codestation import __version__, logformat
from codestation.changes import Changes
from codestation.client import DEFAULT_URL, Client, Session
from codestation.config import Settings, config_file_path, masked
from codestation.errors import CodestationError, Unauthorized
from codestation.logformat import LogFormat
from codestation.schemas import Reply, SessionInfo
from codestation.sessions import Status

if TYPE_CHECKING:
    from codestation.accounts import Accounts

app = typer.Typer(
    help="OpenCode coding agents in sandboxes, one per workspace.", no_args_is_help=True
)
image_app = typer.Typer(help="The sandbox image Docker sessions run.", no_args_is_help=True)
app.add_typer(image_app, name="image")
token_app = typer.Typer(
    help="Tokens, which let people and programs in. These open the data directory directly: "
    "they work whether the service runs or not.",
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")
user_app = typer.Typer(help="Users: they exist once they have a token.", no_args_is_help=True)
app.add_typer(user_app, name="user")

out = Console()
err = Console(stderr=True)


def _version(shown: bool) -> None:
    if shown:
        out.print(f"codestation {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """OpenCode coding agents in sandboxes, one per workspace."""


UrlOption = Annotated[
    str, typer.Option("--url", envvar="CODESTATION_URL", help="Where the service answers.")
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="CODESTATION_TOKEN",
        help="Your token; else the token file (token_file, ~/.config/codestation/token).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

STATUS_STYLE = {
    Status.STARTING: "yellow",
    Status.RUNNING: "green",
    Status.STOPPING: "yellow",
    Status.STOPPED: "dim",
    Status.FAILED: "red",
}


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(_printable(message))}", highlight=False)
    return typer.Exit(1)


def _printable(text: str) -> str:
    """`text` without control characters but newlines and tabs: what the agent writes must not
    drive the user's terminal (escape sequences set titles, colours, even the clipboard)."""
    return _CONTROL.sub("", text)


def _token(given: str | None) -> str | None:
    """The token to send: --token or CODESTATION_TOKEN, else the token file (mode 0600)."""
    if given:
        return given
    path = Settings().token_file
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & 0o077:
        raise _fail(
            f"the token file {path} can be read by others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`."
        )
    return path.read_text().strip() or None


@contextmanager
def _service(url: str, token: str | None) -> Iterator[Client]:
    """A client whose errors end the command with their sentence and exit status 1."""
    found = _token(token)
    with Client(url, token=found) as client:
        try:
            yield client
        except Unauthorized as exc:
            hint = (
                ""
                if found
                else f" No token was given: pass --token, set CODESTATION_TOKEN, or put one "
                f"in {Settings().token_file} (mode 0600)."
            )
            raise _fail(f"{exc}{hint}") from None
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
    log_format: Annotated[
        LogFormat | None,
        typer.Option(help="text (for people) or json (one object per line); else log_format."),
    ] = None,
) -> None:
    """Run the codestation service (the API on http://127.0.0.1:8585 by default)."""
    import asyncio

    import uvicorn

    from codestation.api import create_app
    from codestation.runtimes import choose_runtime, make_runtimes

    settings = Settings()
    settings.host = host or settings.host
    settings.port = port or settings.port
    settings.log_format = log_format or settings.log_format
    logformat.configure(settings.log_format)
    say = _sayer(settings.log_format)
    # Say plainly, before the server starts, which runtime sessions get, or why none can run.
    try:
        chosen = asyncio.run(choose_runtime(settings, make_runtimes(settings)))
    except CodestationError as exc:
        raise _fail(str(exc)) from None
    how = "chosen automatically" if settings.runtime == "auto" else "as configured"
    say(f"codestation: sessions run in {chosen} ({how}); data in {settings.data_dir}")
    _first_admin(settings, say)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.public_url:
        say(
            f"codestation listens on {settings.host}, beyond this machine, over plain "
            "HTTP: put a TLS proxy in front and set public_url (see the README's Security "
            "section).",
            logging.WARNING,
        )
    # Every proxied request, stream and terminal holds descriptors: take all the kernel allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Open event streams and terminals would hold a graceful shutdown forever: end them.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=3,
    )


@app.command()
def doctor() -> None:
    """Check this host for sessions: what works, and how to fix what does not. Exit status 0
    only when a session can start."""
    import asyncio

    from codestation.doctor import can_start, examine

    findings = asyncio.run(examine(Settings()))
    table = Table(show_header=False, box=None, pad_edge=False)
    for finding in findings:
        mark = "[green]ok[/green]" if finding.ok else "[red]no[/red]"
        said = escape(finding.seen) + (f"\n[yellow]fix:[/yellow] {escape(finding.fix)}"
                                       if finding.fix and not finding.ok else "")  # fmt: skip
        table.add_row(mark, finding.name, said)
    out.print(table)
    if can_start(findings):
        out.print("A session can start here.")
        return
    out.print("[red]No session can start here[/red]: fix what is marked `no` above.")
    raise typer.Exit(1)


def _sayer(form: LogFormat) -> Callable[..., None]:
    """How serve speaks before the server runs: to a person on stderr, or as log lines
    (in JSON, where stderr must hold nothing else)."""
    log = logging.getLogger("codestation")

    def say(text: str, level: int = logging.INFO) -> None:
        if form == "json":
            log.log(level, text)
        else:
            style = "yellow" if level >= logging.WARNING else None
            err.print(text, style=style, highlight=False, soft_wrap=True)

    return say


def _first_admin(settings: Settings, say: Callable[..., None]) -> None:
    """With no admin yet, make one and print a login link, once; the CLI on this machine finds
    the token in the token file (written only where none works already)."""
    from codestation.accounts import CODE_MINUTES, Accounts
    from codestation.store import Store

    store = Store(settings.db_path)
    try:
        accounts = Accounts(store, settings)
        if accounts.has_admin():
            return
        token, secret = accounts.create_token("admin", admin=True, note="made at first start")
        raw = secret.get_secret_value()
        # systemd's journal is readable by more than root (the adm and systemd-journal
        # groups): an admin's login link is never written there.
        journal = bool(os.environ.get("JOURNAL_STREAM"))
        code = None if journal else accounts.login_code(token.id).get_secret_value()
        path = settings.token_file
        current = path.read_text().strip() if path.is_file() else ""
        if not current or accounts.by_token(current) is None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(raw + "\n")
            saved = f"; the CLI here finds it in {path}"
        else:
            saved = ""
    finally:
        store.close()
    if code is None:
        say(
            f"codestation: made the admin token {token.id}{saved}. `codestation token link "
            f"{token.id}`, run as this service's user, makes a one-time login link (this log "
            "is the journal, which others may read: no link is written here)."
        )
        return
    say(
        f"codestation: made the admin token {token.id}{saved}. Log in with this one-time link "
        f"(valid {CODE_MINUTES:g} minutes; `codestation token link {token.id}` makes another):"
    )
    say(f"  {_link(settings, code)}")


def _link(settings: Settings, code: str) -> str:
    return f"{settings.service_url}/login?token={code}"


@app.command()
def start(
    workspace: Annotated[Path, typer.Argument(help="The directory the agent works in.")],
    environment: Annotated[str, typer.Option("--environment", "-e")] = "default",
    wait: Annotated[bool, typer.Option(help="Wait until OpenCode answers.")] = True,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a session on WORKSPACE and (by default) wait until it runs."""
    with _service(url, token) as client:
        session: SessionInfo = client.start(str(workspace.absolute()), environment, wait=False)
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


@app.command()
def run(
    workspace: Annotated[Path, typer.Argument(help="The directory the agent works in.")],
    prompt: Annotated[str, typer.Argument(help="What to ask the agent.")],
    environment: Annotated[str, typer.Option("--environment", "-e")] = "default",
    keep: Annotated[bool, typer.Option(help="Leave the session running afterwards.")] = False,
    model: Annotated[str | None, typer.Option(help="provider/model; unset: the default.")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Ask the agent to do PROMPT in WORKSPACE: start a session there (or use your running
    one), stream the agent's reply as it writes it, then print what changed. A session this
    command started is stopped at the end unless --keep. Exits 1 if the turn fails."""
    with _service(url, token) as client:
        path = str(workspace.absolute())
        me = client.me().user
        session = next(
            (s for s in client.sessions()
             if s.status is Status.RUNNING and s.owner == me and s.workspace == path
             and s.environment == environment),
            None,
        )  # fmt: skip
        started = session is None
        if session is None:
            with err.status("starting a session") as status:
                first = client.start(path, environment, wait=False)
                session = client.wait(
                    first.id, on_update=lambda s: status.update(f"{s.id}: {s.step or s.status}")
                )
            if session.status is not Status.RUNNING:
                raise _fail(f"session {session.id} failed: {session.error}")
        err.print(f"[dim]session {session.id} ({'new' if started else 'running'})[/dim]")
        try:
            reply = _follow_turn(client, session, prompt, model)
            out.print()
            if reply.error:
                raise _fail(f"the agent's turn failed: {reply.error}")
            _print_changes(session.changes())
        finally:
            if started and not keep:
                session.stop()
                err.print(f"[dim]stopped {session.id}[/dim]")
            elif started:
                err.print(f"[dim]kept {session.id} running: codestation stop {session.id}[/dim]")


def _follow_turn(client: Client, session: Session, text: str, model: str | None) -> Reply:
    """Send `text`, print the reply as the agent writes it and each tool as it ends; the
    reply once the turn is over."""
    events = client.agent_events(session.id)
    next(events)  # the stream is open: nothing the turn does is missed
    accepted = session.prompt(text, wait=False, model=model)
    kinds: dict[str, str] = {}  # part id: text, reasoning, tool ...
    said = ""  # the error OpenCode reported for the turn, if any
    try:
        for event in events:
            found = event.properties
            part = found.get("part") if isinstance(found.get("part"), dict) else {}
            assert isinstance(part, dict)
            if (found.get("sessionID") or part.get("sessionID")) != accepted.opencode_session:
                continue
            if event.type == "message.part.updated":
                kinds[str(part.get("id"))] = str(part.get("type"))
                state = part.get("state") if isinstance(part.get("state"), dict) else {}
                assert isinstance(state, dict)
                if part.get("type") == "tool" and state.get("status") in ("completed", "error"):
                    title = _printable(
                        f"· {part.get('tool')}: {state.get('title') or state.get('status')}"
                    )
                    err.print(title, style="dim", markup=False, highlight=False)
            elif event.type == "message.part.delta" and found.get("field") == "text":
                if kinds.get(str(found.get("partID")), "text") == "text":
                    delta = _printable(str(found.get("delta", "")))
                    out.print(delta, end="", soft_wrap=True, markup=False, highlight=False)
            elif event.type == "session.error":
                failure = found.get("error") if isinstance(found.get("error"), dict) else {}
                assert isinstance(failure, dict)
                data = failure.get("data") if isinstance(failure.get("data"), dict) else {}
                assert isinstance(data, dict)
                said = str(data.get("message") or failure.get("name") or "unknown error")
            elif event.type == "session.idle":
                break
    finally:
        events.close()
    reply = session.reply(accepted)
    if reply.error is None and (said or not reply.finished):
        reply = reply.model_copy(update={"error": said or "the turn ended without a reply"})
    return reply


def _print_changes(changes: Changes) -> None:
    if not changes.files:
        err.print("no changes in the workspace")
        return
    err.print(f"changes: {changes.added} added, {changes.modified} modified, "
              f"{changes.deleted} deleted")  # fmt: skip
    marks = {"added": "[green]A", "modified": "[yellow]M", "deleted": "[red]D"}
    for change in changes.files:
        err.print(f"  {marks[change.change]}[/] {escape(_printable(change.path))}", highlight=False)
    if changes.truncated:
        err.print("  ... (more: GET /api/v1/code/session/<id>/changes)")


@app.command("ls")
def list_sessions(
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """List your sessions (an admin's: everyone's)."""
    with _service(url, token) as client:
        sessions = client.sessions()
    if as_json:
        out.print_json(json.dumps([json.loads(s.model_dump_json()) for s in sessions]))
        return
    table = Table("ID", "STATUS", "RUNTIME", "URL", "WORKSPACE", "ENV", "OWNER", "AGE", box=None)
    for s in sessions:
        style = STATUS_STYLE[s.status]
        table.add_row(
            s.id, f"[{style}]{s.status}[/{style}]", s.runtime, s.url or "-", s.workspace,
            s.environment, s.owner or "-", _age(s),
        )  # fmt: skip
    out.print(table)


@app.command()
def status(
    session_id: str,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one session, with its URL and credentials."""
    with _service(url, token) as client:
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
    token: TokenOption = None,
) -> None:
    """Print a session's OpenCode log."""
    with _service(url, token) as client, contextlib.suppress(KeyboardInterrupt):
        if follow:
            for text in client.follow_logs(session_id, tail):
                sys.stdout.write(text)
                sys.stdout.flush()
        else:
            sys.stdout.write(client.logs(session_id, tail))


@app.command()
def stop(
    session_id: Annotated[str | None, typer.Argument()] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every live session of yours.")] = False,
    everyone: Annotated[
        bool, typer.Option("--everyone", help="With --all, an admin's: everyone's sessions.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Stop a session (or --all); its workspace is left as it is."""
    if (session_id is None) == (not all_):
        raise _fail("give a session id, or --all (not both).")
    with _service(url, token) as client:
        stopped = client.stop_all(everyone=everyone) if all_ else [client.stop(session_id or "")]
    for s in stopped:
        out.print(f"{s.id} {s.status}")


@app.command("rm")
def remove(session_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None) -> None:
    """Stop a session and forget it."""
    with _service(url, token) as client:
        client.delete(session_id)
    out.print(f"{session_id} removed")


@app.command()
def config() -> None:
    """Print the effective configuration (secrets masked) and where it came from."""
    settings = Settings()
    source = config_file_path()
    err.print(
        f"config file: {source or 'none'}; CODESTATION_* variables override it", soft_wrap=True
    )
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


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option("--user", help="Whose token: a lowercase Unix-style name.")],
    admin: Annotated[bool, typer.Option("--admin", help="It may see and stop everyone's.")] = False,
    expires: Annotated[
        float | None, typer.Option("--expires", help="Days until it stops working.")
    ] = None,
    note: Annotated[str, typer.Option("--note", help="What it is for.")] = "",
) -> None:
    """Make a token and print it, alone, on stdout (it is shown this once)."""
    with _accounts() as accounts:
        token, secret = accounts.create_token(user, admin=admin, expires_days=expires, note=note)
    err.print(f"token {token.id} for {user}" + (" (admin)" if admin else ""))
    print(secret.get_secret_value())


@token_app.command("link")
def token_link(
    token_id: str,
    minutes: Annotated[float, typer.Option("--minutes", help="How long it works.")] = 60,
) -> None:
    """Print a one-time login link for a token's user (the link holds a code, not the token)."""
    with _accounts() as accounts:
        code = accounts.login_code(token_id, minutes).get_secret_value()
    print(_link(Settings(), code))


@token_app.command("list")
def token_list(as_json: JsonOption = False) -> None:
    """Every token: id, user, admin, created, expires, last used (never the secret)."""
    with _accounts() as accounts:
        tokens = accounts.tokens()
    rows = [
        {
            "id": t.id, "user": t.user, "admin": t.admin, "created_at": t.created_at.isoformat(),
            "expires_at": t.expires_at.isoformat() if t.expires_at else None,
            "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
            "note": t.note,
        }
        for t in tokens
    ]  # fmt: skip
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("ID", "USER", "ADMIN", "CREATED", "EXPIRES", "LAST USED", "NOTE", box=None)
    for r in rows:
        table.add_row(
            str(r["id"]), str(r["user"]), "yes" if r["admin"] else "",
            str(r["created_at"])[:16], str(r["expires_at"] or "never")[:16],
            str(r["last_used_at"] or "-")[:16], str(r["note"]),
        )  # fmt: skip
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str) -> None:
    """Revoke a token: it, and every browser login made with it, stop working at once."""
    with _accounts() as accounts:
        found = accounts.revoke(token_id)
    if not found:
        raise _fail(f"there is no token {token_id!r}; `codestation token list` shows them.")
    out.print(f"{token_id} revoked")


@user_app.command("ls")
def user_ls(as_json: JsonOption = False) -> None:
    """Every user, with how many tokens and live sessions they have."""
    with _accounts() as accounts:
        users = accounts.users()
        live = [s.owner for s in accounts.store.list(live_only=True)]
    rows = [
        {"user": u.name, "admin": u.admin, "tokens": u.tokens, "live_sessions": live.count(u.name),
         "created_at": u.created_at.isoformat()}
        for u in users
    ]  # fmt: skip
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("USER", "ADMIN", "TOKENS", "LIVE SESSIONS", "SINCE", box=None)
    for r in rows:
        table.add_row(
            str(r["user"]), "yes" if r["admin"] else "", str(r["tokens"]),
            str(r["live_sessions"]), str(r["created_at"])[:10],
        )  # fmt: skip
    out.print(table)


@contextmanager
def _accounts() -> Iterator[Accounts]:
    """The accounts in this data directory, opened directly (the service need not run); a
    refusal ends the command with its sentence."""
    from codestation.accounts import Accounts
    from codestation.store import Store

    settings = Settings()
    store = Store(settings.db_path)
    try:
        yield Accounts(store, settings)
    except CodestationError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()


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
