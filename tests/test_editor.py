"""The code editor page (/new): CodeMirror served from the proxy (or the plain
text area when the bundle is not built), the three starter templates, "Run"
through the ordinary submission path, and the templates running to success on
jobcloud/ml with a real worker and the sample datasets they need.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import zipfile
import zlib
from pathlib import Path

import pytest

from proxy import close_app, create_app, job_templates
from tests.conftest import Users, csrf_from, login, require
from tests.test_worker_e2e import ML_IMAGE, iris_like_csv, ml_cluster  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "proxy" / "static"
EDITOR = ROOT / "proxy" / "editor"


@pytest.fixture
def alice(client, users):
    user = users.create("alice")
    login(client, "alice", user["password"])
    return user


def test_new_job_page_offers_the_templates_and_the_editor(client, alice):
    page = client.get("/new").get_data(as_text=True)
    for t in job_templates.TEMPLATES:
        assert f'<option value="{t.key}" data-image="jobcloud/ml"' in page
        # The code travels in the page (escaped), not from another origin.
        assert f'<textarea hidden id="template-{t.key}">' in page
    assert '<textarea name="code" id="code"' in page and 'enctype="multipart/form-data"' in page
    assert 'action="/jobs"' in page and 'name="csrf_token"' in page
    assert "https://" not in page.split("<main>")[1]  # nothing from a CDN
    assert '<script src="/static/new_job.js">' in page
    has_bundle = (STATIC / "editor.bundle.js").exists()
    assert ('<script src="/static/editor.bundle.js">' in page) == has_bundle
    if has_bundle:
        assert client.get("/static/editor.bundle.js").status_code == 200
    assert 'href="/new">Code editor</a>' in client.get("/").get_data(as_text=True)


def test_new_job_page_falls_back_to_a_text_area_without_the_bundle(app, client, alice, tmp_path):
    bare = tmp_path / "static"
    shutil.copytree(STATIC, bare, ignore=shutil.ignore_patterns("editor.bundle.js"))
    app.static_folder = str(bare)
    page = client.get("/new").get_data(as_text=True)
    assert "editor.bundle.js" not in page and '<textarea name="code" id="code"' in page


def test_templates_are_offered_only_for_images_the_proxy_has(make_config):
    """A template also picks its image: one for an image not in `images` is not offered."""
    app = create_app(make_config(images="jobcloud/python", default_image="jobcloud/python"))
    client = app.test_client()
    login(client, "carol", Users(app).create("carol")["password"])
    page = client.get("/new").get_data(as_text=True)
    assert "data-image=" not in page and 'id="template-' not in page
    assert '<option value="jobcloud/python" selected>' in page and "jobcloud/ml" not in page
    assert [t["key"] for t in job_templates.load((ML_IMAGE,))] == ["pytorch", "sklearn", "opencv"]
    close_app(app)


def test_editor_build_without_a_reachable_registry_warns_and_succeeds(tmp_path):
    """The bundle is optional: an offline `npm ci` must not fail `make run` or `make test`."""
    require(shutil.which("npm") and shutil.which("node"), "node and npm are not installed")
    editor = tmp_path / "proxy" / "editor"
    editor.mkdir(parents=True)
    (tmp_path / "proxy" / "static").mkdir()
    for name in ("package.json", "package-lock.json", "src"):
        copy = shutil.copytree if (EDITOR / name).is_dir() else shutil.copy
        copy(EDITOR / name, editor / name)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "build-editor.sh", tmp_path / "scripts")
    # A closed port as the registry, and an empty cache, so nothing is found offline either.
    env = dict(os.environ, npm_config_registry="http://127.0.0.1:9/",
               npm_config_cache=str(tmp_path / "npm-cache"), npm_config_fetch_retries="0")
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "build-editor.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "build-editor: npm ci failed" in done.stderr and "plain text area" in done.stderr
    assert not (tmp_path / "proxy" / "static" / "editor.bundle.js").exists()


def test_new_job_page_needs_a_login(app):
    r = app.test_client().get("/new")
    assert r.status_code == 302 and r.headers["Location"] == "/login?next=/new"


def test_templates_are_python_and_run_submits_them_like_the_form(client, alice):
    for t in job_templates.load((ML_IMAGE,)):
        compile(t["code"], t["key"], "exec")
    code = job_templates.load((ML_IMAGE,))[0]["code"]
    r = client.post("/jobs", content_type="multipart/form-data",
                    data={"csrf_token": csrf_from(client, "/new"), "code": code, "image": ML_IMAGE,
                          "name": "from-the-editor"})
    assert r.status_code == 302, r.get_data(as_text=True)
    job_id = re.fullmatch(r"/jobs/(j[0-9a-f]+)", r.headers["Location"]).group(1)
    job = client.get(f"/api/v1/jobs/{job_id}", headers=alice["headers"]).json
    assert job["image"] == ML_IMAGE and job["script"]["size"] == len(code.encode())


# ------------------------------------------------- the templates, really run

def png(width: int, height: int, pixel) -> bytes:
    """A grayscale PNG written by hand (the tests' venv has no imaging library)."""
    rows = b"".join(b"\x00" + bytes(pixel(x, y) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def zipped(files: dict[str, bytes | str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


SAMPLE_DATASETS = {
    "pytorch": None,
    "sklearn": zipped({"iris.csv": iris_like_csv()}),
    "opencv": zipped({
        "square.png": png(64, 48, lambda x, y: 255 if 16 < x < 48 and 12 < y < 36 else 0),
        "stripes/vertical.png": png(40, 40, lambda x, y: 255 if (x // 5) % 2 else 0),
        "flat.png": png(20, 30, lambda x, y: 128),
    }),
}


@pytest.mark.live
@pytest.mark.slow
def test_templates_run_to_success_on_the_ml_image(ml_cluster):  # noqa: F811
    submitted = {
        t["key"]: ml_cluster.submit(t["code"], dataset=SAMPLE_DATASETS[t["key"]], image=ML_IMAGE,
                                    memory_mb=1024, timeout_s=300, name=t["key"])
        for t in job_templates.load((ML_IMAGE,))}
    results = {key: ml_cluster.wait(job_id, timeout=240) for key, job_id in submitted.items()}
    for key, job in results.items():
        assert job["state"] == "succeeded", (key, job, ml_cluster.logs(job["id"], "stderr")["data"])

    out = ml_cluster.logs(submitted["pytorch"])["data"]
    assert "epoch  60" in out and "test accuracy" in out
    files = ml_cluster.outputs(submitted["pytorch"])
    assert sorted(files.namelist()) == ["metrics.json", "model.pt"]
    # Two spirals are far from linearly separable; the network learns them.
    assert json.loads(files.read("metrics.json"))["test_accuracy"] > 0.8

    out = ml_cluster.logs(submitted["sklearn"])["data"]
    assert "read iris.csv: 150 rows" in out and "classification (accuracy)" in out
    files = ml_cluster.outputs(submitted["sklearn"])
    assert sorted(files.namelist()) == ["metrics.json", "model.pkl", "predictions.csv"]
    metrics = json.loads(files.read("metrics.json"))
    assert metrics["target"] == "species" and metrics["score"] > 0.6 and metrics["rows"] == 150

    out = ml_cluster.logs(submitted["opencv"])["data"]
    assert "processed 3 of 3 images" in out
    files = ml_cluster.outputs(submitted["opencv"])
    names = set(files.namelist())
    for image in ("square.png", "stripes_vertical.png", "flat.png"):
        assert f"edges/{image}" in names and f"thumbnails/{image}" in names
    summary = files.read("summary.csv").decode().splitlines()
    assert summary[0] == "image,width,height,mean_brightness,edge_share" and len(summary) == 4
    flat = next(line for line in summary if line.startswith("flat.png"))
    assert flat == "flat.png,20,30,128.0,0.0"  # a flat image has no edges
    assert files.read("edges/square.png")[:8] == b"\x89PNG\r\n\x1a\n"
