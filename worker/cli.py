"""The `variflow` command."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, ProgrammingError

from worker import runtime as runtimes
from worker.config import ConfigError, Settings, get_settings, reset_settings
from worker.providers import registered
from worker.states import JobStatus

if TYPE_CHECKING:
    import variflow_client

# Heavy modules (the API with SQLAlchemy and Celery, gunicorn, honcho, the
# sandbox) are imported inside the commands that use them, so that `variflow
# --help` and the light commands start fast. No cycle is dodged by it: the CLI
# is the top of the import graph.

KNOWN_PROVIDERS = tuple(registered())

# The remote mode: with both set, submit, status, list and cancel go through the HTTP API
# (variflow_client, clients/python) and need no database or broker of their own.
API_URL_VARIABLE = "VARIFLOW_API_URL"
API_TOKEN_VARIABLE = "VARIFLOW_API_TOKEN"  # noqa: S105 (the variable's name, not a token)
API_PAGE_SIZE = 100  # the most GET /v1/jobs gives in one page

# Exit codes: the group's --help, submit's and status's, and the README say the same.
EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2  # a bad option, field, job id or setting; a database not usable
EXIT_TIMED_OUT = 3

# The tables a database must have for the job commands (made by `variflow db upgrade`).
VARIFLOW_TABLES = ("jobs", "job_events", "job_inputs")
DB_CONNECT_TIMEOUT = 10  # seconds, PostgreSQL: an unreachable server is an error, not a hang
UPGRADE_HINT = "run `variflow db upgrade`"


class CliError(click.ClickException):
    """What is wrong, in one line ("Error: ..."), without the usage text: exit code 2."""

    exit_code = EXIT_USAGE


class TimedOut(click.ClickException):
    """A job not finished in time, in one line: exit code 3."""

    exit_code = EXIT_TIMED_OUT


def _settings() -> Settings:
    """The settings this command runs with: read once, from the environment."""
    installed = runtimes.installed()
    return installed.settings if installed is not None else get_settings()


class VariflowGroup(click.Group):
    """Turns configuration and database errors into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
        except (OperationalError, ProgrammingError, InterfaceError) as exc:
            # Past the check of _require_database: the server went away, or the
            # schema is older than this variflow.
            shown, reason = _database_shown(), _reason(exc)
            raise CliError(
                f"the database {shown} failed: {reason}; check VARIFLOW_DATABASE_URL, "
                f"or {UPGRADE_HINT} if its schema is older than this variflow"
            ) from None


@click.group(cls=VariflowGroup)
def cli() -> None:
    """variflow: image-variation jobs against PiAPI, Piclaza and LemonData.

    With VARIFLOW_API_URL and VARIFLOW_API_TOKEN set, submit, status, list and
    cancel go through that variflow's HTTP API (no database needed here); this
    needs the client: pip install variflow-client (clients/python).

    \b
    Exit codes:
      0  done
      1  the job failed (submit --wait, status)
      2  usage or input error: a bad option, field, job id or setting, or a
         database that cannot be reached or has no variflow tables
      3  timed out (submit --wait, after --timeout)
    """


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=int)
def sandbox(host: str, port: int) -> None:
    """Run the local emulator of the three provider APIs (API key: sandbox-key)."""
    from sandbox.server import main

    main(host, port)


