"""A real Chromium, driven by Playwright, against the live gunicorn server:
first login with a one-time password, the forced password change, a pasted
job through the upload form, its page, and the user's job list.
"""
import re
from pathlib import Path

import pytest

from tests.conftest import require

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def console_errors() -> list[str]:
    """What the page logged as errors: a CSP violation or a missing resource shows up here."""
    return []


@pytest.fixture
def page(console_errors):
    """A fresh page in a real Chromium; its console errors go to `console_errors`."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright is not None,
            "the playwright package is not installed (pip install playwright)")
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium "
                               "(scripts/system-deps.sh does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(15_000)
            tab.on("console", lambda m: console_errors.append(f"{m.text} ({m.location['url']})")
                   if m.type == "error" else None)
            tab.on("pageerror", lambda e: console_errors.append(str(e)))
            yield tab
        finally:
            browser.close()


def first_login(page, url: str, server, name: str) -> None:
    """Make the user `name` with `server`'s admin CLI and log the page in as them
    through the real forms: the one-time password, then the forced change."""
    one_time = re.search(r"one-time password: (\S+)", server.admin("user", "add", name)).group(1)
    log_in_first_time(page, url, name, one_time)


def log_in_first_time(page, url: str, name: str, one_time: str) -> None:
    """Log the page in as `name` with its one-time password, which must be
    replaced before anything else (the forced change), then land on the job list."""
    from playwright.sync_api import expect

    page.goto(url + "/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(one_time)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(url + "/account/password")
    page.get_by_label("Current password").fill(one_time)
    page.get_by_label("New password (at least 10 characters)").fill(f"{name}-own-pass-1")
    page.get_by_label("New password again").fill(f"{name}-own-pass-1")
    page.get_by_role("button", name="Change password").click()
    expect(page).to_have_url(url + "/")


@pytest.mark.live
def test_first_login_password_change_upload_and_job_list(page, console_errors, live_server):
    from playwright.sync_api import expect

    created = live_server.admin("user", "add", "alice")
    one_time = re.search(r"one-time password: (\S+)", created).group(1)

    page.goto(live_server.url + "/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    page.get_by_label("User name").fill("alice")
    page.get_by_label("Password").fill(one_time)
    page.get_by_role("button", name="Log in").click()

    # Forced to choose a password before anything else.
    expect(page).to_have_url(live_server.url + "/account/password")
    expect(page.locator("main")).to_contain_text("one-time password")
    page.get_by_role("link", name="New job").click()
    expect(page).to_have_url(live_server.url + "/account/password")
    page.get_by_label("Current password").fill(one_time)
    page.get_by_label("New password (at least 10 characters)").fill("alice-own-pass-1")
    page.get_by_label("New password again").fill("alice-own-pass-1")
    page.get_by_role("button", name="Change password").click()

    # The upload form: paste code and submit.
    expect(page).to_have_url(live_server.url + "/")
    expect(page.locator(".flash")).to_contain_text("Password changed")
    page.get_by_label("Job name").fill("browser-job")
    page.get_by_label("… or paste code").fill("print('hello from the browser')\n")
    page.get_by_role("button", name="Submit job").click()

    expect(page).to_have_url(re.compile(r"/jobs/j[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#state")).to_have_text("queued")
    expect(page.locator("h1")).to_contain_text("browser-job")

    page.get_by_role("link", name="My jobs").click()
    expect(page).to_have_url(live_server.url + "/job-status/alice")
    row = page.locator("#jobs tr", has_text=job_id)
    expect(row).to_have_count(1)
    expect(row.locator(".badge")).to_have_text("queued")
    expect(row.get_by_role("link", name="browser-job")).to_have_attribute("href", f"/jobs/{job_id}")
    assert console_errors == []


LOCAL_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")


def _log_stream_look(page, stream: str) -> dict:
    """What the page draws for a log stream: its background and the text it shows when empty."""
    return page.eval_on_selector(f"#{stream}", """el => ({
        background: getComputedStyle(el).backgroundColor,
        placeholder: getComputedStyle(el, "::before").content,
        text: el.textContent})""")


@pytest.mark.live
def test_empty_streams_say_so_and_the_dashboard_shows_times_as_job_pages_do(page, console_errors,
                                                                           live_server):
    """A queued job's page: both streams "(empty)", no black bar; a chunk of stdout posted
    by a worker turns stdout into the log box, stderr stays "(empty)". The dashboard's
    times are shown as the job page's are, in the browser's time zone, not raw ISO."""
    import requests
    from playwright.sync_api import expect

    from tests.conftest import register_worker

    url = live_server.url
    one_time = re.search(r"one-time password: (\S+)",
                         live_server.admin("user", "add", "root", "--admin")).group(1)
    api = {"Authorization": "Bearer " + live_server.admin("token", "create", "--user", "root")}
    worker = register_worker(url, live_server.admin("enroll", "create"))
    r = requests.post(f"{url}/api/v1/jobs", headers=api, files={"code": (None, "print(1)")},
                      timeout=30)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    page.goto(url + "/login")
    page.get_by_label("User name").fill("root")
    page.get_by_label("Password").fill(one_time)
    page.get_by_role("button", name="Log in").click()
    page.get_by_label("Current password").fill(one_time)
    page.get_by_label("New password (at least 10 characters)").fill("root-own-pass-1")
    page.get_by_label("New password again").fill("root-own-pass-1")
    page.get_by_role("button", name="Change password").click()
    expect(page).to_have_url(url + "/")

    page.goto(f"{url}/jobs/{job_id}")
    expect(page.locator("#state")).to_have_text("queued")
    for stream in ("stdout", "stderr"):
        look = _log_stream_look(page, stream)
        assert look == {"background": "rgba(0, 0, 0, 0)", "placeholder": '"(empty)"',
                        "text": ""}, look
    expect(page.locator("#submitted")).to_have_text(LOCAL_TIME)

    r = requests.post(f"{url}/api/v1/worker/claim", headers=worker,
                      json={"max_jobs": 1, "wait_s": 0}, timeout=30)
    [claimed] = r.json()["jobs"]
    r = requests.post(f"{url}/api/v1/worker/jobs/{job_id}/logs", headers=worker, timeout=30,
                      json={"attempt": claimed["attempt"], "stream": "stdout", "offset": 0,
                            "data": "hello\n"})
    assert r.status_code == 200, r.text
    expect(page.locator("#stdout")).to_have_text("hello\n")
    assert _log_stream_look(page, "stdout")["background"] == "rgb(17, 17, 17)"
    assert _log_stream_look(page, "stderr")["placeholder"] == '"(empty)"'

    page.goto(url + "/admin")
    last_seen = page.locator("#workers time")
    expect(last_seen).to_have_count(1)
    expect(last_seen).to_have_text(LOCAL_TIME)
    iso = last_seen.get_attribute("datetime")
    assert re.match(r"^\d{4}-\d\d-\d\dT", iso), iso   # the ISO time stays in the markup
    times = page.locator("main time[datetime]:not([datetime=''])")
    assert times.count() >= 2   # "As of" and the worker's last heartbeat, at least
    for i in range(times.count()):
        expect(times.nth(i)).to_have_text(LOCAL_TIME)
    assert console_errors == []
