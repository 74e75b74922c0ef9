"""The browser pages: the upload form, one job's page, cancel, downloads, and
/job-status/<user> (newest first, paginated, auto-refresh while jobs are
active, JSON for Accept: application/json, visible to its user and admins only).
"""
import re
import time

import pytest

from proxy import close_app, create_app
from tests.conftest import csrf_from, login, wait_until
from tests.test_api import ProtocolWorker, make_zip, submit

PAGE_SIZE = 3
JSON = {"Accept": "application/json"}
REFRESH = '<meta http-equiv="refresh"'


@pytest.fixture
def app(make_config):
    """The app with small pages, so a handful of jobs spans several of them."""
    application = create_app(make_config(page_size=PAGE_SIZE))
    yield application
    close_app(application)


@pytest.fixture
def alice(client, users):
    """alice, logged in on `client`."""
    user = users.create("alice")
    login(client, "alice", user["password"])
    return user


def _job_ids(html: str) -> list[str]:
    return re.findall(r'<small class="muted">(j[0-9a-f]+)</small>', html)


def _older_link(html: str) -> str | None:
    found = re.search(r'<a rel="next" href="([^"]+)">Older jobs', html)
    return found.group(1).replace("&amp;", "&") if found else None


# ------------------------------------------------------------ upload and cancel

def test_upload_form_accepts_pasted_code_and_cancel_form_cancels(client, alice):
    form = client.get("/").get_data(as_text=True)
    assert 'name="code"' in form and 'enctype="multipart/form-data"' in form
    r = client.post("/jobs", content_type="multipart/form-data",
                    data={"csrf_token": csrf_from(client), "code": "print('hi')", "name": "hello"})
    assert r.status_code == 302
    job_id = re.fullmatch(r"/jobs/(j[0-9a-f]+)", r.headers["Location"]).group(1)

    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert '<span class="badge queued" id="state">queued</span>' in page
    assert "accepted" in page and "Cancel job" in page and REFRESH in page

    r = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": csrf_from(client)})
    assert r.status_code == 302 and r.headers["Location"] == f"/jobs/{job_id}"
    page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="state">cancelled<' in page and "Cancel job" not in page and REFRESH not in page


def test_upload_form_shows_what_is_wrong(client, alice):
    r = client.post("/jobs", content_type="multipart/form-data",
                    data={"csrf_token": csrf_from(client), "code": "", "name": "empty"})
    assert r.status_code == 400
    assert "no script" in r.get_data(as_text=True)
    assert client.get("/api/v1/jobs", headers=alice["headers"]).json["jobs"] == []


def test_job_output_is_escaped_on_its_page(client, users, alice):
    job = submit(client, alice["headers"], name="<b onmouseover=alert(1)>x")
    worker = ProtocolWorker(client, users.enrollment())
    worker.finish(worker.claim()[0], stdout="<script>alert(1)</script>\n")

    page = client.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page
    assert "<b onmouseover" not in page and "&lt;b onmouseover=alert(1)&gt;x" in page
    listing = client.get("/job-status/alice").get_data(as_text=True)
    assert "<b onmouseover" not in listing and "&lt;b onmouseover=alert(1)&gt;x" in listing


def test_outputs_download_as_attachment_for_the_owner_only(app, client, users, alice):
    job = submit(client, alice["headers"])
    archive = make_zip({"result.csv": b"a,b\n1,2\n"})
    worker = ProtocolWorker(client, users.enrollment())
    worker.finish(worker.claim()[0], outputs=archive)
    assert f'href="/jobs/{job["id"]}/outputs"' in client.get(f"/jobs/{job['id']}").get_data(as_text=True)

    r = client.get(f"/jobs/{job['id']}/outputs")
    assert r.status_code == 200 and r.data == archive
    assert r.headers["Content-Disposition"].startswith("attachment;")
    assert r.headers["X-Content-Type-Options"] == "nosniff"

    bob = users.create("bob")
    other = app.test_client()
    login(other, "bob", bob["password"])
    assert other.get(f"/jobs/{job['id']}/outputs").status_code == 404
    assert other.get(f"/jobs/{job['id']}").status_code == 404
    r = other.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": csrf_from(other)})
    assert r.status_code == 404


def test_others_cannot_cancel_from_the_page(app, client, users, alice):
    job = submit(client, alice["headers"])
    bob = users.create("bob")
    other = app.test_client()
    login(other, "bob", bob["password"])
    r = other.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": csrf_from(other)})
    assert r.status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=alice["headers"]).json["state"] == "queued"


# -------------------------------------------------------------- /job-status