@cli.command()
@click.option("--host", default=None, help="Default: VARIFLOW_HOST.")
@click.option("--port", default=None, type=int, help="Default: VARIFLOW_PORT.")
@click.option("--workers", default=2, show_default=True, type=int)
@click.option(
    "--threads", default=None, type=int, help="Per worker. Default: VARIFLOW_WEB_THREADS."
)
def serve(host: str | None, port: int | None, workers: int, threads: int | None) -> None:
    """Run the web app (webhooks, the /v1 API, the dashboard) under gunicorn."""
    settings = _settings()
    bind = f"{host or settings.host}:{port or settings.port}"
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            "python:webhooks.gunicorn_conf",
            "--bind",
            bind,
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(threads or settings.web_threads),
            "--access-logfile",
            "-",
            "webhooks.wsgi:app",
        ],
    )


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5555, show_default=True, type=int)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, flower_args: tuple[str, ...]) -> None:
    """Run Flower with basic auth from VARIFLOW_FLOWER_BASIC_AUTH ("user:password").

    Flower can revoke tasks and shows task arguments, so it is never started
    open. Its Prometheus metrics are at /metrics on the same port.
    """
    auth = _settings().flower_basic_auth
    if auth is None or ":" not in auth.get_secret_value():
        raise click.UsageError(
            "VARIFLOW_FLOWER_BASIC_AUTH must be set to user:password; Flower is never run open"
        )
    # Through the environment, not argv: argv is visible to every local user.
    os.environ["FLOWER_BASIC_AUTH"] = auth.get_secret_value()
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "flower",
            f"--port={port}",
            *flower_args,
        ],
    )


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations to VARIFLOW_DATABASE_URL (the embedded SQLite by default)."""
    from worker.migrate import upgrade

    try:
        upgrade(_settings().database_url, revision)
    except OperationalError as exc:
        # Unreachable server, unknown database, refused login: say so in a line.
        shown, reason = _database_shown(), _reason(exc)
        raise CliError(f"cannot reach the database {shown}: {reason}") from None
    click.echo(f"database at revision {revision}")


def _database_shown(url: URL | None = None) -> str:
    """The database URL, its password masked."""
    try:
        return (url or make_url(_settings().database_url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "(VARIFLOW_DATABASE_URL)"  # not parsable: not echoed, it may hold a password


def _reason(exc: BaseException) -> str:
    """A driver's error on one line, without the URL's password should it quote it."""
    reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
    try:
        password = make_url(_settings().database_url).password
    except ArgumentError:
        password = None
    return reason.replace(str(password), "***") if password else reason


def _require_database(tables: tuple[str, ...] = VARIFLOW_TABLES) -> None:
    """Stop with one line unless the database is there with variflow's tables.

    Runs before the API builds anything, so that a job command never creates a
    database as a side effect: the API's engine would create an SQLite file's
    folder, and its first connection the file.
    """
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.exc import SQLAlchemyError

    try:
        url = make_url(_settings().database_url)
    except ArgumentError:
        raise CliError(
            "VARIFLOW_DATABASE_URL: not a database URL (e.g. postgresql+psycopg://user@host/db)"
        ) from None
    shown = _database_shown(url)
    if url.get_backend_name() == "sqlite":
        path = url.database or ""
        a_file = path not in ("", ":memory:") and not path.startswith("file:")  # not a URI
        if a_file and not Path(path).is_file():
            raise CliError(
                f"no database at {shown}: {UPGRADE_HINT} to create it, "
                "or set VARIFLOW_DATABASE_URL to yours"
            )
    connect_args = (
        {"connect_timeout": DB_CONNECT_TIMEOUT} if url.get_backend_name() == "postgresql" else {}
    )
    try:
        engine = create_engine(url, connect_args=connect_args)
        try:
            with engine.connect() as connection:
                inspector = inspect(connection)
                missing = [t for t in tables if not inspector.has_table(t)]
        finally:
            engine.dispose()
    except (SQLAlchemyError, ImportError) as exc:
        raise CliError(
            f"cannot reach the database {shown}: {_reason(exc)}; check VARIFLOW_DATABASE_URL, "
            f"then {UPGRADE_HINT}"
        ) from None
    if missing:
        raise CliError(
            f"the database {shown} has no variflow tables ({', '.join(missing)} missing): "
            f"{UPGRADE_HINT}"
        )


def _fail_usage(exc: ValueError) -> NoReturn:
    raise click.UsageError(str(exc))


@cli.command()
@click.argument("provider", type=click.Choice(KNOWN_PROVIDERS))
@click.option("--origin-task-id", help="piapi: the imagine/upscale task to vary.")
@click.option("--index", help="piapi: 1-4, high_variation or low_variation.")
@click.option("--prompt", help="piapi: the prompt.")
@click.option("--aspect-ratio", help="piapi: e.g. 1:1 or 16:9.")
@click.option("--image", help="piclaza, lemondata: an http(s) URL or a local file path.")
@click.option("--n", type=int, help="lemondata: number of images, 1-10.")
@click.option("--size", help="lemondata: 256x256, 512x512 or 1024x1024.")
@click.option("--response-format", help="lemondata: url or b64_json.")
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any provider field (repeatable); VALUE is read as JSON when it is JSON.",
)
@click.option("--idempotency-key", help="The same key returns the same job.")
@click.option("--deadline", type=float, help="Seconds before the job fails with timeout.")
@click.option("--notify-url", help="POST the final state here (Standard Webhooks).")
@click.option("--on-complete-task", help="A Celery task sent with the job id at the end.")
@click.option("--wait", is_flag=True, help="Follow the job to its end.")
@click.option("--timeout", default=600.0, show_default=True, help="With --wait: give up after.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def submit(
    provider: str,
    wait: bool,
    timeout: float,
    as_json: bool,
    params: tuple[str, ...],
    **options: Any,
) -> None:
    """Submit a variation job and print its id.

    \b
    variflow submit piapi --origin-task-id T --index 1 --prompt "a fox" --wait
    variflow submit piclaza --image ./cat.png
    variflow submit lemondata --image https://example.com/cat.png --n 2 --size 512x512
    variflow submit piclaza --image ./cat.png -p grouping=true

    \b
    Exit codes:
      0  submitted (with --wait: the job completed or was cancelled)
      1  with --wait: the job failed
      2  usage or input error, naming the field (or the setting, or the database)
      3  with --wait: the job did not finish within --timeout
    """
    fields = {k: v for k, v in options.items() if v is not None}
    for item in params:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        fields[name.strip()] = _param_value(text)
    api = _remote()
    if api is not None:
        with api, _api_errors(api):
            _submit_remote(api, provider, fields, wait, timeout, as_json)
        return
    from worker.api import get_job, submit_variation

    _require_database()
    try:
        job = submit_variation(provider, **fields)
    except ValueError as exc:
        _fail_usage(exc)
    if not wait:
        click.echo(json.dumps(_job_json(job), indent=2) if as_json else str(job.id))
        return
    if not as_json:
        click.echo(f"{job.id}  {provider}")
    job = _follow(job.id, get_job, lambda: None, timeout, quiet=as_json)
    _print_result(job, as_json)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job and its timeline.

    \b
    Exit codes:
      0  done (the job is queued, running, completed or cancelled)
      1  the job failed
      2  usage error: an unknown job id, a bad setting, a database not usable
    """
    api = _remote()
    if api is not None:
        with api, _api_errors(api, job_id):
            job: Any = _remote_view(api, api.jobs.get(job_id), events=api.jobs.events(job_id))
    else:
        from worker.api import JobNotFound, get_job

        _require_database()
        try:
            job = get_job(job_id)
        except JobNotFound as exc:
            raise click.BadParameter(str(exc), param_hint="JOB_ID") from None
    if not as_json:
        click.echo(f"{job.id}  {job.provider}  {job.status}  {job.progress}%")
        for event in job.events:
            click.echo("  " + _event_line(event))
    _print_result(job, as_json)


