"""The `variflow` command (worker/cli.py) through click's CliRunner, on the embedded SQLite.

Exit codes: 0 done, 1 the job failed, 2 a usage or input error whose message names the field
(or the setting, or the database), 3 a --wait that timed out. A job command never creates a
database: a missing, unreachable or empty one is one line naming its URL.
A valid submit sends its Celery message to the filesystem broker under VARIFLOW_HOME (a
temporary folder): nothing runs it, which is harmless here.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import hashlib
import io
import json
import os
import socket
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import func, select, update
from variflow_client import Client

from worker import runtime
from worker.api import JobInfo, get_job, submit_variation
from worker.cli import cli
from worker.config import ConfigError, Settings, reset_settings
from worker.jobs import apply_update, lock_job
from worker.models import AccountState, Job, JobEvent, utcnow
from worker.runtime import session_scope
from worker.states import JobStatus, Source, UpstreamState

Configure = Callable[..., Settings]

PIAPI = ["piapi", "--origin-task-id", "imagine-1", "--index", "1", "--prompt", "a red fox"]
PIAPI_FIELDS: dict[str, Any] = {"origin_task_id": "imagine-1", "index": "1", "prompt": "a fox"}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def db(sqlite_url: str) -> Iterator[str]:
    yield sqlite_url


def run(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(cli, list(args), prog_name="variflow")


def job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def event_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(JobEvent)) or 0)


def square_png(path: Path, size: int = 32) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 120, 200)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def finish(job_id: uuid.UUID, state: UpstreamState) -> JobInfo:
    """Move a job on the way a worker would: apply_update on the locked row."""
    with session_scope() as session:
        job = lock_job(session, job_id)
        assert job is not None
        assert apply_update(session, job, state).applied
    return get_job(job_id)


def fail(job_id: uuid.UUID) -> JobInfo:
    return finish(
        job_id,
        UpstreamState(
            JobStatus.FAILED,
            Source.POLL,
            error_code="upstream_failed",
            error_message="the provider lost the image",
        ),
    )


def complete(job_id: uuid.UUID) -> JobInfo:
    return finish(
        job_id,
        UpstreamState(
            JobStatus.COMPLETED,
            Source.POLL,
            upstream_task_id=f"task-{job_id.hex[:8]}",
            image_urls=("https://cdn.example.test/1.png", "https://cdn.example.test/2.png"),
        ),
    )


def set_created_at(job_id: uuid.UUID, when: datetime) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(created_at=when))


# --- submit: input errors exit 2, name the field, store nothing -------------------------

BAD_SUBMITS: list[tuple[list[str], str]] = [
    (["piapi", "--origin-task-id", "o", "--index", "9", "--prompt", "p"], "index"),
    (["piapi", "--origin-task-id", "o", "--index", "1"], "prompt"),
    (["piapi", "--index", "1", "--prompt", "p"], "origin_task_id"),
    ([*PIAPI, "--aspect-ratio", "wide"], "aspect_ratio"),
    ([*PIAPI, "--image", "https://example.test/cat.png"], "image"),
    ([*PIAPI, "--deadline", "-5"], "deadline"),
    ([*PIAPI, "--idempotency-key", ""], "idempotency_key"),
    ([*PIAPI, "--notify-url", "ftp://example.test/hook"], "notify_url"),
    ([*PIAPI, "--notify-url", "not a url"], "notify_url"),
    ([*PIAPI, "--on-complete-task", "  "], "on_complete_task"),
    (["lemondata", "--image", "https://example.test/cat.png", "--n", "11"], "n"),
    (["lemondata", "--image", "https://example.test/cat.png", "--n", "0"], "n"),
    (["lemondata", "--image", "https://example.test/cat.png", "--size", "7x7"], "size"),
    (
        ["lemondata", "--image", "https://example.test/cat.png", "--response-format", "gif"],
        "response_format",
    ),
    (["lemondata"], "image"),
    (["piclaza"], "image"),
    (["piclaza", "--image", "./no/such/file.png"], "image"),
    (["piclaza", "--image", "ftp://example.test/cat.png"], "image"),
]


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize(
    ("args", "field"), BAD_SUBMITS, ids=[f"{a[0]}-{f}-{i}" for i, (a, f) in enumerate(BAD_SUBMITS)]
)
def test_bad_submit_exits_2_naming_the_field_and_stores_nothing(
    runner: CliRunner, args: list[str], field: str
) -> None:
    result = run(runner, "submit", *args)

    assert result.exit_code == 2, result.output
    assert f"{field}:" in result.output
    assert "Traceback" not in result.output
    assert (job_count(), event_count()) == (0, 0)


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize("provider", ["nope", "PIAPI", "midjourney"])
def test_submit_to_an_unknown_provider_exits_2(runner: CliRunner, provider: str) -> None:
    result = run(runner, "submit", provider, "--prompt", "p")

    assert result.exit_code == 2, result.output
    assert f"{provider!r} is not one of 'piapi', 'piclaza', 'lemondata'" in result.output
    assert job_count() == 0


@pytest.mark.usefixtures("db")
def test_submit_with_a_non_numeric_n_exits_2_naming_the_option(runner: CliRunner) -> None:
    result = run(runner, "submit", "lemondata", "--image", "https://example.test/a.png", "--n", "x")

    assert result.exit_code == 2, result.output
    assert "--n" in result.output
    assert job_count() == 0


@pytest.mark.usefixtures("db")
def test_submit_a_provider_that_is_not_enabled_exits_2(
    runner: CliRunner, configure: Configure
) -> None:
    configure(providers="piclaza")

    result = run(runner, "submit", *PIAPI)

    assert result.exit_code == 2, result.output
    assert "provider:" in result.output
    assert "VARIFLOW_PROVIDERS" in result.output
    assert job_count() == 0


# --- submit: a valid job ----------------------------------------------------------------


@pytest.mark.usefixtures("db")
def test_valid_submit_prints_the_job_id(runner: CliRunner) -> None:
    result = run(runner, "submit", *PIAPI, "--idempotency-key", "order-1", "--deadline", "120")

    assert result.exit_code == 0, result.output
    job_id = uuid.UUID(result.output.strip())
    job = get_job(job_id)
    assert job.status == "queued"
    assert job.provider == "piapi"
    assert job.params == {"origin_task_id": "imagine-1", "index": "1", "prompt": "a red fox"}
    assert job.idempotency_key == "order-1"
    remaining = job.deadline - datetime.now(UTC)
    assert timedelta(seconds=100) < remaining <= timedelta(seconds=120)
    assert job_count() == 1


@pytest.mark.usefixtures("db")
def test_submit_with_the_same_idempotency_key_prints_the_same_id(runner: CliRunner) -> None:
    first = run(runner, "submit", *PIAPI, "--idempotency-key", "k-7")
    second = run(runner, "submit", *PIAPI, "--idempotency-key", "k-7")

    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert first.output == second.output
    assert job_count() == 1


@pytest.mark.usefixtures("db")
def test_submit_json_prints_the_stored_job(runner: CliRunner) -> None:
    result = run(
        runner,
        "submit",
        *PIAPI,
        "--notify-url",
        "https://app.example.test/hooks/variflow",
        "--on-complete-task",
        "myapp.done",
        "--json",
    )

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["status"] == "queued"
    assert data["provider"] == "piapi"
    assert data["params"]["prompt"] == "a red fox"
    assert data["result_urls"] == [] and data["archived_urls"] == []
    assert [(e["source"], e["to_status"]) for e in data["events"]] == [("api", "queued")]
    stored = get_job(data["id"])
    assert stored.status == "queued"
    with session_scope() as session:
        job = session.get(Job, stored.id)
        assert job is not None
        assert job.notify_url == "https://app.example.test/hooks/variflow"
        assert job.on_complete_task == "myapp.done"


@pytest.mark.usefixtures("db")
def test_submit_a_local_image_file(runner: CliRunner, tmp_path: Path) -> None:
    image = square_png(tmp_path / "cat.png")

    piclaza = run(runner, "submit", "piclaza", "--image", str(image))
    lemondata = run(runner, "submit", "lemondata", "--image", str(image), "--n", "2")

    assert piclaza.exit_code == 0, piclaza.output
    assert lemondata.exit_code == 0, lemondata.output
    assert get_job(piclaza.output.strip()).provider == "piclaza"
    job = get_job(lemondata.output.strip())
    assert job.params["n"] == 2
    assert "image_url" not in job.params  # the file's bytes are stored with the job


@pytest.mark.usefixtures("db")
def test_submit_takes_any_provider_field_as_a_param(runner: CliRunner, tmp_path: Path) -> None:
    # A provider's fields need no option of their own: a new provider needs no CLI change.
    image = square_png(tmp_path / "cat.png")

    result = run(runner, "submit", "piclaza", "--image", str(image), "-p", "grouping=true")
    unknown = run(runner, "submit", "piclaza", "--image", str(image), "--param", "colour=red")
    malformed = run(runner, "submit", "piclaza", "--image", str(image), "--param", "grouping")

    assert result.exit_code == 0, result.output
    assert get_job(result.output.strip()).params == {"grouping": True}
    assert unknown.exit_code == 2
    assert "colour:" in unknown.output
    assert malformed.exit_code == 2
    assert "NAME=VALUE" in malformed.output
    assert job_count() == 1


@pytest.mark.usefixtures("db")
def test_submit_a_non_square_png_to_lemondata_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (40, 20)).save(path, format="PNG")

    result = run(runner, "submit", "lemondata", "--image", str(path))

    assert result.exit_code == 2, result.output
    assert "image:" in result.output and "square" in result.output
    assert job_count() == 0


# --- status -----------------------------------------------------------------------------


@pytest.mark.usefixtures("db")
def test_status_shows_the_timeline(runner: CliRunner) -> None:
    job = submit_variation("piapi", **PIAPI_FIELDS)
    done = complete(job.id)

    result = run(runner, "status", str(job.id))

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [str(job.id), "piapi", "completed", "100%"]
    timeline = [line for line in lines if line.startswith("  ")]
    assert len(timeline) == len(done.events) == 2
    assert "api" in timeline[0] and "- -> queued" in timeline[0] and "(accepted)" in timeline[0]
    assert "poll" in timeline[1] and "queued -> completed" in timeline[1]
    assert "status: completed" in result.output
    assert "result:   https://cdn.example.test/1.png" in result.output
    assert "result:   https://cdn.example.test/2.png" in result.output


@pytest.mark.usefixtures("db")
def test_status_json_parses(runner: CliRunner) -> None:
    job = submit_variation("piapi", **PIAPI_FIELDS)
    complete(job.id)

    result = run(runner, "status", str(job.id), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["id"] == str(job.id)
    assert data["status"] == "completed"
    assert data["progress"] == 100
    assert data["result_urls"] == [
        "https://cdn.example.test/1.png",
        "https://cdn.example.test/2.png",
    ]
    assert [e["to_status"] for e in data["events"]] == ["queued", "completed"]
    datetime.fromisoformat(data["completed_at"])


@pytest.mark.usefixtures("db")
def test_status_of_a_failed_job_exits_1(runner: CliRunner) -> None:
    job = submit_variation("piapi", **PIAPI_FIELDS)
    fail(job.id)

    text = run(runner, "status", str(job.id))
    as_json = run(runner, "status", str(job.id), "--json")

    assert text.exit_code == 1, text.output
    assert "status: failed" in text.output
    assert "error:  upstream_failed: the provider lost the image" in text.output
    assert "queued -> failed" in text.output
    assert as_json.exit_code == 1, as_json.output
    data = json.loads(as_json.output)
    assert (data["status"], data["error_code"]) == ("failed", "upstream_failed")


@pytest.mark.usefixtures("db")
def test_status_of_a_queued_job_exits_0(runner: CliRunner) -> None:
    job = submit_variation("piapi", **PIAPI_FIELDS)

    result = run(runner, "status", str(job.id))

    assert result.exit_code == 0, result.output
    assert "status: queued" in result.output


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid"])
def test_status_of_an_unknown_job_exits_2(runner: CliRunner, job_id: str) -> None:
    result = run(runner, "status", job_id)

    assert result.exit_code == 2, result.output
    assert "JOB_ID" in result.output
    assert f"no job with id {job_id}" in result.output
    assert "Traceback" not in result.output


# --- list -------------------------------------------------------------------------------


@pytest.fixture
def some_jobs(db: str, tmp_path: Path) -> dict[str, uuid.UUID]:
    """A queued piapi job, a completed piclaza job, a failed piapi job three days old."""
    image = square_png(tmp_path / "in.png")
    queued = submit_variation("piapi", **PIAPI_FIELDS)
    done = submit_variation("piclaza", image=image)
    complete(done.id)
    old = submit_variation("piapi", **{**PIAPI_FIELDS, "prompt": "an old fox"})
    fail(old.id)
    set_created_at(old.id, datetime.now(UTC) - timedelta(days=3))
    return {"queued": queued.id, "completed": done.id, "failed": old.id}


def listed(result: Result) -> list[str]:
    """The job ids of a text listing, in order (the header line skipped)."""
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["ID", "PROVIDER", "STATUS"]
    return [line.split()[0] for line in lines[1:]]


def listed_json(result: Result) -> list[str]:
    return [job["id"] for job in json.loads(result.output)]


def test_list_shows_every_job_newest_first(
    runner: CliRunner, some_jobs: dict[str, uuid.UUID]
) -> None:
    result = run(runner, "list")

    assert result.exit_code == 0, result.output
    assert listed(result) == [
        str(some_jobs["completed"]),
        str(some_jobs["queued"]),
        str(some_jobs["failed"]),
    ]
    failed_line = next(
        line for line in result.output.splitlines() if str(some_jobs["failed"]) in line
    )
    assert "piapi" in failed_line and "failed" in failed_line and "upstream_failed" in failed_line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--status", "failed"], ["failed"]),
        (["--status", "queued", "--status", "completed"], ["completed", "queued"]),
        (["--status", "cancelled"], []),
        (["--provider", "piclaza"], ["completed"]),
        (["--provider", "piapi"], ["queued", "failed"]),
        (["--provider", "lemondata"], []),
        (["--since", "1d"], ["completed", "queued"]),
        (["--since", "90m"], ["completed", "queued"]),
        (["--since", "4d"], ["completed", "queued", "failed"]),
        (["--since", "2000-01-01"], ["completed", "queued", "failed"]),
        (["--since", "2999-01-01T00:00:00+00:00"], []),
        (["--provider", "piapi", "--since", "2h"], ["queued"]),
        (["--provider", "piapi", "--status", "failed", "--since", "7d"], ["failed"]),
        (["--limit", "1"], ["completed"]),
    ],
)
def test_list_filters(
    runner: CliRunner, some_jobs: dict[str, uuid.UUID], args: list[str], expected: list[str]
) -> None:
    want = [str(some_jobs[name]) for name in expected]

    text = run(runner, "list", *args)
    as_json = run(runner, "list", *args, "--json")

    assert text.exit_code == 0, text.output
    assert listed(text) == want
    assert as_json.exit_code == 0, as_json.output
    assert listed_json(as_json) == want


def test_list_json_carries_the_fields(runner: CliRunner, some_jobs: dict[str, uuid.UUID]) -> None:
    result = run(runner, "list", "--status", "completed", "--json")

    assert result.exit_code == 0, result.output
    [job] = json.loads(result.output)
    assert job["provider"] == "piclaza"
    assert job["status"] == "completed"
    assert len(job["result_urls"]) == 2
    assert job["events"] == []  # listings carry no timeline


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--since", "yesterday"], "--since"),
        (["--since", "5w"], "--since"),
        (["--status", "done"], "--status"),
        (["--provider", "dalle"], "--provider"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_list_with_a_bad_filter_exits_2_naming_it(
    runner: CliRunner, args: list[str], option: str
) -> None:
    result = run(runner, "list", *args)

    assert result.exit_code == 2, result.output
    assert option in result.output


@pytest.mark.usefixtures("db")
def test_list_of_no_jobs(runner: CliRunner) -> None:
    text = run(runner, "list")
    as_json = run(runner, "list", "--json")

    assert text.exit_code == 0 and listed(text) == []
    assert as_json.exit_code == 0 and json.loads(as_json.output) == []


# --- cancel -----------------------------------------------------------------------------


@pytest.mark.usefixtures("db")
def test_cancel_a_queued_job(runner: CliRunner) -> None:
    job = submit_variation("piapi", **PIAPI_FIELDS)

    result = run(runner, "cancel", str(job.id))

    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(job.id), "cancelled"]
    cancelled = get_job(job.id)
    assert cancelled.status == "cancelled"
    assert cancelled.error_code == "cancelled"
    assert [(e.source, e.to_status) for e in cancelled.events][-1] == ("cancel", "cancelled")


@pytest.mark.usefixtures("db")
def test_cancel_leaves_a_finished_job_as_it_is(runner: CliRunner) -> None:
    job = submit_variation("piapi", **PIAPI_FIELDS)
    complete(job.id)

    result = run(runner, "cancel", str(job.id))

    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(job.id), "completed"]
    assert get_job(job.id).status == "completed"


@pytest.mark.usefixtures("db")
@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "42"])
def test_cancel_an_unknown_job_exits_2(runner: CliRunner, job_id: str) -> None:
    result = run(runner, "cancel", job_id)

    assert result.exit_code == 2, result.output
    assert "JOB_ID" in result.output
    assert f"no job with id {job_id}" in result.output


# --- help -------------------------------------------------------------------------------

HELP: list[tuple[list[str], str]] = [
    ([], "image-variation jobs"),
    (["submit"], "Submit a variation job"),
    (["status"], "Show a job and its timeline"),
    (["list"], "List jobs"),
    (["cancel"], "Cancel a job"),
    (["serve"], "the /v1 API"),
    (["sandbox"], "emulator of the three provider APIs"),
    (["db"], "Database schema"),
    (["db", "upgrade"], "Apply migrations"),
    (["demo"], "one job per provider"),
    (["dev"], "sandbox + webhooks + worker + beat"),
    (["flower"], "Run Flower with basic auth"),
]


@pytest.mark.parametrize(
    ("command", "text"), HELP, ids=[" ".join(c) or "variflow" for c, _ in HELP]
)
def test_help(runner: CliRunner, command: list[str], text: str) -> None:
    result = run(runner, *command, "--help")

    assert result.exit_code == 0, result.output
    assert text in " ".join(result.output.split())
    assert "Usage: variflow" in result.output


def test_top_level_help_lists_every_command(runner: CliRunner) -> None:
    result = run(runner, "--help")

    assert result.exit_code == 0
    for command in ("submit", "status", "list", "cancel", "serve", "sandbox", "db", "demo"):
        assert f"  {command} " in result.output, command
    assert "  dev " in result.output and "  flower " in result.output


def test_submit_help_documents_the_provider_fields(runner: CliRunner) -> None:
    result = run(runner, "submit", "--help")

    for option in ("--origin-task-id", "--index", "--prompt", "--image", "--n", "--size"):
        assert option in result.output
    for option in ("--notify-url", "--on-complete-task", "--wait", "--json", "--deadline"):
        assert option in result.output


def test_unknown_command_exits_2(runner: CliRunner) -> None:
    result = run(runner, "frobnicate")

    assert result.exit_code == 2
    assert "frobnicate" in result.output


# --- flower and serve: never exec what they must not ------------------------------------


class Exec:
    """Stands in for os.execvp, which would replace the test process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, file: str, argv: list[str]) -> None:
        self.calls.append((file, list(argv)))


