"""The jobs dashboard in a real browser: headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) against the running stack.

Selenium is given both the browser and the driver, and SE_OFFLINE is set, so
Selenium Manager never downloads anything. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import base64
import io
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from tests.conftest import REQUIRE_SERVICES, Configure
from tests.e2e.conftest import RunningStack
from worker.api import cancel_job, get_job, submit_variation
from worker.devstack import Stack, free_port
from worker.models import Job, utcnow
from worker.runtime import session_scope

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as exc:  # reported by the `chromium` fixture, not at collection
    SELENIUM_ERROR: ImportError | None = exc
else:
    SELENIUM_ERROR = None

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
USER = "ops"
PASSWORD = "e2e-dashboard-pa55"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
IMAGES_LOADED = """
const images = Array.from(document.querySelectorAll(arguments[0]));
return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0);
"""


def missing(message: str) -> None:
    """Like tests.conftest.unavailable: a failure in CI, a skip elsewhere."""
    if REQUIRE_SERVICES:
        pytest.fail(message + " (VARIFLOW_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def chromium() -> None:
    """Headless Chromium is here; asked for first, so nothing starts without it."""
    if SELENIUM_ERROR is not None:
        missing(f"selenium is not installed ({SELENIUM_ERROR}): pip install -e '.[dev]'")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            missing(f"{path} not found: apt-get install chromium chromium-driver")


@pytest.fixture
def dashboard_credentials(configure: Configure) -> tuple[str, str]:
    """Asked for before running_stack, which passes VARIFLOW_* on to the web app."""
    configure(dashboard_user=USER, dashboard_password=PASSWORD)
    return USER, PASSWORD


@pytest.fixture
def browser(chromium: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    service = Service(
        executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")
    )
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def square_png(size: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (40, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def archived_urls(job_id: object) -> list[str]:
    with session_scope() as session:
        urls = session.scalar(select(Job.archived_urls).where(Job.id == job_id))
    return list(urls or [])


def wait_images(driver: WebDriver, selector: str, timeout: float = 20.0) -> None:
    try:
        WebDriverWait(driver, timeout).until(lambda d: d.execute_script(IMAGES_LOADED, selector))
    except Exception:
        state = driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(i => [i.currentSrc, i.complete, i.naturalWidth])",
            selector,
        )
        raise AssertionError(f"images {selector!r} did not load: {state}") from None


def log_in(driver: WebDriver, web: str) -> None:
    """As a person would after answering the browser's prompt: the credentials are
    given once and cached for the origin; the pages' own URLs carry none."""
    driver.get(f"http://{USER}:{PASSWORD}@{web.removeprefix('http://')}/dashboard")


