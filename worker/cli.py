"""The `variflow` command."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import httpx

from worker.config import ConfigError, get_settings, reset_settings


class VariflowGroup(click.Group):
    """Turns configuration errors into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None


@click.group(cls=VariflowGroup)
def cli() -> None:
    """variflow: image-variation jobs against PiAPI, Piclaza and LemonData."""


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
def serve(host: str | None, port: int | None, workers: int) -> None:
    """Run the webhook receiver under gunicorn."""
    settings = get_settings()
    bind = f"{host or settings.host}:{port or settings.port}"
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            bind,
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            "4",
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
    auth = get_settings().flower_basic_auth
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

    upgrade(get_settings().database_url, revision)
    click.echo(f"database at revision {revision}")


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job and its timeline."""
    from worker.api import JobNotFound, get_job

    try:
        job = get_job(job_id)
    except JobNotFound as exc:
        raise click.BadParameter(str(exc), param_hint="JOB_ID") from None
    if as_json:
        click.echo(json.dumps(_job_json(job), indent=2))
        return
    click.echo(f"{job.id}  {job.provider}  {job.status}  {job.progress}%")
    for event in job.events:
        click.echo("  " + _event_line(event))
    for url in job.result_urls:
        click.echo(f"  result: {url}")
    if job.status == "failed":
        sys.exit(1)


@cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job."""
    from worker.api import JobNotFound, cancel_job

    try:
        job = cancel_job(job_id)
    except JobNotFound as exc:
        raise click.BadParameter(str(exc), param_hint="JOB_ID") from None
    click.echo(f"{job.id}  {job.status}")


@cli.command()
@click.option("--keep", is_flag=True, help="Leave the processes running until Ctrl-C.")
def demo(keep: bool) -> None:
    """Run one job end to end on the embedded default, against the sandbox."""
    from worker.api import get_job, submit_variation
    from worker.devstack import Stack, free_port, sandbox_env
    from worker.migrate import upgrade

    settings = get_settings()
    home = settings.home.resolve()
    sandbox_port, web_port = free_port(), free_port()
    web_url = f"http://127.0.0.1:{web_port}"
    env = {
        "VARIFLOW_HOME": str(home),
        "VARIFLOW_PUBLIC_URL": web_url,
        **sandbox_env(f"http://127.0.0.1:{sandbox_port}"),
    }
    os.environ.update(env)
    reset_settings()
    settings = get_settings()
    click.echo(f"database: {settings.database_url}")
    click.echo(f"broker:   {settings.broker_url} ({settings.broker_folder})")
    upgrade(settings.database_url)

    with Stack(env, home / "logs") as stack:
        stack.start_sandbox(sandbox_port)
        stack.start_web(web_port, workers=1)
        stack.start_worker()
        stack.start_beat()
        click.echo(
            f"sandbox, webhooks ({web_url}), worker and beat are up; logs in {home / 'logs'}"
        )
        job = submit_variation(
            "piapi",
            origin_task_id="demo-imagine-task",
            index="1",
            prompt="a lighthouse at dusk, oil painting",
        )
        click.echo(f"\npiapi job {job.id}")
        job = _follow(job.id, get_job, stack.check_alive, timeout=120)
        saved = _save_results(job.result_urls, home / "results" / str(job.id))
        click.echo(f"\nstatus: {job.status}")
        if job.error_message:
            click.echo(f"error:  {job.error_code}: {job.error_message}")
        for url, path in saved:
            click.echo(f"image:  {url}\n   ->   {path}")
        if keep:
            click.echo("\nrunning; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    sys.exit(0 if job.status == "completed" else 1)


def _follow(
    job_id: Any, get_job: Callable[[Any], Any], check: Callable[[], None], timeout: float
) -> Any:
    """Print a job's events as they happen until it is terminal."""
    shown = 0
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(job_id)
        for event in job.events[shown:]:
            click.echo("  " + _event_line(event))
        shown = len(job.events)
        if job.is_terminal:
            return job
        if time.monotonic() > deadline:
            raise click.ClickException(f"job {job_id} not finished after {timeout:g}s")
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


def _save_results(urls: list[str], folder: Path) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    with httpx.Client(timeout=30) as client:
        for n, url in enumerate(urls, 1):
            path = folder / f"{n}.png"
            path.write_bytes(client.get(url).raise_for_status().content)
            saved.append((url, path))
    return saved


def _job_json(job: Any) -> dict[str, Any]:
    data = {k: v for k, v in vars(job).items() if k != "events"}
    data["events"] = [vars(e) for e in job.events]
    plain: dict[str, Any] = json.loads(json.dumps(data, default=str))
    return plain


def main() -> None:
    cli(prog_name="variflow")


if __name__ == "__main__":
    main()
