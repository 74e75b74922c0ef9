"""In a real Chromium (Playwright), against gunicorn, a real worker and Docker:
the code editor page → a template → Run → the job page shows output lines
while the job still runs → reconnecting mid-stream (a fresh EventSource, then
a reload, and the browser's own reconnections whenever the server ends the
stream) duplicates nothing → the final state → the download works. The job
list follows the job's state without reloading. Then the scikit-learn template
runs as it is on a CSV chosen in the page. And the job list: only jobs
submitted since the page was made get a row, and only on the first page; the
page survives answers that are not a stream (a 503, a front proxy's 502).
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest
import requests

from tests.conftest import LiveServer, free_port, require, start_gunicorn, stop_gunicorn
from tests.test_browser import console_errors, page  # noqa: F401  (fixtures)
from tests.test_worker_e2e import ML_IMAGE, iris_like_csv, require_ml_image
from tests.test_worker_sandbox import IMAGE, start_cluster, stop_worker

BUNDLE = Path(__file__).resolve().parent.parent / "proxy" / "static" / "editor.bundle.js"
TICKS = 40
# Prints five lines at once, then a line every quarter second for about ten
# seconds: long enough to watch it run and reconnect on the way.
SCRIPT = f'''import pathlib
import time

for i in range(1, 6):
    print(f"line {{i}}", flush=True)
for i in range(1, {TICKS + 1}):
    time.sleep(0.25)
    print(f"tick {{i}}", flush=True)
pathlib.Path("result.txt").write_text("done")
print("finished", flush=True)
'''
EXPECTED = [f"line {i}" for i in range(1, 6)] + [f"tick {i}" for i in range(1, TICKS + 1)] + ["finished"]


@pytest.fixture
def live_cluster(tmp_path):
    """gunicorn, a worker with both images, and streams that the server ends every 2 s
    (instead of 25), so the browser's own reconnections happen during the job."""
    require_ml_image()
    c = start_cluster(tmp_path / "cluster", slots=1, gunicorn_workers=2,
                      proxy_env={"JOBCLOUD_LIVE_STREAM_S": "2"}, worker_images=f"{IMAGE},{ML_IMAGE}")
    try:
        yield c
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


def log_in(page, url: str, name: str, one_time: str) -> None:
    """First login: the one-time password must be replaced before anything else."""
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


def stdout_lines(page) -> list[str]:
    return page.locator("#stdout").inner_text().splitlines()