@cli.command("list")
@click.option(
    "--status", "statuses", multiple=True, type=click.Choice([s.value for s in JobStatus])
)
@click.option("--provider", type=click.Choice(KNOWN_PROVIDERS))
@click.option("--since", help="Only jobs created since: 30m, 2h, 7d or an ISO date.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_jobs(
    statuses: tuple[str, ...], provider: str | None, since: str | None, limit: int, as_json: bool
) -> None:
    """List jobs, newest first."""
    try:
        since_at = _parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    api = _remote()
    jobs: list[Any]
    if api is not None:
        with api, _api_errors(api):
            listed = api.jobs.list(
                status=statuses or None,
                provider=provider,
                created_since=since_at,
                limit=min(limit, API_PAGE_SIZE),
            )
            jobs = [_remote_view(api, job) for job in islice(listed, limit)]
    else:
        from worker.api import list_jobs as query

        _require_database()
        jobs = list(query(statuses=statuses, provider=provider, since=since_at, limit=limit))
    if as_json:
        click.echo(json.dumps([_job_json(j) for j in jobs], indent=2))
        return
    click.echo(f"{'ID':36}  {'PROVIDER':9}  {'STATUS':10}  {'%':>3}  CREATED (UTC)        ERROR")
    for job in jobs:
        click.echo(
            f"{job.id!s:36}  {job.provider:9}  {job.status:10}  {job.progress:>3}  "
            f"{job.created_at:%Y-%m-%d %H:%M:%S}  {job.error_code or ''}"
        )