def text_of(driver: WebDriver, selector: str) -> str:
    """The text of the element, or "" while there is none (a page being replaced)."""
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def screenshot(driver: WebDriver, name: str) -> Path:
    """A full-page PNG under test-artifacts/ (git-ignored); prints where."""
    shot: dict[str, Any] = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
    )
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_dashboard_shows_a_finished_job_in_a_browser(
    chromium: None,
    dashboard_credentials: tuple[str, str],
    running_stack: RunningStack,
    browser: WebDriver,
) -> None:
    web = running_stack.web_url
    piapi = submit_variation(
        "piapi", origin_task_id="imagine-42", index="2", prompt="a lighthouse at <dusk> & rain"
    )
    piclaza = submit_variation("piclaza", image=square_png())
    done = running_stack.wait_terminal(piapi.id)
    assert done.status == "completed", done.error_message
    assert running_stack.wait_terminal(piclaza.id).status == "completed"
    archived = running_stack.wait_for(
        lambda: archived_urls(piapi.id), what="the results to be archived"
    )

    # The web app was started with the credentials: no dashboard without them.
    assert httpx.get(f"{web}/dashboard", timeout=10).status_code == 401
    assert httpx.get(f"{web}/dashboard", auth=(USER, PASSWORD), timeout=10).status_code == 200

    log_in(browser, web)
    browser.get(f"{web}/dashboard")
    counts = browser.find_element(By.CSS_SELECTOR, 'a[data-status="completed"] .n')
    assert int(counts.text) == 2
    screenshot(browser, "dashboard-index.png")

    browser.find_element(By.CSS_SELECTOR, f'a[href="/dashboard/jobs/{piapi.id}"]').click()
    WebDriverWait(browser, 10).until(lambda d: str(piapi.id) in d.current_url)
    assert browser.find_element(By.ID, "job-status").text == "completed"
    wait_images(browser, "img.result")
    sources = [
        str(img.get_attribute("currentSrc"))
        for img in browser.find_elements(By.CSS_SELECTOR, "img.result")
    ]
    assert sources == archived  # the archived copies, served by the app under /results/
    assert all(src.startswith(f"{web}/results/{piapi.id}/") for src in sources)
    timeline = browser.find_element(By.ID, "timeline").text
    assert "completed" in timeline and "archived" in timeline
    assert "a lighthouse at <dusk> & rain" in browser.find_element(By.ID, "input").text
    path = screenshot(browser, "dashboard-job.png")
    assert path.stat().st_size > 10_000

    # The input image is served behind the same credentials, and loads.
    browser.get(f"{web}/dashboard/jobs/{piclaza.id}")
    wait_images(browser, "#input img")
    wait_images(browser, "img.result")
    screenshot(browser, "dashboard-job-with-input.png")


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_an_operator_cancels_a_running_job_and_retries_it(
    chromium: None,
    dashboard_credentials: tuple[str, str],
    running_stack: RunningStack,
    browser: WebDriver,
) -> None:
    web = running_stack.web_url
    # Tasks stay in flight upstream until the test ends them.
    running_stack.sandbox.state.update_config(processing_seconds=600.0)
    slow = submit_variation("piapi", origin_task_id="imagine-5", index="1", prompt="a slow snail")
    other = submit_variation("piapi", origin_task_id="imagine-6", index="4", prompt="a sloth")
    for job_id in (slow.id, other.id):
        running_stack.wait_for(
            lambda job_id=job_id: get_job(job_id).status in ("submitted", "processing"),
            what=f"job {job_id} to be running",
        )
    wait = WebDriverWait(browser, 20)

    # The list refreshes itself while jobs are in flight: a job ended elsewhere
    # shows as ended without the page being loaded again (the script runs, so
    # the policy allows it).
    log_in(browser, web)
    browser.get(f"{web}/dashboard")
    assert browser.find_elements(By.CSS_SELECTOR, "#jobs[data-refresh]")
    browser.execute_script("window.sameDocument = true;")
    cancel_job(other.id, "ended by the test")
    wait.until(lambda d: text_of(d, f'tr[data-job="{other.id}"] .badge') == "cancelled")
    assert browser.execute_script("return window.sameDocument === true;")
    assert text_of(browser, f'tr[data-job="{slow.id}"] .badge') in ("submitted", "processing")

    # Found by a prefix of its id, the running job is cancelled from its page.
    search = browser.find_element(By.ID, "search")
    search.send_keys(str(slow.id)[:8])
    search.submit()
    wait.until(lambda d: d.current_url == f"{web}/dashboard/jobs/{slow.id}")
    assert text_of(browser, "#job-status") in ("submitted", "processing")
    assert not browser.find_elements(By.ID, "retry")
    browser.find_element(By.ID, "cancel").click()
    wait.until(lambda d: "notice=cancelled" in d.current_url)
    wait.until(lambda d: text_of(d, "#job-status") == "cancelled")
    assert text_of(browser, "#notice") == "Cancelled."
    assert f"by {USER}" in text_of(browser, "#job-error")
    assert not browser.find_elements(By.ID, "cancel")
    assert get_job(slow.id).status == "cancelled"
    screenshot(browser, "dashboard-job-cancelled.png")

    # Nothing is in flight now: the list stands still.
    browser.get(f"{web}/dashboard")
    assert text_of(browser, f'tr[data-job="{slow.id}"] .badge') == "cancelled"
    assert not browser.find_elements(By.CSS_SELECTOR, "[data-refresh]")
    assert not browser.find_elements(By.TAG_NAME, "script")

    # Retried as a new job, which the worker takes up like any other.
    browser.get(f"{web}/dashboard/jobs/{slow.id}")
    browser.find_element(By.ID, "retry").click()
    wait.until(lambda d: "notice=retried" in d.current_url)
    new_id = browser.current_url.split("/dashboard/jobs/", 1)[1].split("?", 1)[0]
    assert new_id != str(slow.id)
    assert text_of(browser, "#notice") == f"Created as a retry of job {slow.id}"
    retried = running_stack.wait_for(
        lambda: get_job(new_id) if get_job(new_id).status == "processing" else None,
        what="the retried job to run",
    )
    assert retried.params == get_job(slow.id).params


# --- the overview's charts ---------------------------------------------------------------