@pytest.fixture
def execvp(monkeypatch: pytest.MonkeyPatch) -> Exec:
    recorder = Exec()
    monkeypatch.setattr("worker.cli.os.execvp", recorder)
    # The command sets FLOWER_BASIC_AUTH; this makes monkeypatch remove it afterwards.
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "placeholder")
    return recorder


@pytest.mark.parametrize("auth", [None, "", "no-colon-here"])
def test_flower_without_basic_auth_exits_2_and_does_not_start(
    runner: CliRunner, configure: Configure, execvp: Exec, auth: str | None
) -> None:
    if auth is not None:
        configure(flower_basic_auth=auth)

    result = run(runner, "flower")

    assert result.exit_code == 2, result.output
    assert "VARIFLOW_FLOWER_BASIC_AUTH" in result.output
    assert "never run open" in result.output
    assert execvp.calls == []


def test_flower_with_basic_auth_passes_it_through_the_environment(
    runner: CliRunner, configure: Configure, execvp: Exec
) -> None:
    configure(flower_basic_auth="ops:s3cret-pw")

    result = run(runner, "flower", "--port", "5599", "--url_prefix=flower")

    assert result.exit_code == 0, result.output
    [(_, argv)] = execvp.calls
    assert argv[1:] == [
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "flower",
        "--port=5599",
        "--url_prefix=flower",
    ]
    assert not any("s3cret-pw" in arg for arg in argv)  # argv is visible to every local user
    assert os.environ["FLOWER_BASIC_AUTH"] == "ops:s3cret-pw"