@cli.command("accounts")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accounts_command(as_json: bool) -> None:
    """Provider accounts: slots in use, today's jobs, failed tasks and spend against
    their limits, pause, breaker, and the provider's jobs waiting for capacity.

    Keys are shown by fingerprint only (8 hex digits of their SHA-256). Reads this
    host's settings and database, as the tokens commands do.
    """
    from worker import capacity
    from worker.celery_app import build_runtime
    from worker.models import utcnow

    _require_database((*VARIFLOW_TABLES, "account_states"))
    rt = runtimes.ensure(lambda: build_runtime(_settings()))
    every = tuple(a for name in rt.settings.provider_names for a in rt.providers.accounts(name))
    with rt.session() as session:
        statuses = capacity.snapshot(session, every, utcnow(), rt.settings.breaker_threshold)
    rows = [_account_json(status) for status in statuses]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(_table(_ACCOUNT_HEADINGS, [_account_cells(row) for row in rows]))


_ACCOUNT_HEADINGS = (
    "ACCOUNT",
    "KEY",
    ">SLOTS",
    ">JOBS TODAY",
    ">FAILED",
    ">SPEND",
    "BREAKER",
    ">WAITING",
    "PAUSED",
)


def _account_json(status: Any) -> dict[str, Any]:
    """A capacity.AccountStatus as --json prints it: never the key, its fingerprint."""
    account = status.account
    paused = status.paused_until is not None
    return {
        "provider": account.provider,
        "account": account.name,
        "fingerprint": account.fingerprint,
        "in_flight": status.usage.in_flight,
        "jobs_today": status.usage.jobs_today,
        "failed_today": status.usage.failed_today,
        "spend_today": status.spend_today,
        "limits": dataclasses.asdict(account.limits),
        "waiting": status.waiting,
        "paused_until": status.paused_until,
        # The reason of a pause that is over is history, not state.
        "pause_reason": status.pause_reason if paused else None,
        "breaker": status.breaker,
        "opened_until": status.opened_until if status.breaker != "closed" else None,
        "failures": status.failures,
    }


def _account_cells(row: dict[str, Any]) -> list[str]:
    limits = row["limits"]

    def of(used: object, limit: object) -> str:
        return f"{used}/{'-' if limit is None else limit}"

    def amount(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}".rstrip("0").rstrip(".")

    breaker = row["breaker"]
    if breaker == "open":
        breaker = f"open until {row['opened_until']:%H:%M:%S} UTC"
    paused = "-"
    if row["paused_until"] is not None:
        paused = f"until {row['paused_until']:%H:%M:%S} UTC"
        if row["pause_reason"]:
            paused += f": {row['pause_reason']}"
    return [
        f"{row['provider']}/{row['account']}",
        row["fingerprint"],
        of(row["in_flight"], limits["max_in_flight"]),
        of(row["jobs_today"], limits["daily_jobs"]),
        of(row["failed_today"], limits["daily_failed"]),
        f"{amount(row['spend_today'])}/{amount(limits['daily_spend_cap'])}",
        breaker,
        str(row["waiting"]),
        _printable(paused),
    ]


def _printable(text: str) -> str:
    # A pause reason is the provider's text: no escape sequence of theirs reaches a terminal.
    return "".join(c if c.isprintable() else "?" for c in text)