# Each drawn bar's and dot's size on the page, as the browser laid it out.
DRAWN_SIZES = """
return Array.from(document.querySelectorAll(arguments[0])).map(function (e) {
  var box = e.getBoundingClientRect();
  return [e.getAttribute("data-series") || "", box.width, box.height];
});
"""
FILL = "return getComputedStyle(document.querySelector(arguments[0])).fill;"


@pytest.fixture
def web_only(
    chromium: None, dashboard_credentials: tuple[str, str], pg_url: str, tmp_path: Path
) -> Iterator[str]:
    """Only the web app (gunicorn) on PostgreSQL: the overview reads rows, nothing runs jobs."""
    env = {k: v for k, v in os.environ.items() if k.startswith("VARIFLOW_")}
    port = free_port()
    with Stack(env, tmp_path / "logs") as stack:
        yield stack.start_web(port, workers=1)


def seed_recent_jobs() -> None:
    """Jobs of the last hour as the flows leave them: ended every way, and one running."""
    now = utcnow()
    rows = []
    for minutes, status, took, code in [
        (50, "completed", 12.0, None),
        (50, "completed", 30.0, None),
        (40, "completed", 8.0, None),
        (40, "failed", 3.0, "upstream_failed"),
        (30, "completed", 95.0, None),
        (30, "failed", 60.0, "timeout"),
        (30, "failed", 2.0, "upstream_failed"),
        (20, "cancelled", 15.0, None),
        (10, "completed", 20.0, None),
        (1, "processing", None, None),
    ]:
        created = now - timedelta(minutes=minutes)
        ended = created + timedelta(seconds=took) if took is not None else None
        rows.append(
            Job(
                id=uuid.uuid4(),
                provider="piclaza" if minutes == 30 else "piapi",
                status=status,
                params={"prompt": "a heron"},
                deadline=created + timedelta(hours=1),
                created_at=created,
                updated_at=ended or created,
                completed_at=ended,
                error_code=code,
                progress=100 if status == "completed" else 0,
            )
        )
    with session_scope() as session:
        session.add_all(rows)


def test_the_overview_draws_its_charts_in_a_browser(web_only: str, browser: WebDriver) -> None:
    seed_recent_jobs()
    log_in(browser, web_only)
    browser.find_element(By.ID, "overview-link").click()
    WebDriverWait(browser, 10).until(lambda d: d.current_url.endswith("/dashboard/overview"))

    # The stacked bars: drawn with a size, in every series, each in its colour.
    bars = browser.execute_script(DRAWN_SIZES, "#jobs-chart rect.bar")
    assert {series for series, _, _ in bars} == {"completed", "failed", "cancelled", "in_flight"}
    assert all(width > 0 and height > 0 for _, width, height in bars), bars
    assert browser.execute_script(FILL, "#jobs-chart rect.s-completed") == "rgb(45, 164, 78)"
    assert browser.execute_script(FILL, "#jobs-chart rect.s-failed") == "rgb(207, 34, 46)"
    legend = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#jobs-chart .legend li")]
    assert legend == ["completed", "failed", "cancelled", "in flight"]
    labels = browser.find_elements(By.CSS_SELECTOR, "#jobs-chart .axis text")
    assert any(":" in label.text for label in labels)  # times on the x axis

    # p50 and p95 lines, a dot for each minute with a completed job.
    dots = browser.execute_script(DRAWN_SIZES, "#durations-chart circle")
    assert len(dots) == 2 * 4 and all(w > 0 and h > 0 for _, w, h in dots)
    assert text_of(browser, '[data-total="p50"] .n') == "20 s"  # of 8, 12, 20, 30, 95

    codes = browser.find_elements(By.CSS_SELECTOR, "#errors-chart [data-code]")
    assert [(c.get_attribute("data-code"), c.get_attribute("data-count")) for c in codes] == [
        ("upstream_failed", "2"),
        ("timeout", "1"),
    ]
    path = screenshot(browser, "dashboard-overview.png")
    assert path.stat().st_size > 10_000

    # The day, one provider, through the page's own form.
    browser.find_element(By.CSS_SELECTOR, '#window option[value="day"]').click()
    browser.find_element(By.CSS_SELECTOR, '#provider option[value="piclaza"]').click()
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    WebDriverWait(browser, 10).until(lambda d: "window=day" in d.current_url)
    assert "provider=piclaza" in browser.current_url
    assert text_of(browser, '[data-total="all"] .n') == "3"
    assert "Jobs per 15 minutes" in text_of(browser, "#jobs-chart h2")
    screenshot(browser, "dashboard-overview-day.png")