def test_serve_binds_the_configured_port(
    runner: CliRunner, configure: Configure, execvp: Exec
) -> None:
    configure(port=8765, host="0.0.0.0", web_threads=24)

    default = run(runner, "serve")
    explicit = run(runner, "serve", "--port", "9001", "--workers", "3", "--threads", "6")

    assert default.exit_code == explicit.exit_code == 0, default.output + explicit.output
    (_, first), (_, second) = execvp.calls
    assert first[first.index("--bind") + 1] == "0.0.0.0:8765"
    assert first[first.index("--threads") + 1] == "24"
    assert second[second.index("--bind") + 1] == "0.0.0.0:9001"
    assert second[second.index("--workers") + 1] == "3"
    assert second[second.index("--threads") + 1] == "6"
    assert first[-1] == "webhooks.wsgi:app"


# --- configuration errors: exit 2 naming the variable -----------------------------------


@pytest.mark.parametrize("value", ["not a url", "ftp://example.test", "http://"])
@pytest.mark.parametrize(
    "command",
    [["status", str(uuid.UUID(int=1))], ["list"], ["submit", *PIAPI], ["serve"], ["db", "upgrade"]],
    ids=["status", "list", "submit", "serve", "db-upgrade"],
)
def test_a_bad_public_url_exits_2_naming_the_variable(
    runner: CliRunner, configure: Configure, execvp: Exec, value: str, command: list[str]
) -> None:
    with pytest.raises(ConfigError):
        configure(public_url=value)

    result = run(runner, *command)

    assert result.exit_code == 2, result.output
    assert "VARIFLOW_PUBLIC_URL" in result.output
    assert "Traceback" not in result.output
    assert execvp.calls == []