def _table(headings: tuple[str, ...], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; a heading starting with ">" is right-aligned.
    The last column is not padded (a long pause reason does not widen every line)."""
    names = [h.lstrip(">") for h in headings]
    widths = [max(len(cell) for cell in column) for column in zip(names, *rows, strict=False)]
    lines = []
    for cells in [names, *rows]:
        padded = [
            cell.rjust(width) if heading.startswith(">") else cell.ljust(width)
            for heading, cell, width in zip(headings[:-1], cells, widths, strict=False)
        ]
        lines.append("  ".join([*padded, cells[-1]]))
    return "\n".join(lines)


@cli.command("beat-health")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds since the last check still healthy. Default: the beat's lease TTL.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def beat_health(max_age: float | None, as_json: bool) -> None:
    """Exit 0 if this host's beat checked its lease recently, else 1 (a health check).

    Every beat renews or checks its lease in the database every third of
    VARIFLOW_BEAT_LEASE_TTL and, after each check that reached the database,
    records it in VARIFLOW_HOME/beat/<host name>.json, which this reads: healthy
    when that was at most one TTL ago (two checks missed), leader or standby alike.
    """
    from worker.beat_leader import Liveness, liveness_file

    path = liveness_file(_settings().home)
    record = Liveness.read(path)
    if record is None:
        if as_json:
            click.echo(json.dumps({"healthy": False, "record": str(path)}))
        else:
            click.echo(f"unhealthy: no beat has checked its lease on this host ({path})")
        sys.exit(1)
    age = time.time() - record.checked_at
    healthy = age <= (max_age or record.ttl)
    if as_json:
        click.echo(json.dumps({"healthy": healthy, "age": round(age, 3), **vars(record)}))
    else:
        role = "leads" if record.leading else "stands by"
        state = "healthy" if healthy else "unhealthy"
        click.echo(f"{state}: beat {record.beat_id} {role}; lease checked {age:.1f}s ago")
    sys.exit(0 if healthy else 1)


@cli.group()
def tokens() -> None:
    """Bearer tokens of the HTTP API (only their hashes are stored)."""


def _tokens_session() -> Any:
    from worker import runtime as runtimes
    from worker.celery_app import build_runtime

    _require_database((*VARIFLOW_TABLES, "api_tokens"))
    return runtimes.ensure(lambda: build_runtime(_settings())).session()


@tokens.command("create")
@click.argument("name")
@click.option("--tenant", help="Whose jobs it sees and creates. Default: NAME.")
@click.option("--admin", is_flag=True, help="It sees every tenant's jobs.")
def tokens_create(name: str, tenant: str | None, admin: bool) -> None:
    """Issue a token; its secret is printed once, here, and never again."""
    from worker import tokens as api_tokens
    from worker.errors import InvalidInput

    try:
        with _tokens_session() as session:
            info, secret = api_tokens.issue(session, name, tenant, admin=admin)
    except InvalidInput as exc:
        raise click.BadParameter(exc.message, param_hint=exc.field.upper()) from None
    click.echo(secret)
    click.echo(
        f"token {info.name!r} for tenant {info.tenant!r}{' (admin)' if info.admin else ''}: "
        "keep the line above, it is not stored",
        err=True,
    )


@tokens.command("list")
def tokens_list() -> None:
    """Every token: name, tenant, admin, created, revoked (never a secret)."""
    from worker import tokens as api_tokens

    with _tokens_session() as session:
        listed = api_tokens.listed(session)
    for info in listed:
        revoked = f"revoked {info.revoked_at:%Y-%m-%d %H:%M:%S}" if info.revoked_at else "active"
        admin = "admin" if info.admin else "-"
        click.echo(
            f"{info.name}\t{info.tenant}\t{admin}\t{info.created_at:%Y-%m-%d %H:%M:%S}\t{revoked}"
        )


@tokens.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Revoke a token at once (its name is not reused)."""
    from worker import tokens as api_tokens

    try:
        with _tokens_session() as session:
            info = api_tokens.revoke(session, name)
    except api_tokens.TokenNotFound as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    click.echo(f"{info.name}  revoked")


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job (a task already created upstream is cancelled there, best effort)."""
    api = _remote()
    if api is not None:
        with api, _api_errors(api, job_id):
            cancelled = api.jobs.cancel(job_id)
        click.echo(f"{cancelled.id}  {cancelled.status}")
        return
    from worker.api import JobNotFound, cancel_job

    _require_database()
    try:
        job = cancel_job(job_id)
    except JobNotFound as exc:
        raise click.BadParameter(str(exc), param_hint="JOB_ID") from None
    click.echo(f"{job.id}  {job.status}")


@cli.command()
@click.option("--port", default=8000, show_default=True, type=int, help="Webhook app port.")
@click.option("--sandbox-port", default=8100, show_default=True, type=int)
def dev(port: int, sandbox_port: int) -> None:
    """Run sandbox + webhooks + worker + beat in this terminal, against the sandbox."""
    from honcho.manager import Manager

    from worker.devstack import sandbox_env
    from worker.migrate import upgrade

    env = {
        **os.environ,
        "VARIFLOW_PORT": str(port),
        "VARIFLOW_PUBLIC_URL": f"http://127.0.0.1:{port}",
        **sandbox_env(f"http://127.0.0.1:{sandbox_port}"),
    }
    os.environ.update(env)
    reset_settings()
    upgrade(_settings().database_url)
    me = f"{sys.executable} -m"
    manager = Manager()
    manager.add_process("sandbox", f"{me} worker.cli sandbox --port {sandbox_port}", env=env)
    manager.add_process("web", f"{me} worker.cli serve --port {port} --workers 1", env=env)
    manager.add_process("worker", f"{me} celery -A worker.celery_app worker -l INFO", env=env)
    manager.add_process("beat", f"{me} celery -A worker.celery_app beat -l INFO", env=env)
    manager.loop()
    sys.exit(manager.returncode)


@cli.command()
@click.option("--keep", is_flag=True, help="Leave the processes running until Ctrl-C.")
def demo(keep: bool) -> None:
    """Run one job per provider end to end on the embedded default, against the sandbox."""
    from worker.api import get_job, submit_variation
    from worker.devstack import Stack, free_port, sandbox_env
    from worker.migrate import upgrade

    settings = _settings()
    home = settings.home.resolve()
    sandbox_port, web_port = free_port(), free_port()
    web_url = f"http://127.0.0.1:{web_port}"
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    env = {"VARIFLOW_HOME": str(home), "VARIFLOW_PUBLIC_URL": web_url, **sandbox_env(sandbox_url)}
    os.environ.update(env)
    reset_settings()
    settings = _settings()
    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    click.echo(f"database: {shown}")
    click.echo(f"broker:   {settings.broker_url} ({settings.broker_folder})")
    click.echo(f"results:  {settings.results_folder}")
    upgrade(settings.database_url)
    input_png = _demo_input_image(home / "demo-input.png")

    with Stack(env, home / "logs") as stack:
        stack.start_sandbox(sandbox_port)
        stack.start_web(web_port, workers=1)
        stack.start_worker()
        stack.start_beat()
        click.echo(
            f"sandbox, webhooks ({web_url}), worker and beat are up; logs in {home / 'logs'}"
        )
        jobs = [
            submit_variation(
                "piapi", origin_task_id="demo-imagine-task", index="1", prompt="a lighthouse"
            ),
            submit_variation("piclaza", image=input_png),
            submit_variation("lemondata", image=input_png.read_bytes(), n=2, size="256x256"),
        ]
        finished = []
        for job in jobs:
            click.echo(f"\n{job.provider} job {job.id}")
            done = _follow(job.id, get_job, stack.check_alive, timeout=120)
            # Archival runs just after the end: show where the files went.
            done = _wait_archived(done.id, get_job, timeout=30)
            _print_result(done, as_json=False, exit_on_failure=False)
            finished.append(done)
        if keep:
            click.echo("\nrunning; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    sys.exit(EXIT_OK if all(j.status == "completed" for j in finished) else EXIT_JOB_FAILED)


def _demo_input_image(path: Path) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (256, 256), (24, 40, 72))
    ImageDraw.Draw(image).ellipse((48, 48, 208, 208), fill=(240, 180, 60))
    image.save(path, format="PNG")
    return path


def _wait_archived(job_id: Any, get_job: Callable[[Any], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(job_id)
        if job.status != "completed" or job.archived_urls or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def _print_result(job: Any, as_json: bool, exit_on_failure: bool = True) -> None:
    if as_json:
        click.echo(json.dumps(_job_json(job), indent=2))
    else:
        click.echo(f"status: {job.status}")
        if job.error_code or job.error_message:
            click.echo(f"error:  {job.error_code}: {job.error_message}")
        for url in job.result_urls:
            click.echo(f"result:   {url}")
        # Read only when there are archived files to show: a remote job has none here, and
        # the remote mode reads no settings.
        settings = _settings() if job.archived_urls else None
        for url in job.archived_urls:
            assert settings is not None
            if settings.results_bucket is not None:  # in object storage: served at its URL
                click.echo(f"archived: {url}")
                continue
            local = settings.results_folder / url.split("/results/", 1)[-1]
            click.echo(f"archived: {local}")
    if exit_on_failure and job.status == "failed":
        sys.exit(EXIT_JOB_FAILED)


def _param_value(text: str) -> Any:
    """A --param value: JSON when it parses (numbers, true/false), the text otherwise."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_since(value: str) -> datetime:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[:-1].isdigit() and value[-1:] in units:
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not like 30m, 2h, 7d or an ISO date") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _follow(
    job_id: Any,
    get_job: Callable[[Any], Any],
    check: Callable[[], None],
    timeout: float,
    quiet: bool = False,
) -> Any:
    """Print a job's events as they happen until it is terminal."""
    shown = 0
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(job_id)
        for event in job.events[shown:] if not quiet else ():
            click.echo("  " + _event_line(event))
        shown = len(job.events)
        if job.is_terminal:
            return job
        if time.monotonic() > deadline:
            raise TimedOut(f"job {job_id} not finished after {timeout:g}s (still {job.status})")
        check()
        time.sleep(0.2)


