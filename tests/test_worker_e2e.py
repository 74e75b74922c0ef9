"""End to end in a real browser: a user logs in, uploads a training script and
a zipped CSV through the form, watches the status page until the job has
succeeded, and downloads its outputs. Everything is real: gunicorn, the worker
subprocess, the Docker engine with jobcloud/ml, Chromium driven by Playwright.
"""
from __future__ import annotations

import json
import pickle
import random
import re
import zipfile

import pytest

from tests.conftest import require, stop_gunicorn
from tests.test_browser import console_errors, log_in_first_time, page  # noqa: F401  (fixtures)
from tests.test_worker_sandbox import IMAGE, docker_ready, start_cluster, stop_worker

ML_IMAGE = "jobcloud/ml"
SPECIES = ["setosa", "versicolor", "virginica"]

TRAIN_SCRIPT = '''\
"""Train a classifier on the uploaded CSV; write the model and its metrics."""
import json
import os
import pickle

import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

frame = pd.read_csv(os.path.join(os.environ["JOBCLOUD_DATA"], "iris.csv"))
X, y = frame.drop(columns="species").to_numpy(), frame["species"].to_numpy()
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
model = LogisticRegression(max_iter=1000).fit(X_train, y_train)
accuracy = float(model.score(X_test, y_test))
out = os.environ["JOBCLOUD_OUTPUT"]
with open(os.path.join(out, "model.pkl"), "wb") as f:
    pickle.dump(model, f)
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({"accuracy": accuracy, "classes": sorted(set(y)), "n_train": len(y_train),
               "n_test": len(y_test)}, f)
print(f"accuracy {accuracy:.3f}")
'''


def iris_like_csv(rows_per_class: int = 50, seed: int = 3) -> str:
    """150 rows of synthetic iris: four features drawn around per-species means."""
    rng = random.Random(seed)
    means = {"setosa": (5.0, 3.4, 1.5, 0.2), "versicolor": (5.9, 2.8, 4.3, 1.3),
             "virginica": (6.6, 3.0, 5.6, 2.0)}
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    for name in SPECIES:
        for _ in range(rows_per_class):
            values = (round(rng.gauss(m, 0.3), 2) for m in means[name])
            lines.append(",".join(map(str, values)) + f",{name}")
    return "\n".join(lines) + "\n"


def require_ml_image() -> None:
    """A Docker engine with the jobcloud/ml image, or a skip (a failure under CI)."""
    ok, reason = docker_ready()
    require(ok, reason)
    import docker
    try:
        docker.from_env(timeout=10).images.get(ML_IMAGE)
        has_ml = True
    except docker.errors.DockerException:
        has_ml = False
    require(has_ml, f"image {ML_IMAGE} missing; run scripts/build-images.sh ml")


@pytest.fixture
def ml_cluster(tmp_path):
    require_ml_image()
    # A 1 s refresh keeps the wait for the status page short.
    c = start_cluster(tmp_path / "cluster", slots=1, gunicorn_workers=2,
                      proxy_env={"JOBCLOUD_STATUS_REFRESH_S": "1"},
                      worker_images=f"{IMAGE},{ML_IMAGE}")
    try:
        yield c
    finally:
        stop_worker(c.worker)
        stop_gunicorn(c.server.proc)