def test_a_bad_port_exits_2_naming_the_variable(
    runner: CliRunner, configure: Configure, execvp: Exec
) -> None:
    with pytest.raises(ConfigError):
        configure(port="99999")

    result = run(runner, "serve")

    assert result.exit_code == 2, result.output
    assert "VARIFLOW_PORT" in result.output
    assert execvp.calls == []


# --- db upgrade -------------------------------------------------------------------------


def test_db_upgrade_creates_the_schema(
    runner: CliRunner, configure: Configure, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'v.db'}"
    configure(database_url=url)

    result = run(runner, "db", "upgrade")

    assert result.exit_code == 0, result.output
    assert "database at revision head" in result.output
    assert (tmp_path / "fresh" / "v.db").is_file()
    assert job_count() == 0  # the tables exist
    again = run(runner, "db", "upgrade")
    assert again.exit_code == 0, again.output


# --- the database: one line naming it, never created by a job command ------------------


@pytest.fixture
def new_process(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set VARIFLOW_* variables for a `variflow` run that starts like a new process:
    no runtime installed (the tests' own would have made its database), settings
    read from the environment by the command."""

    def apply(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"VARIFLOW_{name.upper()}", value)
        runtime.uninstall()
        reset_settings()

    return apply


def error_line(result: Result) -> str:
    """The whole output of a failed command: one line, no traceback."""
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


JOB_COMMANDS = [
    ["list"],
    ["list", "--json"],
    ["status", str(uuid.UUID(int=7))],
    ["cancel", str(uuid.UUID(int=7))],
    ["submit", *PIAPI],
    ["submit", *PIAPI, "--idempotency-key", "k-1", "--wait"],
]
JOB_COMMAND_IDS = ["list", "list-json", "status", "cancel", "submit", "submit-wait"]


@pytest.mark.parametrize("command", JOB_COMMANDS, ids=JOB_COMMAND_IDS)
def test_a_job_command_in_another_folder_creates_no_database(
    runner: CliRunner,
    new_process: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: list[str],
) -> None:
    # The default database is ./.variflow/variflow.db: run from a folder without one.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("VARIFLOW_HOME")
    new_process()

    result = run(runner, *command)

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"sqlite:///{elsewhere / '.variflow' / 'variflow.db'}" in line
    assert "variflow db upgrade" in line
    assert list(elsewhere.iterdir()) == []  # neither the file nor its folder


@pytest.mark.parametrize("command", JOB_COMMANDS, ids=JOB_COMMAND_IDS)
def test_a_database_without_variflow_tables_is_one_line_naming_it(
    runner: CliRunner, new_process: Callable[..., None], tmp_path: Path, command: list[str]
) -> None:
    empty = tmp_path / "other.db"
    sqlite3.connect(empty).close()  # an SQLite file, but not variflow's
    url = f"sqlite:///{empty}"
    new_process(database_url=url)

    result = run(runner, *command)

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert url in line
    assert "no variflow tables" in line
    assert "variflow db upgrade" in line
    assert empty.stat().st_size == 0  # nothing was written to it


@pytest.mark.parametrize("command", JOB_COMMANDS, ids=JOB_COMMAND_IDS)
def test_an_unreachable_database_is_one_line_naming_it_without_its_password(
    runner: CliRunner, new_process: Callable[..., None], command: list[str]
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    new_process(database_url=f"postgresql+psycopg://ops:s3cret-pw@127.0.0.1:{port}/variflow")

    result = run(runner, *command)

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"postgresql+psycopg://ops:***@127.0.0.1:{port}/variflow" in line
    assert "cannot reach the database" in line
    assert "variflow db upgrade" in line
    assert "s3cret-pw" not in result.output


def test_db_upgrade_of_an_unreachable_database_exits_2_in_one_line(
    runner: CliRunner, new_process: Callable[..., None]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    new_process(database_url=f"postgresql+psycopg://ops:s3cret-pw@127.0.0.1:{port}/variflow")

    result = run(runner, "db", "upgrade")

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"cannot reach the database postgresql+psycopg://ops:***@127.0.0.1:{port}/" in line
    assert "s3cret-pw" not in result.output


def test_a_database_with_an_older_schema_is_one_line_naming_it(
    runner: CliRunner, new_process: Callable[..., None], tmp_path: Path
) -> None:
    # Tables by variflow's names, but not its columns: the query itself fails.
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        for table in ("jobs", "job_events", "job_inputs"):
            connection.execute(f"CREATE TABLE {table} (x INTEGER)")
    connection.close()
    url = f"sqlite:///{path}"
    new_process(database_url=url)

    result = run(runner, "list")

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"the database {url} failed" in line
    assert "variflow db upgrade" in line


# --- exit codes: 0 done, 1 the job failed, 2 usage or input, 3 timed out ----------------


@pytest.mark.usefixtures("db")
def test_submit_wait_that_times_out_exits_3(runner: CliRunner) -> None:
    # Nothing runs the job here: it stays queued.
    result = run(runner, "submit", *PIAPI, "--wait", "--timeout", "0")

    assert result.exit_code == 3, result.output
    assert "not finished after 0s (still queued)" in result.output
    assert "Traceback" not in result.output
    assert job_count() == 1


@pytest.mark.usefixtures("db")
def test_submit_wait_json_that_times_out_exits_3(runner: CliRunner) -> None:
    result = run(runner, "submit", *PIAPI, "--wait", "--timeout", "0", "--json")

    assert result.exit_code == 3, result.output
    assert error_line(result).startswith("Error: job ")


@pytest.mark.usefixtures("db")
def test_submit_wait_of_a_job_that_failed_exits_1(runner: CliRunner) -> None:
    job = submit_variation("piapi", idempotency_key="order-9", **PIAPI_FIELDS)
    fail(job.id)
    args = ["--origin-task-id", "imagine-1", "--index", "1", "--prompt", "a fox"]

    # The same idempotency key: the job that already failed, followed to its end.
    result = run(runner, "submit", "piapi", *args, "--idempotency-key", "order-9", "--wait")

    assert result.exit_code == 1, result.output
    assert "status: failed" in result.output
    assert "error:  upstream_failed: the provider lost the image" in result.output


@pytest.mark.usefixtures("db")
def test_submit_wait_of_a_cancelled_job_exits_0(runner: CliRunner) -> None:
    job = submit_variation("piapi", idempotency_key="order-10", **PIAPI_FIELDS)
    run(runner, "cancel", str(job.id))
    args = ["--origin-task-id", "imagine-1", "--index", "1", "--prompt", "a fox"]

    result = run(runner, "submit", "piapi", *args, "--idempotency-key", "order-10", "--wait")

    assert result.exit_code == 0, result.output
    assert "status: cancelled" in result.output


@pytest.mark.parametrize(
    ("command", "lines"),
    [
        (
            [],
            [
                "Exit codes:",
                "0 done",
                "1 the job failed",
                "2 usage or input error",
                "3 timed out",
            ],
        ),
        (
            ["submit"],
            [
                "Exit codes:",
                "0 submitted",
                "1 with --wait: the job failed",
                "2 usage or input error",
                "3 with --wait: the job did not finish within --timeout",
            ],
        ),
        (["status"], ["Exit codes:", "0 done", "1 the job failed", "2 usage error"]),
    ],
    ids=["variflow", "submit", "status"],
)
def test_help_states_the_exit_codes(
    runner: CliRunner, command: list[str], lines: list[str]
) -> None:
    result = run(runner, *command, "--help")

    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    positions = [text.index(line) for line in lines]
    assert positions == sorted(positions), text


# --- the remote mode: VARIFLOW_API_URL and VARIFLOW_API_TOKEN set ----------------------
# The job commands go through variflow_client to the HTTP API, here a fake one behind
# httpx.MockTransport (worker.cli.remote_client is the seam). The database is set to one
# that cannot be reached: a command that touched it would fail.

API_URL = "https://variflow.test"
API_TOKEN = "vf_cli_test"
REMOTE_ID = "5b0d1c2e-0000-4000-8000-00000000abcd"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def api_job(**changes: Any) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": REMOTE_ID,
        "provider": "piapi",
        "status": "queued",
        "progress": 0,
        "tenant": "acme",
        "input": {"origin_task_id": "imagine-1", "index": "1", "prompt": "a red fox"},
        "metadata": {},
        "idempotency_key": "k",
        "error": None,
        "results": [],
        "deadline": "2026-12-02T10:15:00Z",
        "created_at": "2026-12-02T10:00:00Z",
        "updated_at": "2026-12-02T10:00:00Z",
        "submitted_at": None,
        "completed_at": None,
    }
    job.update(changes)
    return job


API_EVENTS = [
    {
        "at": "2026-12-02T10:00:00Z",
        "source": "api",
        "kind": "created",
        "from_status": None,
        "to_status": "queued",
        "message": "accepted",
    },
    {
        "at": "2026-12-02T10:00:09Z",
        "source": "poll",
        "kind": "status",
        "from_status": "queued",
        "to_status": "completed",
        "message": None,
    },
]

COMPLETED = api_job(
    status="completed",
    progress=100,
    completed_at="2026-12-02T10:00:09Z",
    results=[
        {"index": 0, "url": f"/v1/jobs/{REMOTE_ID}/results/0", "provider_url": "https://cdn.t/1"},
        {"index": 1, "url": f"/v1/jobs/{REMOTE_ID}/results/1", "provider_url": None},
    ],
)
FAILED = api_job(
    status="failed",
    error={"code": "upstream_failed", "message": "the provider lost the image"},
)


def api_problem(status: int, title: str, detail: str | None = None, **extra: Any) -> httpx.Response:
    body = {"type": "urn:variflow:problem:x", "title": title, "status": status, **extra}
    if detail is not None:
        body["detail"] = detail
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/problem+json"},
    )


class FakeAPI:
    """Routes (method, path) to an answer: a JSON body (200), a response, an exception or a
    function of the request. Keeps the requests."""

    def __init__(self, routes: dict[tuple[str, str], Any]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.path))
        if answer is None:
            return api_problem(404, "Not found")
        if callable(answer):
            answer = answer(request)
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(201 if request.method == "POST" else 200, json=answer)

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if (r.method, r.url.path) == (method, path)]


JOBS_PATH = "/v1/jobs"
JOB_PATH = f"/v1/jobs/{REMOTE_ID}"
EVENTS_PATH = f"{JOB_PATH}/events"


@pytest.fixture
def remote(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeAPI]:
    """Point the CLI at a fake API: ``remote({(method, path): answer})`` returns it."""
    monkeypatch.setenv("VARIFLOW_API_URL", API_URL)
    monkeypatch.setenv("VARIFLOW_API_TOKEN", API_TOKEN)
    with socket.socket() as sock:  # a database nobody listens on: the remote mode needs none
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("VARIFLOW_DATABASE_URL", f"postgresql+psycopg://u:p@127.0.0.1:{port}/v")
    runtime.uninstall()
    reset_settings()

    def make(routes: dict[tuple[str, str], Any]) -> FakeAPI:
        api = FakeAPI(routes)

        def factory(url: str, token: str) -> Client:
            assert (url, token) == (API_URL, API_TOKEN)
            made = Client(url, token, transport=httpx.MockTransport(api), max_retries=1)
            made.sleep = lambda seconds: None  # retries without waiting
            return made

        monkeypatch.setattr("worker.cli.remote_client", factory)
        return api

    return make


def multipart_fields(request: httpx.Request) -> dict[str, bytes]:
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.content)
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(name, str) and isinstance(payload, bytes)
        fields[name] = payload
    return fields


def test_remote_submit_sends_the_provider_fields_as_input(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    api = remote({("POST", JOBS_PATH): api_job()})

    result = run(
        runner,
        "submit",
        *PIAPI,
        "--idempotency-key",
        "order-1",
        "--deadline",
        "120",
        "--notify-url",
        "https://app.example.test/hook",
        "-p",
        "aspect_ratio=16:9",
    )

    assert result.exit_code == 0, result.output
    assert result.output.strip() == REMOTE_ID
    [request] = api.requests
    assert request.headers["authorization"] == f"Bearer {API_TOKEN}"
    assert request.headers["idempotency-key"] == "order-1"
    assert json.loads(request.content) == {
        "provider": "piapi",
        "input": {
            "origin_task_id": "imagine-1",
            "index": "1",
            "prompt": "a red fox",
            "aspect_ratio": "16:9",
        },
        "deadline": 120.0,
        "notify_url": "https://app.example.test/hook",
    }


def test_remote_submit_of_an_image_url_sends_it_as_image_url(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    api = remote({("POST", JOBS_PATH): api_job(provider="lemondata")})

    result = run(
        runner, "submit", "lemondata", "--image", "https://example.test/cat.png", "--n", "2"
    )

    assert result.exit_code == 0, result.output
    body = json.loads(api.requests[0].content)
    assert body["input"] == {"image_url": "https://example.test/cat.png", "n": 2}
    assert api.requests[0].headers["idempotency-key"]  # generated when not given


def test_remote_submit_of_a_local_file_uploads_it(
    runner: CliRunner, remote: Callable[..., FakeAPI], tmp_path: Path
) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG_BYTES)
    api = remote({("POST", JOBS_PATH): api_job(provider="lemondata")})

    result = run(runner, "submit", "lemondata", "--image", str(path), "--size", "256x256")

    assert result.exit_code == 0, result.output
    [request] = api.requests
    fields = multipart_fields(request)
    assert fields["provider"] == b"lemondata"
    assert json.loads(fields["input"]) == {"size": "256x256"}
    assert fields["image"] == PNG_BYTES


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["piclaza", "--image", "./no/such/file.png"], "image:"),
        ([*PIAPI, "--on-complete-task", "myapp.done"], "--on-complete-task"),
        (["piclaza", "--param", "grouping"], "NAME=VALUE"),
    ],
)
def test_remote_submit_refuses_what_it_cannot_send_before_any_request(
    runner: CliRunner, remote: Callable[..., FakeAPI], args: list[str], named: str
) -> None:
    api = remote({("POST", JOBS_PATH): api_job()})

    result = run(runner, "submit", *args)

    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output
    assert api.requests == []


@pytest.mark.parametrize(
    ("detail", "shown"),
    [
        ("input.n: 1 to 10", "Error: input.n: 1 to 10"),
        ("must be 1 to 10", "Error: input.n: must be 1 to 10"),
    ],
)
def test_remote_input_errors_are_one_line_naming_the_field(
    runner: CliRunner, remote: Callable[..., FakeAPI], detail: str, shown: str
) -> None:
    answer = api_problem(400, "Invalid input", detail, field="input.n")
    api = remote({("POST", JOBS_PATH): answer})

    result = run(runner, "submit", "lemondata", "--image", "https://e.test/a.png", "--n", "11")

    assert result.exit_code == 2, result.output
    assert error_line(result) == shown
    assert len(api.requests) == 1  # a 400 is never retried


def test_remote_idempotency_conflict_names_the_job(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    answer = api_problem(409, "Conflict", "key used for another request", job_id=REMOTE_ID)
    remote({("POST", JOBS_PATH): answer})

    result = run(runner, "submit", *PIAPI, "--idempotency-key", "k-1")

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "idempotency_key:" in line and REMOTE_ID in line


def test_remote_submit_json_has_the_local_keys(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    remote({("POST", JOBS_PATH): api_job(), ("GET", EVENTS_PATH): {"data": API_EVENTS[:1]}})

    result = run(runner, "submit", *PIAPI, "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    local_keys = {f.name for f in dataclasses.fields(JobInfo)}  # what the local mode prints
    assert local_keys - set(data) == set()
    assert set(data) - local_keys <= {"metadata", "results"}
    assert (data["id"], data["status"]) == (REMOTE_ID, "queued")
    assert data["params"]["prompt"] == "a red fox"
    assert [(e["source"], e["to_status"]) for e in data["events"]] == [("api", "queued")]


def wait_answers(*jobs: dict[str, Any]) -> Callable[[httpx.Request], dict[str, Any]]:
    """GET /v1/jobs/{id}?wait=N answers: each job in turn, the last one repeated."""
    queue = list(jobs)

    def answer(request: httpx.Request) -> dict[str, Any]:
        assert "wait" in request.url.params  # a long poll, never a bare busy poll
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return answer


def test_remote_submit_wait_prints_the_result(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    api = remote(
        {
            ("POST", JOBS_PATH): api_job(),
            ("GET", JOB_PATH): wait_answers(api_job(status="processing"), COMPLETED),
            ("GET", EVENTS_PATH): {"data": API_EVENTS},
        }
    )

    result = run(runner, "submit", *PIAPI, "--wait", "--timeout", "300")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [REMOTE_ID, "piapi"]
    assert "- -> queued" in lines[1] and "(accepted)" in lines[1]
    assert "queued -> completed" in lines[2]
    assert "status: completed" in result.output
    assert "result:   https://cdn.t/1" in result.output
    assert f"result:   {API_URL}/v1/jobs/{REMOTE_ID}/results/1" in result.output
    waits = [float(r.url.params["wait"]) for r in api.sent("GET", JOB_PATH)]
    assert len(waits) == 2 and all(0 < w <= 60 for w in waits)


@pytest.mark.parametrize(
    ("final", "code", "shown"),
    [
        (FAILED, 1, "error:  upstream_failed: the provider lost the image"),
        (
            api_job(status="cancelled", error={"code": "cancelled", "message": "by request"}),
            0,
            "status: cancelled",
        ),
    ],
    ids=["failed", "cancelled"],
)
def test_remote_submit_wait_of_a_job_that_did_not_complete(
    runner: CliRunner, remote: Callable[..., FakeAPI], final: dict[str, Any], code: int, shown: str
) -> None:
    remote(
        {
            ("POST", JOBS_PATH): api_job(),
            ("GET", JOB_PATH): wait_answers(final),
            ("GET", EVENTS_PATH): {"data": []},
        }
    )

    result = run(runner, "submit", *PIAPI, "--wait")

    assert result.exit_code == code, result.output
    assert shown in result.output


def test_remote_submit_wait_that_times_out_exits_3(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    remote({("POST", JOBS_PATH): api_job(), ("GET", JOB_PATH): wait_answers(api_job())})

    result = run(runner, "submit", *PIAPI, "--wait", "--timeout", "0", "--json")

    assert result.exit_code == 3, result.output
    assert error_line(result) == f"Error: job {REMOTE_ID} not finished after 0s (still queued)"


def test_remote_status_shows_the_timeline(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    api = remote({("GET", JOB_PATH): COMPLETED, ("GET", EVENTS_PATH): {"data": API_EVENTS}})

    text = run(runner, "status", REMOTE_ID)
    as_json = run(runner, "status", REMOTE_ID, "--json")

    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].split() == [REMOTE_ID, "piapi", "completed", "100%"]
    assert "api" in lines[1] and "(accepted)" in lines[1]
    assert "poll" in lines[2] and "queued -> completed" in lines[2]
    assert "status: completed" in text.output
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["result_urls"][0] == "https://cdn.t/1"
    assert [e["to_status"] for e in data["events"]] == ["queued", "completed"]
    assert data["results"][1] == {
        "index": 1,
        "url": f"/v1/jobs/{REMOTE_ID}/results/1",
        "provider_url": None,
    }
    assert all("wait" not in r.url.params for r in api.requests)


def test_remote_status_of_a_failed_job_exits_1(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    remote({("GET", JOB_PATH): FAILED, ("GET", EVENTS_PATH): {"data": []}})

    result = run(runner, "status", REMOTE_ID)

    assert result.exit_code == 1, result.output
    assert "error:  upstream_failed: the provider lost the image" in result.output


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_remote_unknown_job_exits_2_naming_it(
    runner: CliRunner, remote: Callable[..., FakeAPI], command: str
) -> None:
    remote({})  # every path is a 404

    result = run(runner, command, "nope")

    assert result.exit_code == 2, result.output
    assert "JOB_ID" in result.output and "no job with id nope" in result.output
    assert "Traceback" not in result.output


def test_remote_cancel(runner: CliRunner, remote: Callable[..., FakeAPI]) -> None:
    cancelled = api_job(status="cancelled", error={"code": "cancelled", "message": "by request"})
    api = remote({("POST", f"{JOB_PATH}/cancel"): cancelled})

    result = run(runner, "cancel", REMOTE_ID)

    assert result.exit_code == 0, result.output
    assert result.output.split() == [REMOTE_ID, "cancelled"]
    assert len(api.requests) == 1


def page_of(request: httpx.Request) -> dict[str, Any]:
    pages = {None: (["a", "b"], "c1"), "c1": (["c", "d"], "c2"), "c2": (["e"], None)}
    ids, cursor = pages[request.url.params.get("cursor")]
    jobs = [api_job(id=i, status="failed", error={"code": "timeout", "message": "m"}) for i in ids]
    return {"data": jobs, "next_cursor": cursor}


def test_remote_list_maps_the_filters_and_follows_pages(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    api = remote({("GET", JOBS_PATH): page_of})

    result = run(
        runner, "list", "--status", "failed", "--status", "queued", "--provider", "piapi",
        "--since", "2000-01-01",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert listed(result) == ["a", "b", "c", "d", "e"]
    assert "timeout" in result.output.splitlines()[1]
    first = api.requests[0].url.params
    assert first.get_list("status") == ["failed", "queued"]
    assert first["provider"] == "piapi"
    assert first["created_since"] == "2000-01-01T00:00:00+00:00"
    assert first["limit"] == "50"
    assert [r.url.params.get("cursor") for r in api.requests] == [None, "c1", "c2"]


def test_remote_list_stops_at_the_limit(runner: CliRunner, remote: Callable[..., FakeAPI]) -> None:
    api = remote({("GET", JOBS_PATH): page_of})

    result = run(runner, "list", "--limit", "3", "--json")

    assert result.exit_code == 0, result.output
    assert listed_json(result) == ["a", "b", "c"]
    assert len(api.requests) == 2  # no page asked for past the limit
    assert json.loads(result.output)[0]["events"] == []


def test_remote_list_asks_for_pages_of_at_most_100(
    runner: CliRunner, remote: Callable[..., FakeAPI]
) -> None:
    api = remote({("GET", JOBS_PATH): {"data": [], "next_cursor": None}})

    result = run(runner, "list", "--limit", "500")

    assert result.exit_code == 0, result.output
    assert listed(result) == []
    assert api.requests[0].url.params["limit"] == "100"


@pytest.mark.parametrize(
    ("answer", "expected", "tries"),
    [
        (api_problem(401, "Unauthenticated"), "refused the token", 1),
        (api_problem(503, "Unavailable", "restarting"), "answered 503 Unavailable: restarting", 2),
        (httpx.ConnectError("refused"), "cannot reach the API at https://variflow.test", 2),
        (
            httpx.Response(502, text="<html>bad</html>", headers={"content-type": "text/html"}),
            "answered 502 Bad Gateway",
            2,
        ),
    ],
    ids=["401", "503", "unreachable", "proxy-html"],
)
@pytest.mark.parametrize("command", [["status", REMOTE_ID], ["list"], ["submit", *PIAPI]])
def test_remote_api_failures_are_one_line(
    runner: CliRunner,
    remote: Callable[..., FakeAPI],
    answer: httpx.Response | Exception,
    expected: str,
    tries: int,
    command: list[str],
) -> None:
    routes = [("GET", JOB_PATH), ("GET", JOBS_PATH), ("POST", JOBS_PATH)]
    api = remote({route: lambda _request: answer for route in routes})

    result = run(runner, *command)

    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert expected in line
    assert API_TOKEN not in result.output
    assert len(api.requests) == tries  # max_retries=1 in the fixture: 503, 502 and a
    # connection error are tried twice, a 401 once


@pytest.mark.parametrize(
    ("variables", "missing"),
    [
        ({"VARIFLOW_API_URL": API_URL}, "VARIFLOW_API_TOKEN"),
        ({"VARIFLOW_API_TOKEN": "t"}, "VARIFLOW_API_URL"),
    ],
)
def test_half_a_remote_setting_exits_2_naming_the_other(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], missing: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    result = run(runner, "status", REMOTE_ID)

    assert result.exit_code == 2, result.output
    assert error_line(result).startswith(f"Error: {missing} is not set")


def test_remote_mode_without_the_client_installed_says_how_to_install_it(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VARIFLOW_API_URL", API_URL)
    monkeypatch.setenv("VARIFLOW_API_TOKEN", API_TOKEN)
    monkeypatch.setitem(sys.modules, "variflow_client", None)  # import fails as if absent

    result = run(runner, "list")

    assert result.exit_code == 2, result.output
    assert "pip install variflow-client (clients/python" in error_line(result)


def test_the_default_remote_client_is_a_variflow_client() -> None:
    from variflow_client import Client

    from worker.cli import remote_client

    with remote_client(API_URL, API_TOKEN) as made:
        assert isinstance(made, Client)
        assert made.base_url == API_URL


# --- accounts ----------------------------------------------------------------------------


def test_accounts_help(runner: CliRunner) -> None:
    result = run(runner, "accounts", "--help")

    assert result.exit_code == 0, result.output
    assert "Provider accounts" in result.output and "--json" in result.output
    assert "  accounts " in run(runner, "--help").output


@pytest.mark.usefixtures("db")
def test_accounts_lists_every_providers_account_with_its_fingerprint(
    runner: CliRunner, configure: Configure
) -> None:
    key = "sk-never-printed-123"
    configure(piapi_api_key=key, piapi_max_in_flight=3, piapi_daily_failed=30)
    submit_variation("piapi", **PIAPI_FIELDS)  # queued, not waiting: counts nowhere

    as_json = run(runner, "accounts", "--json")
    text = run(runner, "accounts")

    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.output)
    assert [(r["provider"], r["account"]) for r in rows] == [
        (name, "main") for name in ("piapi", "piclaza", "lemondata")
    ]
    piapi = rows[0]
    assert piapi["fingerprint"] == hashlib.sha256(key.encode()).hexdigest()[:8]
    assert piapi["limits"]["max_in_flight"] == 3 and piapi["limits"]["daily_failed"] == 30
    assert (piapi["in_flight"], piapi["waiting"], piapi["breaker"]) == (0, 0, "closed")
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0].split()[:2] == ["ACCOUNT", "KEY"]
    assert lines[1].split()[:5] == ["piapi/main", piapi["fingerprint"], "0/3", "0/-", "0/30"]
    assert key not in as_json.output and key not in text.output


def test_accounts_prints_no_terminal_control_of_a_providers_pause_reason(
    db: str, runner: CliRunner
) -> None:
    with session_scope() as session:
        session.add(
            AccountState(
                provider="piapi",
                account="main",
                paused_until=utcnow() + timedelta(minutes=5),
                pause_reason="slow down\x1b]0;owned\x07\nnow",
                updated_at=utcnow(),
            )
        )

    text = run(runner, "accounts")
    as_json = run(runner, "accounts", "--json")

    assert text.exit_code == 0, text.output
    assert "\x1b" not in text.output and "\x07" not in text.output
    assert "slow down?]0;owned??now" in text.output.splitlines()[1]
    assert json.loads(as_json.output)[0]["pause_reason"] == "slow down\x1b]0;owned\x07\nnow"


def test_accounts_in_another_folder_creates_no_database(
    runner: CliRunner,
    new_process: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("VARIFLOW_HOME")
    new_process()

    result = run(runner, "accounts")

    assert result.exit_code == 2, result.output
    assert "variflow db upgrade" in error_line(result)
    assert list(elsewhere.iterdir()) == []