def _event_line(event: Any) -> str:
    move = (
        f"{event.from_status or '-'} -> {event.to_status}"
        if event.from_status != event.to_status
        else f"{event.to_status}"
    )
    text = f"{event.at:%H:%M:%S.%f}"[:-3] + f"  {event.source:<8} {event.kind:<10} {move}"
    return text + (f"  ({event.message})" if event.message else "")


def _job_json(job: Any) -> dict[str, Any]:
    data = {k: v for k, v in vars(job).items() if k != "events"}
    data["events"] = [vars(e) for e in job.events]
    plain: dict[str, Any] = json.loads(json.dumps(data, default=str))
    return plain


# --- the remote mode: the job commands through the HTTP API ------------------------------


def remote_client(url: str, token: str) -> variflow_client.Client:
    """The API client of the remote mode (the tests replace this function)."""
    try:
        # Deferred, and optional: only the remote mode needs it (a separate distribution).
        from variflow_client import Client
    except ImportError:
        raise CliError(
            f"{API_URL_VARIABLE} is set but the API client is not installed: "
            "pip install variflow-client (clients/python; `make` installs it)"
        ) from None
    return Client(url, token)


def _remote() -> variflow_client.Client | None:
    """The API client when the environment names an API, None to use the database."""
    url = os.environ.get(API_URL_VARIABLE, "").strip()
    token = os.environ.get(API_TOKEN_VARIABLE, "").strip()
    if not url and not token:
        return None
    if not url or not token:
        missing = API_TOKEN_VARIABLE if url else API_URL_VARIABLE
        raise CliError(
            f"{missing} is not set: set both {API_URL_VARIABLE} and {API_TOKEN_VARIABLE} "
            "to use an API, or neither to use the database"
        )
    return remote_client(url, token)


