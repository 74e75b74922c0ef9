"""The clients of `python -m bench load` (run by bench/loadtest.py, not by hand).

Each locust user is one student with an account of their own: they poll their
jobs, read logs, open their status page and now and then submit a job, with a
pause between actions as a person (or a self-refreshing page) makes.
JOBCLOUD_LOAD_ACCOUNTS names a JSON file: [{"name", "token", "jobs": [ids]}].
"""
from __future__ import annotations

import itertools
import json
import os
import random

from locust import FastHttpUser, between, task

from bench.forms import job_form

ACCOUNTS = json.loads(open(os.environ["JOBCLOUD_LOAD_ACCOUNTS"]).read())
_next_account = itertools.count()
THINK_S = tuple(float(x) for x in os.environ.get("JOBCLOUD_LOAD_THINK_S", "0.5,2").split(","))


class Student(FastHttpUser):
    wait_time = between(*THINK_S)

    def on_start(self) -> None:
        self.account = ACCOUNTS[next(_next_account) % len(ACCOUNTS)]
        self.auth = {"Authorization": f"Bearer {self.account['token']}"}
        self.jobs = list(self.account["jobs"])
        self.submitted = 0

    @task(5)
    def poll_job(self) -> None:
        self.client.get(f"/api/v1/jobs/{random.choice(self.jobs)}", headers=self.auth,
                        name="status poll: GET /api/v1/jobs/<id>")

    @task(2)
    def status_page(self) -> None:
        self.client.get(f"/job-status/{self.account['name']}",
                        headers=dict(self.auth, Accept="text/html"),
                        name="status page: GET /job-status/<user>")

    @task(3)
    def read_log(self) -> None:
        self.client.get(f"/api/v1/jobs/{random.choice(self.jobs)}/logs?stream=stdout",
                        headers=self.auth, name="log read: GET /api/v1/jobs/<id>/logs")

    @task(1)
    def submit(self) -> None:
        self.submitted += 1
        body, content_type = job_form(
            f"print('{self.account['name']} job {self.submitted}')\n".encode())
        with self.client.post("/api/v1/jobs", data=body, headers=dict(
                self.auth, **{"Content-Type": content_type}), name="submission: POST /api/v1/jobs",
                catch_response=True) as r:
            if r.status_code != 201:
                r.failure(f"answered {r.status_code}")
            else:
                self.jobs.append(r.json()["id"])
