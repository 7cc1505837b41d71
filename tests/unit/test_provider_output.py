"""Provider output is checked like input: only http(s) result URLs are kept, at most
MAX_RESULTS of them (what was dropped is said in the event), the dashboard shows a bounded
number of thumbnails, and a result file being written is never served."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from flask.testing import FlaskClient

from tests.unit.test_dashboard import AUTH, insert_job, section
from tests.unit.test_dashboard import client as client
from worker.runtime import current
from worker.states import MAX_RESULTS, JobStatus, Source, UpstreamState, transition, usable_results

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GOOD = "https://cdn.example/1.png"


class Row:
    status = "processing"
    progress = 50
    upstream_task_id = "t-1"
    submitted_at = NOW


def completed(*urls: str) -> UpstreamState:
    return UpstreamState(
        JobStatus.COMPLETED, Source.WEBHOOK, image_urls=urls, upstream_task_id="t-1"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "javascript:alert(1)",
        "file:///etc/passwd",
        "not a url",
        "ftp://cdn.example/1.png",
        "https://",
        "http://[::1",
        "https://cdn.example/a b.png",
        "https://cdn.example/\x00.png",
        "https://cdn.example/" + "a" * 3000,
    ],
)
def test_only_http_urls_are_kept_and_the_rest_is_said(bad: str) -> None:
    result = transition(Row(), completed(bad, GOOD), NOW)

    assert result.changes["status"] == "completed"
    assert result.changes["result_urls"] == [GOOD]
    assert result.event is not None
    assert result.event.message == "dropped 1 result URL(s) that are not http(s)"


def test_a_completion_with_no_usable_url_is_no_result() -> None:
    result = transition(Row(), completed("javascript:alert(1)", "file:///x"), NOW)

    assert result.changes["status"] == "failed"
    assert result.changes["error_code"] == "no_result"
    assert "dropped 2 result URL(s) that are not http(s)" in result.changes["error_message"]


def test_results_over_the_cap_are_dropped_with_a_note() -> None:
    urls = [f"https://cdn.example/{n}.png" for n in range(100_000)]

    kept, note = usable_results(urls)

    assert list(kept) == urls[:MAX_RESULTS]
    assert note == f"dropped {100_000 - MAX_RESULTS} result URL(s) over the limit of {MAX_RESULTS}"


def test_the_dashboard_shows_a_bounded_number_of_thumbnails(client: FlaskClient) -> None:
    urls = [f"https://cdn.example/{n}.png" for n in range(1000)]
    job_id = insert_job(status="completed", result_urls=urls, archived_urls=urls)

    page = client.get(f"/dashboard/jobs/{job_id}", auth=AUTH)

    assert page.status_code == 200
    results = section(page.text, "results")
    assert results.count("<img") == 16
    assert "(1000, archived copies, the first 16 shown)" in results


def test_a_result_file_being_written_is_never_served(client: FlaskClient) -> None:
    job_id = insert_job(status="completed")
    folder = current().settings.results_folder / str(job_id)
    folder.mkdir(parents=True)
    (folder / ".1.png.tmp").write_bytes(b"half a png")
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n")

    assert client.get(f"/results/{job_id}/.1.png.tmp").status_code == 404
    assert client.get(f"/results/{job_id}/1.png").status_code == 200