@contextmanager
def _api_errors(api: variflow_client.Client, job_id: str | None = None) -> Iterator[None]:
    """The client's exceptions as one line and exit code 2, as the local mode's are."""
    import variflow_client as vc

    where = f"the API at {api.base_url}"
    try:
        yield
    except vc.InvalidInput as exc:
        field, detail = exc.field, exc.detail or exc.title
        named = detail if not field or detail.startswith(f"{field}:") else f"{field}: {detail}"
        raise CliError(named) from None
    except vc.NotFound as exc:
        if job_id is None:
            raise CliError(f"{where} answered {exc}") from None
        raise click.BadParameter(f"no job with id {job_id}", param_hint="JOB_ID") from None
    except vc.Conflict as exc:
        raise CliError(
            f"idempotency_key: {exc.detail or exc.title} (it made job {exc.job_id})"
        ) from None
    except vc.AuthenticationError as exc:
        raise CliError(f"{where} refused the token ({exc}); check {API_TOKEN_VARIABLE}") from None
    except vc.APIError as exc:
        raise CliError(f"{where} answered {exc}") from None
    except vc.NetworkError as exc:
        raise CliError(f"cannot reach {where}: {exc}; check {API_URL_VARIABLE}") from None
    except vc.InvalidResponse as exc:
        raise CliError(f"{where} gave an answer this client does not understand: {exc}") from None


