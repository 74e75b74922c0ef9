"""Operations endpoints: /healthz and /metrics (Prometheus text format).

Metrics are computed from the database at scrape time, not counted in process
memory, so every gunicorn process and proxy instance reports the same truth.

/metrics tells queue depth per state, workers, VMs and storage per user: with `metrics_token`
set it asks every client for that bearer token; without one it answers
loopback clients only (README, "Metrics").
"""
from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import retention, vms
from .appstate import app_state
from .db import get_conn
from .errors import Forbidden, StoreUnavailable, Unauthorized
from .models import JobState, WorkerState

bp = Blueprint("ops", __name__)

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


@bp.route("/healthz", methods=["GET"])
def healthz():
    try:
        get_conn().query_one("SELECT 1 AS ok")
    except StoreUnavailable as e:
        return jsonify({"status": "unavailable", "detail": e.detail}), 503
    return jsonify({"status": "ok"})


@bp.route("/metrics", methods=["GET"])
def metrics():
    check_metrics_access(app_state().config.metrics_token)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(get_conn()))
    cfg = app_state().config
    registry.register(StorageCollector(get_conn(), default_days=cfg.retention_days,
                                       default_quota_mb=cfg.storage_quota_mb))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")


def check_metrics_access(token: str) -> None:
    """Let the request read /metrics, or raise.

    Raises:
        Unauthorized: a token is configured and the request lacks it (or sends another).
        Forbidden: no token is configured and the client is not on loopback.
    """
    if token:
        scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(),
                                                                 token.encode()):
            raise Unauthorized("/metrics needs the bearer token set as metrics_token",
                               code="metrics_token_required",
                               headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    elif not _loopback(request.remote_addr):
        raise Forbidden("/metrics answers loopback clients only unless metrics_token is set",
                        code="metrics_loopback_only")


def _loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class StoreCollector:
    def __init__(self, conn):
        self.conn = conn

    def collect(self):
        conn = self.conn
        by_state = {r["state"]: r["n"] for r in conn.query(
            "SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        jobs = GaugeMetricFamily("jobcloud_jobs", "Jobs by state", labels=["state"])
        for s in JobState:
            jobs.add_metric([s.value], by_state.get(s.value, 0))
        yield jobs
        yield GaugeMetricFamily("jobcloud_queue_depth", "Jobs waiting for a worker",
                                value=by_state.get(JobState.QUEUED.value, 0))
        yield CounterMetricFamily("jobcloud_submissions", "Jobs ever accepted",
                                  value=sum(by_state.values()))
        workers = GaugeMetricFamily("jobcloud_workers", "Workers by state", labels=["state"])
        w_state = {r["state"]: r["n"] for r in conn.query(
            "SELECT state, COUNT(*) AS n FROM workers GROUP BY state")}
        for s in WorkerState:
            workers.add_metric([s.value], w_state.get(s.value, 0))
        yield workers
        yield self._durations()
        yield from self._scaler()

    def _scaler(self):
        """What the VM scaler last reported (proxy/vms.py): its VMs and its decisions."""
        counts = vms.vm_counts(self.conn)
        by_state = GaugeMetricFamily("jobcloud_vms", "Worker VMs by state, as the scaler reported",
                                     labels=["state"])
        for s in vms.VM_STATES:
            by_state.add_metric([s], counts.get(s, 0))
        yield by_state
        decisions = CounterMetricFamily("jobcloud_scaler_decisions",
                                        "Decisions the VM scaler took, by action", labels=["action"])
        for action, n in sorted(vms.decision_counts(self.conn).items()):
            decisions.add_metric([action], n)
        yield decisions

    def _durations(self):
        cases = ", ".join(
            f"SUM(CASE WHEN finished_at - started_at <= {b} THEN 1 ELSE 0 END) AS le_{i}"
            for i, b in enumerate(DURATION_BUCKETS))
        row = self.conn.query_one(
            f"SELECT COUNT(*) AS n, COALESCE(SUM(finished_at - started_at), 0) AS total, {cases}"
            " FROM jobs WHERE finished_at IS NOT NULL AND started_at IS NOT NULL")
        buckets = [(str(b), row[f"le_{i}"] or 0) for i, b in enumerate(DURATION_BUCKETS)]
        buckets.append(("+Inf", row["n"]))
        return HistogramMetricFamily("jobcloud_job_duration_seconds",
                                     "Run time of finished jobs (start to finish)",
                                     buckets=buckets, sum_value=row["total"])


class StorageCollector:
    """Stored bytes per user and their quotas (retention.py): one gauge each, labelled by user."""

    def __init__(self, conn, *, default_days: int, default_quota_mb: int):
        self.conn = conn
        self.defaults = {"default_days": default_days, "default_quota_mb": default_quota_mb}

    def collect(self):
        stored = GaugeMetricFamily("jobcloud_storage_bytes",
                                   "Bytes of files kept for each user's unexpired jobs",
                                   labels=["user"])
        quota = GaugeMetricFamily("jobcloud_storage_quota_bytes",
                                  "Each user's storage quota (users with a quota)", labels=["user"])
        for s in retention.storage_report(self.conn, **self.defaults):
            stored.add_metric([s["user"]], s["bytes"])
            if s["quota_bytes"] is not None:
                quota.add_metric([s["user"]], s["quota_bytes"])
        yield stored
        yield quota
        pending = self.conn.query_one("SELECT COUNT(*) AS n FROM blob_deletions")["n"]
        yield GaugeMetricFamily("jobcloud_blob_deletions_pending",
                                "Files the retention sweep has yet to delete", value=pending)