def _submit_in_turn(client, user, n: int) -> list[str]:
    """Submit n jobs, each in a later millisecond than the one before.

    Job ids order by their submission millisecond (models.new_id); two jobs in
    the same millisecond have no defined order, so the test does not make any.
    """
    ids = []
    for i in range(n):
        ids.append(submit(client, user["headers"], name=f"job{i}")["id"])
        done = int(time.time() * 1000)
        wait_until(lambda: int(time.time() * 1000) > done, timeout=1, interval=0.0005,
                   what="the next millisecond")
    return ids


def test_job_status_pages_newest_first_without_overlap(client, alice):
    submitted = _submit_in_turn(client, alice, 2 * PAGE_SIZE + 1)

    # JSON, following the 'next' cursor.
    pages, url = [], "/job-status/alice"
    while url:
        r = client.get(url, headers=JSON)
        assert r.status_code == 200 and r.mimetype == "application/json"
        assert r.json["user"] == "alice"
        pages.append([j["id"] for j in r.json["jobs"]])
        url = r.json["next"]
    assert [len(p) for p in pages] == [PAGE_SIZE, PAGE_SIZE, 1]
    json_order = [i for p in pages for i in p]
    assert json_order == submitted[::-1]

    # HTML, following the "Older jobs" link: the same jobs in the same order.
    html_order, url = [], "/job-status/alice"
    while url:
        page = client.get(url).get_data(as_text=True)
        ids = _job_ids(page)
        assert 0 < len(ids) <= PAGE_SIZE
        html_order += ids
        url = _older_link(page)
    assert html_order == json_order


def test_job_status_refreshes_only_while_jobs_are_active(client, users, alice):
    assert REFRESH not in client.get("/job-status/alice").get_data(as_text=True)  # no jobs
    job = submit(client, alice["headers"])
    assert REFRESH in client.get("/job-status/alice").get_data(as_text=True)  # queued

    worker = ProtocolWorker(client, users.enrollment())
    [claimed] = worker.claim()
    page = client.get("/job-status/alice").get_data(as_text=True)
    assert REFRESH in page and 'class="state-running"' in page

    worker.finish(claimed, stdout="done")
    page = client.get("/job-status/alice").get_data(as_text=True)
    assert REFRESH not in page and 'class="state-succeeded"' in page
    assert client.get("/job-status/alice", headers=JSON).json["jobs"][0]["id"] == job["id"]


def test_job_status_is_for_its_user_and_admins(app, client, users, alice):
    job = submit(client, alice["headers"])
    bob, root = users.create("bob"), users.create("root", admin=True)

    for headers in (bob["headers"], {**bob["headers"], **JSON}):
        r = client.get("/job-status/alice", headers=headers)
        assert r.status_code == 404 and job["id"] not in r.get_data(as_text=True)
    assert client.get("/job-status/alice", headers={**bob["headers"], **JSON}).json["error"] \
        == "user_not_found"
    # A name that does not exist answers the same as one that is not yours.
    assert client.get("/job-status/nobody", headers={**bob["headers"], **JSON}).status_code == 404

    r = client.get("/job-status/alice", headers={**root["headers"], **JSON})
    assert r.status_code == 200 and r.json["jobs"][0]["id"] == job["id"]
    admin_browser = app.test_client()
    login(admin_browser, "root", root["password"])
    assert job["id"] in admin_browser.get("/job-status/alice").get_data(as_text=True)


def test_job_status_without_login(app):
    anonymous = app.test_client()
    r = anonymous.get("/job-status/alice")
    assert r.status_code == 302 and r.headers["Location"] == "/login?next=/job-status/alice"
    r = anonymous.get("/job-status/alice", headers=JSON)
    assert r.status_code == 401 and set(r.json) == {"error", "detail"}


def test_the_form_the_editor_the_job_page_and_the_readme_place_the_dataset_alike(client, alice):
    """One sentence for where the unzipped dataset appears in the job: the place
    worker/sandbox.py mounts it."""
    import html
    import io
    from pathlib import Path

    from worker.sandbox import DATA_PATH

    place = f"unpacked read-only into {DATA_PATH} ($JOBCLOUD_DATA)"
    job = submit(client, alice["headers"],
                 dataset=(io.BytesIO(make_zip({"a.csv": b"x,y\n1,2\n"})), "data.zip"))
    for path in ("/", "/new", f"/jobs/{job['id']}"):
        page = html.unescape(client.get(path).get_data(as_text=True))
        assert place in " ".join(page.split()), path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert place in " ".join(readme.split())