# The options of submit that are not a provider's input field.
_SUBMIT_OPTIONS = ("image", "idempotency_key", "deadline", "notify_url", "on_complete_task")


def _submit_remote(
    api: variflow_client.Client,
    provider: str,
    fields: dict[str, Any],
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    import variflow_client as vc

    if "on_complete_task" in fields:
        raise click.BadParameter(
            "a Celery task of the server's own; not available through the API (use --notify-url)",
            param_hint="--on-complete-task",
        )
    job_input = {k: v for k, v in fields.items() if k not in _SUBMIT_OPTIONS}
    image: Path | None = None
    if "image" in fields:
        source = str(fields["image"])
        if "://" in source:  # a URL: the server fetches it (and names it if it is not http/s)
            job_input["image_url"] = source
        elif Path(source).is_file():  # a local file: uploaded as multipart/form-data
            image = Path(source)
        else:
            raise CliError(f"image: no file at {source} (give an http(s) URL or a file's path)")
    try:
        job = api.jobs.create(
            provider,
            job_input,
            image=image,
            deadline=fields.get("deadline"),
            notify_url=fields.get("notify_url"),
            idempotency_key=fields.get("idempotency_key"),
        )
    except OSError as exc:
        raise CliError(f"image: cannot read {image}: {exc.strerror or exc}") from None
    if not wait:
        events = api.jobs.events(job.id) if as_json else ()
        view = _remote_view(api, job, events=events)
        click.echo(json.dumps(_job_json(view), indent=2) if as_json else view.id)
        return
    if not as_json:
        click.echo(f"{job.id}  {provider}")
    try:
        job = api.jobs.wait(job.id, timeout=timeout)
    except vc.JobFailed as exc:
        job = exc.job  # failed or cancelled: printed below, as the local mode does
    except vc.WaitTimeout as exc:
        raise TimedOut(
            f"job {job.id} not finished after {timeout:g}s (still {exc.job.status})"
        ) from None
    view = _remote_view(api, job, events=api.jobs.events(job.id))
    if not as_json:
        for event in view.events:
            click.echo("  " + _event_line(event))
    _print_result(view, as_json)


@dataclass(frozen=True)
class RemoteJob:
    """A job of the API with the attributes of worker.api.JobInfo that the output uses, so
    that both modes print alike (the same --json keys, plus metadata and results)."""

    id: str
    provider: str
    status: str
    params: dict[str, Any]
    idempotency_key: str | None
    upstream_task_id: str | None
    result_urls: list[str]
    archived_urls: list[str]
    progress: int
    error_code: str | None
    error_message: str | None
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    events: tuple[Any, ...]
    tenant: str | None
    metadata: dict[str, str]
    results: list[dict[str, Any]]
    priority: int = 0
    account: str | None = None  # not shown by the API
    waiting_reason: str | None = None
    cost: float | None = None


def _remote_view(
    api: variflow_client.Client, job: variflow_client.Job, events: Any = ()
) -> RemoteJob:
    # A result's link is the provider's when it gave one (as the local mode shows), else
    # this API's own (it needs the token: `variflow_client` jobs.download).
    return RemoteJob(
        id=job.id,
        provider=job.provider,
        status=job.status,
        params=dict(job.input),
        idempotency_key=job.idempotency_key,
        upstream_task_id=None,  # not shown by the API
        result_urls=[r.provider_url or f"{api.base_url}{r.url}" for r in job.results],
        archived_urls=[],  # files of the server's disk
        progress=job.progress,
        error_code=job.error.code if job.error else None,
        error_message=job.error.message if job.error else None,
        deadline=job.deadline,
        created_at=job.created_at,
        updated_at=job.updated_at,
        submitted_at=job.submitted_at,
        completed_at=job.completed_at,
        events=tuple(events),
        tenant=job.tenant,
        metadata=dict(job.metadata),
        results=[
            {"index": r.index, "url": r.url, "provider_url": r.provider_url} for r in job.results
        ],
        priority=job.priority,
        waiting_reason=job.waiting_reason,
        cost=job.cost,
    )


def main() -> None:
    cli(prog_name="variflow")


if __name__ == "__main__":
    main()
