"""File downloads: always attachments, never sniffed, never guessed from user names."""
from __future__ import annotations

import re

from flask import send_file

from . import retention
from .blobs import BlobStore
from .errors import Gone, NotFound


def send_blob(blobs: BlobStore, blob: str, download_name: str, mimetype: str):
    try:
        response = send_file(blobs.path(blob), mimetype=mimetype, as_attachment=True,
                             download_name=_safe_name(download_name), conditional=True, max_age=0)
    except FileNotFoundError:
        # Retention never deletes what a kept job needs; a file removed by hand is gone, not a 500.
        raise Gone("the file is no longer stored on the proxy", code="expired") from None
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def send_outputs(job: dict, blobs: BlobStore):
    if job.get("expired_at") is not None:
        raise retention.gone(job, "outputs")
    if not job["output_blob"]:
        raise NotFound("this job has no output archive (yet)", code="no_outputs")
    return send_blob(blobs, job["output_blob"], f"{job['name']}-{job['id']}-outputs.zip",
                     "application/zip")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "download"
