"""File downloads: always attachments, never sniffed, never guessed from user names."""
from __future__ import annotations

import re

from flask import send_file

from .blobs import BlobStore
from .errors import NotFound


def send_blob(blobs: BlobStore, blob: str, download_name: str, mimetype: str):
    response = send_file(blobs.path(blob), mimetype=mimetype, as_attachment=True,
                         download_name=_safe_name(download_name), conditional=True, max_age=0)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response


def send_outputs(job: dict, blobs: BlobStore):
    if not job["output_blob"]:
        raise NotFound("this job has no output archive (yet)", code="no_outputs")
    return send_blob(blobs, job["output_blob"], f"{job['name']}-{job['id']}-outputs.zip",
                     "application/zip")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "download"