@pytest.mark.live
def test_browser_upload_train_and_download_outputs(page, console_errors, ml_cluster, tmp_path):
    from playwright.sync_api import expect

    url = ml_cluster.server.url
    one_time = re.search(r"one-time password: (\S+)",
                         ml_cluster.server.admin("user", "add", "carol")).group(1)
    script = tmp_path / "train_iris.py"
    script.write_text(TRAIN_SCRIPT)
    dataset = tmp_path / "iris.zip"
    with zipfile.ZipFile(dataset, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("iris.csv", iris_like_csv())

    # First login: the one-time password must be replaced before anything else.
    log_in_first_time(page, url, "carol", one_time)

    page.get_by_label("Job name").fill("iris-training")
    page.get_by_label("A .py file").set_input_files(str(script))
    page.get_by_label("Dataset, optional").set_input_files(str(dataset))
    page.locator("select[name=image]").select_option(ML_IMAGE)
    page.get_by_role("button", name="Submit job").click()
    expect(page).to_have_url(re.compile(r"/jobs/j[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]

    # The status page refreshes itself while the job is active: wait for the badge.
    page.goto(f"{url}/job-status/carol")
    row = page.locator("#jobs tr", has_text=job_id)
    try:
        expect(row.locator(".badge")).to_have_text("succeeded", timeout=120_000)
    except AssertionError:
        raise AssertionError(f"job page: {page.content()[-3000:]}\n"
                             f"worker log:\n{ml_cluster.log_tail()}") from None

    row.get_by_role("link", name="iris-training").click()
    expect(page).to_have_url(f"{url}/jobs/{job_id}")
    expect(page.locator("#state")).to_have_text("succeeded")
    expect(page.locator("#stdout")).to_contain_text("accuracy")
    with page.expect_download() as info:
        page.get_by_role("link", name=re.compile("Download outputs")).click()
    saved = tmp_path / "outputs.zip"
    info.value.save_as(saved)

    with zipfile.ZipFile(saved) as zf:
        assert sorted(zf.namelist()) == ["metrics.json", "model.pkl"]
        metrics = json.loads(zf.read("metrics.json"))
        model_bytes = zf.read("model.pkl")
    # Three balanced classes: chance is 1/3; well-separated clusters give far more.
    assert metrics["accuracy"] > 0.6, metrics
    assert metrics["classes"] == SPECIES and metrics["n_train"] + metrics["n_test"] == 150
    # A pickled scikit-learn estimator, not an empty file (unpickling it would need
    # scikit-learn in the tests' venv: look at the pickle's opcodes instead).
    assert model_bytes[:1] == pickle.PROTO and b"LogisticRegression" in model_bytes
    assert console_errors == []


ML_STACK_SCRIPT = '''\
import cv2, matplotlib, numpy, pandas, PIL.Image, scipy.linalg, sklearn, torch
matplotlib.use("Agg")
import matplotlib.pyplot as plt

x = torch.arange(6.0).reshape(2, 3)
print("torch", float((x @ x.T).sum()))
image = numpy.zeros((8, 8, 3), numpy.uint8)
print("cv2", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).shape)
print("scipy", round(float(scipy.linalg.det(numpy.eye(3) * 2)), 3))
print("pandas", int(pandas.DataFrame({"a": [1, 2, 3]})["a"].sum()))
PIL.Image.fromarray(image).save("tiny.png")
plt.plot([1, 2, 3]); plt.savefig("plot.png")
print("sklearn", sklearn.__version__.split(".")[0] >= "1")
'''


@pytest.mark.live
def test_ml_image_runs_the_whole_stack(ml_cluster):
    """jobcloud/ml has numpy, scipy, pandas, scikit-learn, PyTorch (CPU), OpenCV,
    matplotlib and Pillow, usable by the non-root job user on a read-only root."""
    job_id = ml_cluster.submit(ML_STACK_SCRIPT, image=ML_IMAGE, memory_mb=1024, timeout_s=120)
    job = ml_cluster.wait(job_id, timeout=120)
    out = ml_cluster.logs(job_id)["data"]
    assert job["state"] == "succeeded", (job, out, ml_cluster.logs(job_id, "stderr")["data"])
    assert "torch 83.0" in out and "cv2 (8, 8)" in out and "scipy 8.0" in out
    assert "pandas 6" in out and "sklearn True" in out
    assert sorted(ml_cluster.outputs(job_id).namelist()) == ["plot.png", "tiny.png"]


# What scikit-learn's examples and notebooks import beyond the stack above, each
# used for real: pandas' Styler renders HTML through jinja2, seaborn plots
# through pyplot with no matplotlib.use() (MPLBACKEND=Agg from the image),
# statsmodels, h5py and tqdm. Then joblib with n_jobs=2 on the job's 2 CPUs:
# each of its worker processes must get 2 // 2 = 1 BLAS thread (2 in all),
# and the job's own process 2, as threadpoolctl sees them.
ML_NOTEBOOK_SCRIPT = '''\
import json, os, sys
import h5py, jinja2, matplotlib, numpy, pandas, seaborn, statsmodels.api as sm, tqdm
from joblib import Parallel, delayed, cpu_count
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_validate
from threadpoolctl import threadpool_info


def blas_threads(_):
    import numpy  # noqa: F401  (loads OpenBLAS in the joblib worker)
    from threadpoolctl import threadpool_info
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


X, y = load_iris(return_X_y=True, as_frame=True)
scores = pandas.DataFrame(cross_validate(LogisticRegression(max_iter=500), X, y, cv=3, n_jobs=2))
with open("scores.html", "w") as f:
    f.write(scores.describe().style.format(precision=3).to_html())
ax = seaborn.scatterplot(data=X.assign(species=y), x="sepal length (cm)", y="petal length (cm)",
                         hue="species")
ax.figure.savefig("scatter.png")
ols = sm.OLS(X["petal length (cm)"], sm.add_constant(X[["sepal length (cm)"]])).fit()
with h5py.File("features.h5", "w") as f:
    f["X"] = X.to_numpy()
with h5py.File("features.h5", "r") as f:
    shape = f["X"].shape
total = sum(1 for _ in tqdm.tqdm(range(3), file=sys.stderr))
print(json.dumps({
    "backend": matplotlib.get_backend(), "mplbackend": os.environ.get("MPLBACKEND"),
    "threads_env": {k: os.environ.get(k) for k in (
        "OMP_THREAD_LIMIT", "GOTO_NUM_THREADS", "LOKY_MAX_CPU_COUNT", "NUMEXPR_MAX_THREADS",
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    "cpu_count": cpu_count(),
    "main_blas": [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"],
    "worker_blas": Parallel(n_jobs=2)(delayed(blas_threads)(i) for i in range(4)),
    "accuracy": round(float(scores["test_score"].mean()), 2), "ols_r2": round(float(ols.rsquared), 2),
    "h5": list(shape), "tqdm": total, "jinja2": jinja2.__version__.split(".")[0]}))
'''


@pytest.mark.live
def test_ml_image_runs_notebook_libraries_with_threads_sized_to_the_job(ml_cluster):
    """jobcloud/ml has jinja2, seaborn, statsmodels, h5py and tqdm; plots go to
    PNG without a display; BLAS threads follow the job's CPUs, also in joblib's
    workers (worker/sandbox.py thread_limits)."""
    job_id = ml_cluster.submit(ML_NOTEBOOK_SCRIPT, image=ML_IMAGE, cpus=2, memory_mb=1536,
                               timeout_s=180)
    job = ml_cluster.wait(job_id, timeout=180)
    out = ml_cluster.logs(job_id)["data"]
    assert job["state"] == "succeeded", (job, out, ml_cluster.logs(job_id, "stderr")["data"])
    facts = json.loads(out.strip().splitlines()[-1])
    assert facts["mplbackend"] == "Agg" and facts["backend"].lower() == "agg", facts
    assert facts["threads_env"] == {"OMP_THREAD_LIMIT": "2", "GOTO_NUM_THREADS": "2",
                                    "LOKY_MAX_CPU_COUNT": "2", "NUMEXPR_MAX_THREADS": "2",
                                    "OMP_NUM_THREADS": None, "OPENBLAS_NUM_THREADS": None}, facts
    assert facts["cpu_count"] == 2 and facts["main_blas"] == [2], facts
    # 2 // n_jobs each: 2 BLAS threads in all, not 2 x 2.
    assert facts["worker_blas"] == [[1]] * 4, facts
    assert facts["accuracy"] > 0.9 and facts["ols_r2"] > 0.5, facts
    assert facts["h5"] == [150, 4] and facts["tqdm"] == 3 and facts["jinja2"] == "3", facts
    outputs = ml_cluster.outputs(job_id)
    assert sorted(outputs.namelist()) == ["features.h5", "scatter.png", "scores.html"]
    assert outputs.read("scatter.png")[:8] == b"\x89PNG\r\n\x1a\n"
    html = outputs.read("scores.html").decode()
    assert "<table" in html and "test_score" in html
