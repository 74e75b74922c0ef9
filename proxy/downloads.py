"""File downloads: always attachments, never sniffed, never guessed from user names.

With the file store the proxy sends the file. With the S3 store
(s3blobs.py) it redirects to a presigned URL that names the same download
name and type (the store answers with them), so the bytes never pass through
a gunicorn process; `blob_user_downloads = "stream"` streams users' downloads
through the proxy instead, for stores their browsers cannot reach.
"""
from __future__ import annotations

import re

from flask import Response, redirect, send_file

from . import retention
from .errors import Gone, NotFound

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff",
                    "Content-Security-Policy": "default-src 'none'; sandbox"}


def send_blob(blobs, blob: str, download_name: str, mimetype: str, *, stream: bool = False):
    """A stored blob as a download.

    Args:
        stream: with the S3 store, send the bytes through the proxy instead of
            redirecting to the store.

    Raises:
        Gone: the blob is not stored any more.
        BlobStoreUnavailable: the S3 store cannot be reached.
    """
    name = _safe_name(download_name)
    if blobs.direct and not stream:
        if not blobs.exists(blob):
            raise _gone()
        # 307: the same method again (a HEAD stays a HEAD) at the store.
        response = redirect(blobs.presign_get(blob, name, mimetype), code=307)
        response.headers["Cache-Control"] = "no-store"
        return response
    if blobs.direct:
        try:
            size, chunks = blobs.iter_bytes(blob)
        except FileNotFoundError:
            raise _gone() from None
        response = Response(chunks, mimetype=mimetype, headers={
            "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{name}"'})
    else:
        try:
            response = send_file(blobs.path(blob), mimetype=mimetype, as_attachment=True,
                                 download_name=name, conditional=True, max_age=0)
        except FileNotFoundError:
            raise _gone() from None
    response.headers.update(SECURITY_HEADERS)
    return response


def send_outputs(job: dict, blobs, *, stream: bool = False):
    if job.get("expired_at") is not None:
        raise retention.gone(job, "outputs")
    if not job["output_blob"]:
        raise NotFound("this job has no output archive (yet)", code="no_outputs")
    return send_blob(blobs, job["output_blob"], f"{job['name']}-{job['id']}-outputs.zip",
                     "application/zip", stream=stream)


def _gone() -> Gone:
    # Retention never deletes what a kept job needs; a file removed by hand is gone, not a 500.
    return Gone("the file is no longer stored", code="expired")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "download"