@pytest.mark.live
@pytest.mark.slow
def test_editor_run_live_output_reconnect_and_download(page, console_errors, live_cluster, tmp_path):
    from playwright.sync_api import expect

    require(BUNDLE.exists(), "the editor bundle is not built: run scripts/build-editor.sh (make test does)")
    url = live_cluster.server.url
    one_time = re.search(r"one-time password: (\S+)",
                         live_cluster.server.admin("user", "add", "dave")).group(1)
    log_in(page, url, "dave", one_time)

    # The editor: CodeMirror with line numbers, Python highlighting and indentation.
    page.get_by_role("link", name="Code editor").click()
    expect(page).to_have_url(url + "/new")
    editor = page.locator(".cm-editor")
    expect(editor).to_be_visible()
    expect(page.locator("textarea#code")).to_be_hidden()
    page.locator("#template").select_option("pytorch")
    expect(page.locator(".cm-content")).to_contain_text("torch.manual_seed(0)")
    expect(page.locator("#image")).to_have_value(ML_IMAGE)
    expect(page.locator(".cm-lineNumbers .cm-gutterElement", has_text="40")).to_have_count(1)
    # Highlighted tokens are spans with the highlighter's classes; plain text would have none.
    # (the parser runs in the background: wait for it).
    expect(page.locator(".cm-line span[class]").nth(20)).to_be_attached()
    page.locator("#template").select_option("sklearn")
    expect(page.locator("#dataset-hint")).to_contain_text(".csv")

    page.locator(".cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text("for i in range(3):")
    page.keyboard.press("Enter")
    # Enter after a colon indents the next line by four spaces.
    page.wait_for_function("() => window.jobcloudEditor.editor.getCode() === 'for i in range(3):\\n    '")
    # Own code is not replaced by a template without asking (here: the user says no).
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.locator("#template").select_option("opencv")
    expect(page.locator("#template")).to_have_value("sklearn")
    assert page.evaluate("window.jobcloudEditor.editor.getCode()") == "for i in range(3):\n    "
    page.keyboard.press("Control+A")
    # Paste the script over it, as a user would (typing it would be auto-indented twice).
    page.locator(".cm-content").evaluate(
        """(content, text) => { const data = new DataTransfer(); data.setData("text/plain", text);
           content.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true,
                                                              cancelable: true})); }""", SCRIPT)
    assert page.evaluate("window.jobcloudEditor.editor.getCode()") == SCRIPT
    page.get_by_label("Job name").fill("live-ticks")

    # A refused job says why, and the code stays in the editor.
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"this is not a zip archive")
    page.locator("#dataset").set_input_files(str(broken))
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("#editor-error")).to_have_text("the dataset is not a readable zip archive")
    expect(page).to_have_url(url + "/new")
    assert page.evaluate("window.jobcloudEditor.editor.getCode()") == SCRIPT
    page.locator("#dataset").set_input_files([])
    # Chromium logs the refused request itself; that one line is expected.
    assert [m for m in console_errors if "400" in m and "/api/v1/jobs" in m], console_errors
    console_errors[:] = [m for m in console_errors if "/api/v1/jobs" not in m]

    # A second tab on the job list: it follows the new job without reloading.
    second = page.context.browser.new_context()
    second.add_cookies(page.context.cookies())  # the same session
    jobs_tab = second.new_page()
    jobs_tab.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    jobs_tab.goto(url + "/job-status/dave")
    expect(jobs_tab.locator("#no-jobs")).to_be_visible()

    page.get_by_role("button", name="Run", exact=True).click()
    expect(page).to_have_url(re.compile(r"/jobs/j[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]

    # Output shows while the job still runs.
    expect(page.locator("#stdout")).to_contain_text("line 5", timeout=90_000)
    expect(page.locator("#state")).to_have_text("running")
    assert "finished" not in page.locator("#stdout").inner_text()
    expect(jobs_tab.locator(f'tr[data-job="{job_id}"] .badge')).to_have_text("running")

    # Reconnect mid-stream with a fresh EventSource (from the last event id seen)...
    expect(page.locator("#stdout")).to_contain_text("tick 3")
    assert page.evaluate("window.jobcloudLive.connections") == 1
    page.evaluate("window.jobcloudLive.reconnect()")
    expect(page.locator("#stdout")).to_contain_text("tick 12")
    assert page.evaluate("window.jobcloudLive.connections") == 2
    assert page.locator("#state").inner_text() == "running"
    # ... and by reloading: the page shows what is stored, the stream goes on from there.
    page.reload()
    expect(page.locator("#stdout")).to_contain_text("tick 20")

    expect(page.locator("#state")).to_have_text("succeeded", timeout=60_000)
    # The server ended the stream every 2 s and the browser resumed it by itself.
    assert page.evaluate("window.jobcloudLive.opens") >= 2
    assert page.evaluate("window.jobcloudLive.connections") == 1
    expect(page.locator("#exit-code")).to_have_text("0")
    expect(page.locator("#finished")).not_to_be_empty()
    expect(page.locator("#cancel")).to_have_count(0)
    assert stdout_lines(page) == EXPECTED  # nothing twice, nothing missing
    expect(jobs_tab.locator(f'tr[data-job="{job_id}"] .badge')).to_have_text("succeeded")

    with page.expect_download() as info:
        page.get_by_role("link", name=re.compile("Download outputs")).click()
    saved = tmp_path / "outputs.zip"
    info.value.save_as(saved)
    with zipfile.ZipFile(saved) as zf:
        assert zf.read("result.txt") == b"done"

    # The scikit-learn template as it is, on a CSV chosen directly (the page zips it).
    csv = tmp_path / "iris.csv"
    csv.write_text(iris_like_csv())
    page.goto(url + "/new")
    page.locator("#template").select_option("sklearn")
    page.locator("#dataset").set_input_files(str(csv))
    page.wait_for_function("() => document.getElementById('dataset').files[0].name === 'iris.zip'")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page).to_have_url(re.compile(r"/jobs/j[0-9a-f]+$"))
    expect(page.locator("#state")).to_have_text("succeeded", timeout=90_000)
    expect(page.locator("#stdout")).to_contain_text("read iris.csv: 150 rows")
    expect(page.locator("#stdout")).to_contain_text("classification (accuracy)")
    assert console_errors == []



@pytest.fixture
def small_pages(tmp_path):
    """gunicorn (no worker: jobs stay queued) with two jobs per page."""
    port = free_port()
    env = dict(os.environ, JOBCLOUD_DATA_DIR=str(tmp_path / "live"), JOBCLOUD_BIND=f"127.0.0.1:{port}",
               JOBCLOUD_LOG_LEVEL="WARNING", JOBCLOUD_PAGE_SIZE="2", JOBCLOUD_LIVE_STREAM_S="2")
    for name in ("JOBCLOUD_CONFIG", "JOBCLOUD_DATABASE_URL"):
        env.pop(name, None)
    proc = start_gunicorn(env, port, workers=2)
    yield LiveServer(f"http://127.0.0.1:{port}", proc, env, tmp_path / "live")
    stop_gunicorn(proc)


@pytest.mark.live
def test_job_list_adds_rows_only_for_new_jobs_and_outlives_error_answers(page, console_errors,
                                                                         small_pages):
    from playwright.sync_api import expect

    url = small_pages.url
    one_time = re.search(r"one-time password: (\S+)", small_pages.admin("user", "add", "erin")).group(1)
    token = re.search(r"jcu_\S+", small_pages.admin("token", "create", "--user", "erin")).group(0)
    api = {"Authorization": f"Bearer {token}"}

    def submit() -> str:
        r = requests.post(f"{url}/api/v1/jobs", headers=api, files={"code": (None, "print(1)")},
                          timeout=10)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def cancel(job_id: str) -> None:
        assert requests.post(f"{url}/api/v1/jobs/{job_id}/cancel", headers=api,
                             timeout=10).status_code == 200

    log_in(page, url, "erin", one_time)
    jobs = [submit() for _ in range(3)]  # all queued, all active: the stream sends each one
    # The first two answers are not a stream, as from a front proxy while the
    # proxy restarts: the browser gives up on them, the page opens new ones.
    refused = []

    def flaky(route):
        if len(refused) < 2:
            refused.append(route.request.url)
            route.fulfill(status=502, content_type="text/html", body="<h1>502 Bad Gateway</h1>")
        else:
            route.continue_()
    page.route("**/job-status/erin/events*", flaky)
    page.goto(url + "/job-status/erin")
    rows = page.locator("tr[data-job]")
    expect(rows).to_have_count(2)
    page.wait_for_function("() => window.jobcloudLive.opens >= 1", timeout=20_000)
    assert len(refused) == 2 and page.evaluate("window.jobcloudLive.connections") == 3
    # It resumed from the page's own time: a job submitted since gets a row on top...
    fourth = submit()
    expect(rows.first).to_have_attribute("data-job", fourth)
    cancel(jobs[1])
    expect(page.locator(f'tr[data-job="{jobs[1]}"] .badge')).to_have_text("cancelled")
    # ... and the oldest, active but on the second page, none.
    assert [rows.nth(i).get_attribute("data-job") for i in range(rows.count())] == \
        [fourth, jobs[2], jobs[1]]

    page.unroute("**/job-status/erin/events*")
    page.goto(url + f"/job-status/erin?before={jobs[2]}")
    expect(rows).to_have_count(2)
    page.wait_for_function("() => window.jobcloudLive.opens >= 1")
    submit()
    cancel(jobs[0])  # sent after the new job: once it shows, the new one was seen
    expect(page.locator(f'tr[data-job="{jobs[0]}"] .badge')).to_have_text("cancelled")
    assert [rows.nth(i).get_attribute("data-job") for i in range(rows.count())] == [jobs[1], jobs[0]]
    # Times show in the browser's zone, not as the page's UTC ISO text.
    assert not rows.first.locator("time").first.inner_text().endswith("Z")
    # Chromium logs each refused stream itself; nothing else may be logged.
    assert len([m for m in console_errors if "events" in m or "502" in m or "MIME" in m]) >= 2, \
        console_errors
    assert [m for m in console_errors if not ("events" in m or "502" in m or "MIME" in m)] == []
