"""The S3 blob store: scripts, datasets and outputs as objects in an
S3-compatible store (blob_url = s3://BUCKET/PREFIX), through boto3.

Why boto3: SigV4 signing, presigned URLs, multipart uploads and retries are
what we would otherwise write; it is AWS's own SDK and speaks to every
S3-compatible store (SeaweedFS, Ceph radosgw, Garage, AWS).

Objects are `<prefix>/blobs/<name>`. The name is random (64 hex characters,
like the file store's sha256 names), not the content's hash: an upload
streams to the store while it is still being received (multipart, a part at
a time, so memory stays at a few parts whatever the size), before its hash
is known, and S3 cannot rename an object without copying all of it. A random
name also means no two jobs race on one object: nothing is overwritten, and
the retention sweep can never delete an object a new row is about to name.
The sha256 is still computed on the way in and kept in the *_sha256 columns;
workers check it, and output archives are checked against it by the store
itself (the presigned PUT carries x-amz-checksum-sha256) and again here.

Workers move bytes directly: claim answers carry presigned GET URLs
(`presign_get`), and a worker uploads its output archive with a presigned PUT
(`presign_put`) to the name `output_name` derives from the job, the try and
the hash, which the proxy checks (`check_upload`) before it accepts the
result. The proxy is then out of the data path.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .blobs import StoredBlob, Upload, is_blob_name
from .errors import BlobStoreUnavailable, ConfigError, ValidationError

log = logging.getLogger("proxy.s3blobs")

# Multipart part size: S3's minimum, 5 MiB (but the last part), or more for an
# upload whose limit would take past S3's 10,000 parts. Two parts in flight and
# one filling: ~15 MiB per upload, whatever its size (bench s3 measured a
# gunicorn process's RSS rise at 55-62 MiB with 8 MiB parts: botocore holds
# its own references to a part while it sends it).
PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 9_000
PARTS_IN_FLIGHT = 2
# A presigned URL handed out again while it still has this share of its life
# left (claims of an array's jobs name one script: one signature, not 10,000).
PRESIGN_REUSE = 0.5
PRESIGN_CACHE_MAX = 4096
# The end of a zip archive: its end-of-central-directory record is in the
# last 22 bytes plus a comment of at most 65,535 (zipfile.is_zipfile's test).
ZIP_TAIL_BYTES = 22 + 65535


class S3BlobStore:
    """Blobs as objects of one bucket under one prefix (see the module docstring)."""

    direct = True
    kind = "s3"

    def __init__(self, *, bucket: str, prefix: str, data_dir: str, client, presigner,
                 presign_ttl_s: int, endpoint: str, signer=None):
        self.bucket = bucket
        self.prefix = prefix
        self.client = client
        self.presigner = presigner
        # (credentials, region, base URL) for signing a plain GET with
        # botocore's query signer itself (presign_get), or None.
        self.signer = signer
        self.presign_ttl_s = presign_ttl_s
        self.endpoint = endpoint
        # Received uploads wait here while the checks read them (per proxy:
        # several proxies share nothing but the store and the database).
        self.tmp = Path(data_dir).resolve() / "tmp"
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._presigned: dict[tuple, tuple[str, float]] = {}
        self._presigned_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg) -> "S3BlobStore":
        """Raises ConfigError: boto3 missing, or an unreadable credentials file."""
        try:
            import boto3
            from botocore.config import Config as BotoConfig
        except ImportError:
            raise ConfigError("blob_url is an s3:// URL but boto3 is not installed"
                              " (pip install 'jobcloud[s3]')") from None
        bucket, _, prefix = cfg.blob_url[len("s3://"):].partition("/")
        keys = _read_credentials(cfg.s3_credentials_file) if cfg.s3_credentials_file else {}
        session = boto3.session.Session(**keys)
        # Short connect timeout and few retries: a store that is down refuses a
        # submission in seconds (503), not after a minute of backing off.
        # payload_signing_enabled=False: on an http:// endpoint botocore would
        # otherwise sha256 every part to sign it, and the store hash it again
        # to check: measured 1.4-1.6x the upload rate without (SeaweedFS, 2
        # cores). request_checksum_calculation="when_required": no CRC32 of
        # each part framed as aws-chunked (Python loops on our side, decoding
        # on the store's); a part's bytes are as safe as any HTTP body (TCP),
        # and the blob's sha256 is ours, checked by every worker that reads it.
        boto = BotoConfig(signature_version="s3v4", connect_timeout=3, read_timeout=60,
                          retries={"max_attempts": 3, "mode": "standard"},
                          max_pool_connections=16, request_checksum_calculation="when_required",
                          s3={"addressing_style": "path" if cfg.s3_endpoint_url else "auto",
                              "payload_signing_enabled": False})

        def client(endpoint):
            return session.client("s3", endpoint_url=endpoint or None,
                                  region_name=cfg.s3_region, config=boto)

        main = client(cfg.s3_endpoint_url)
        presign_at = cfg.s3_presign_endpoint_url or cfg.s3_endpoint_url
        # A named endpoint is addressed by path (endpoint/bucket/key), so a
        # worker's GET URL can be signed without the client's request pipeline.
        credentials = session.get_credentials()
        signer = ((credentials, cfg.s3_region, f"{presign_at.rstrip('/')}/{bucket}/")
                  if presign_at and credentials is not None else None)
        return cls(bucket=bucket, prefix=prefix.strip("/"), data_dir=cfg.data_dir, client=main,
                   presigner=main if presign_at == cfg.s3_endpoint_url else client(presign_at),
                   presign_ttl_s=cfg.blob_presign_ttl_s,
                   endpoint=cfg.s3_endpoint_url or "AWS S3", signer=signer)

    # ------------------------------------------------------------------ names

    def key(self, name: str) -> str:
        if not is_blob_name(name):
            raise ValueError("bad blob name")
        return f"{self.prefix}/blobs/{name}" if self.prefix else f"blobs/{name}"

    # ---------------------------------------------------------------- uploads

    def new_upload(self, limit: int, what: str) -> Upload:
        name = secrets.token_hex(32)
        part = max(PART_BYTES, -(-limit // MAX_PARTS))
        return Upload(self, limit, what, durable=False, sink=_Multipart(self, name, part))

    def prepare(self, upload: Upload) -> None:
        """Outside the blob lock: finish the upload to the store (the rest of a
        multipart upload, or one PUT for a small file).

        Raises:
            BlobStoreUnavailable: the store cannot be reached or refused it;
                nothing of it is left there.
        """
        if upload.stored is not None:
            return
        upload.finish()
        sink = upload.sink
        name = sink.name
        with _store_errors(self, f"storing {upload.what}"):
            if sink.started:
                sink.close()
            else:
                with open(upload.path, "rb") as f:
                    self.client.put_object(
                        Bucket=self.bucket, Key=self.key(name), Body=f,
                        ChecksumSHA256=_b64(upload.sha256))
        upload.stored = StoredBlob(upload.sha256, upload.size, name)

    def commit(self, upload: Upload) -> StoredBlob:
        """Under the blob lock: the stored blob (a random name no sweep can
        have touched, so nothing to check again). The received file stays
        for discard to remove; the caller sets `upload.kept` once the row
        naming the blob has committed."""
        self.prepare(upload)
        return upload.stored

    def forget(self, name: str) -> None:
        """Best effort: delete an object no committed row names (a refused
        submission's). One left behind costs space, never correctness."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
        except Exception as e:   # botocore's errors, the store being down
            log.warning("could not delete unused blob %s: %s", name, type(e).__name__)

    # ------------------------------------------------------------------ reads

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def remove(self, name: str) -> int | None:
        """Delete a stored blob; its size, or None when it was already gone.

        Raises:
            BlobStoreUnavailable: the store cannot be reached (the sweep tries
                again later).
        """
        head = self._head(name)
        if head is None:
            return None
        with _store_errors(self, "deleting a blob"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))
        return head["ContentLength"]

    @contextlib.contextmanager
    def open(self, name: str):
        """A stored blob as a seekable file: copied to a temp file first
        (zipfile seeks; a ranged GET per seek would be slower).

        Raises:
            FileNotFoundError: it is not stored (any more).
            BlobStoreUnavailable: the store cannot be reached.
        """
        with tempfile.TemporaryFile(dir=self.tmp) as f:
            with _store_errors(self, "reading a blob", missing=FileNotFoundError):
                self.client.download_fileobj(self.bucket, self.key(name), f)
            f.seek(0)
            yield f

    def iter_bytes(self, name: str, chunk: int = 256 * 1024):
        """(size, chunks) of a stored blob, for streaming it through the proxy.

        Raises:
            FileNotFoundError: it is not stored (any more).
            BlobStoreUnavailable: the store cannot be reached.
        """
        with _store_errors(self, "reading a blob", missing=FileNotFoundError):
            got = self.client.get_object(Bucket=self.bucket, Key=self.key(name))
        body = got["Body"]

        def chunks():
            try:
                yield from body.iter_chunks(chunk)
            finally:
                body.close()
        return got["ContentLength"], chunks()

    def names_older_than(self, when: float):
        """The names of the stored objects last written before `when` (epoch s).

        Raises:
            BlobStoreUnavailable: the store cannot be reached.
        """
        start = f"{self.prefix}/blobs/" if self.prefix else "blobs/"
        with _store_errors(self, "listing blobs"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start)
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(start):]
                    if is_blob_name(name) and item["LastModified"].timestamp() < when:
                        yield name

    # ------------------------------------------------------------- presigning

    def presign_get(self, name: str, download_name: str | None = None,
                    mimetype: str | None = None) -> str:
        """A URL that GETs the blob without credentials for presign_ttl_s.

        Signing is local (no request to the store). One handed out recently
        is handed out again while it has half its life left.
        """
        params = {"Bucket": self.bucket, "Key": self.key(name)}
        if download_name:
            params["ResponseContentDisposition"] = f'attachment; filename="{download_name}"'
        if mimetype:
            params["ResponseContentType"] = mimetype
        cache_key = (name, download_name, mimetype)
        now = time.monotonic()
        with self._presigned_lock:
            hit = self._presigned.get(cache_key)
            if hit is not None and hit[1] - now > self.presign_ttl_s * PRESIGN_REUSE:
                return hit[0]
        with _store_errors(self, "signing a download URL"):
            if self.signer is not None and not download_name and not mimetype:
                url = self._signed_get(params["Key"])
            else:
                url = self.presigner.generate_presigned_url("get_object", Params=params,
                                                            ExpiresIn=self.presign_ttl_s)
        with self._presigned_lock:
            if len(self._presigned) >= PRESIGN_CACHE_MAX:
                self._presigned.clear()
            self._presigned[cache_key] = (url, now + self.presign_ttl_s)
        return url

    def _signed_get(self, key: str) -> str:
        """A presigned GET of `key` from botocore's SigV4 query signer, without
        the client's request pipeline: the same signature at ~40% of the CPU
        (150 vs 360 us measured), and a claim signs one for each input of
        each job it hands out."""
        from botocore.auth import S3SigV4QueryAuth
        from botocore.awsrequest import AWSRequest

        credentials, region, base = self.signer
        request = AWSRequest(method="GET", url=base + key)
        S3SigV4QueryAuth(credentials, "s3", region, expires=self.presign_ttl_s).add_auth(request)
        return request.url

    def presign_put(self, name: str, sha256: str, size: int) -> dict:
        """A PUT of exactly `size` bytes hashing to `sha256` to `name`: the
        store refuses other bytes (x-amz-checksum-sha256 is signed in).

        Returns:
            {"url", "method", "headers", "expires_in_s"} for the worker.
        """
        checksum = _b64(sha256)
        with _store_errors(self, "signing an upload URL"):
            url = self.presigner.generate_presigned_url(
                "put_object", ExpiresIn=self.presign_ttl_s,
                Params={"Bucket": self.bucket, "Key": self.key(name), "ChecksumSHA256": checksum,
                        "ContentType": "application/zip"})
        return {"url": url, "method": "PUT", "expires_in_s": self.presign_ttl_s,
                "headers": {"x-amz-checksum-sha256": checksum, "Content-Type": "application/zip",
                            "Content-Length": str(size)}}

    def check_upload(self, name: str, sha256: str, size: int) -> StoredBlob:
        """A worker's uploaded output archive, checked before its result is taken.

        Size and hash from the store's own record of the PUT's checksum (a
        store that keeps none is read back and hashed here), and the zip's
        end-of-central-directory record from a ranged read of its tail.

        Raises:
            ValidationError: outputs_missing, outputs_mismatch, invalid_outputs.
            BlobStoreUnavailable: the store cannot be reached.
        """
        with _store_errors(self, "checking the output archive"):
            head = self._head(name, checksum=True)
        if head is None:
            raise ValidationError("no output archive was uploaded for this result (PUT it to"
                                  " the URL outputs-upload gave first)", code="outputs_missing")
        stored = head["ContentLength"]
        checksum = head.get("ChecksumSHA256")
        if checksum is None:
            actual = self._hash_of(name)
        else:
            actual = base64.b64decode(checksum).hex()
        if stored != size or actual != sha256:
            if actual != sha256:
                # Bytes that are not what their name was made for are of no
                # use to anyone (a store that ignored the signed checksum).
                self.forget(name)
            raise ValidationError(
                f"the uploaded output archive ({stored} bytes, sha256 {actual[:12]}...) is not"
                f" the one the result names ({size} bytes, sha256 {sha256[:12]}...)",
                code="outputs_mismatch")
        with _store_errors(self, "checking the output archive"):
            tail = self.client.get_object(
                Bucket=self.bucket, Key=self.key(name),
                Range=f"bytes=-{min(size, ZIP_TAIL_BYTES)}")["Body"].read()
        if b"PK\x05\x06" not in tail:
            self.forget(name)
            raise ValidationError("outputs must be a zip archive", code="invalid_outputs")
        return StoredBlob(sha256, size, name)

    # -------------------------------------------------------------- internals

    def _head(self, name: str, checksum: bool = False) -> dict | None:
        extra = {"ChecksumMode": "ENABLED"} if checksum else {}
        try:
            with _store_errors(self, "looking up a blob", missing=KeyError):
                return self.client.head_object(Bucket=self.bucket, Key=self.key(name), **extra)
        except KeyError:
            return None

    def _hash_of(self, name: str) -> str:
        digest = hashlib.sha256()
        _, chunks = self.iter_bytes(name)
        for block in chunks:
            digest.update(block)
        return digest.hexdigest()


def output_name(secret: bytes, job_id: str, attempt: int, sha256: str) -> str:
    """The object name a try's output archive is uploaded to: derived, so the
    result needs to name only the hash, and keyed, so no worker can point a
    result at an object someone else stored (a dataset) by guessing its name."""
    return hmac.new(secret, f"outputs\0{job_id}\0{attempt}\0{sha256}".encode(),
                    hashlib.sha256).hexdigest()


class _Multipart:
    """An upload's bytes streamed on to the store as they arrive: a multipart
    upload begun at the first full part, parts sent in the background (at
    most PARTS_IN_FLIGHT at once), completed by `close`, aborted by `abort`.
    An upload smaller than one part never starts one (prepare PUTs it)."""

    def __init__(self, store: S3BlobStore, name: str, part_bytes: int = PART_BYTES):
        self.store = store
        self.name = name
        self.part_bytes = part_bytes
        # The part being filled, as the chunks received (joined once when full).
        self.chunks: list[bytes] = []
        self.filled = 0
        self.upload_id: str | None = None
        self.futures = []
        self.pool: ThreadPoolExecutor | None = None
        self.number = 0

    @property
    def started(self) -> bool:
        return self.upload_id is not None

    def write(self, data: bytes) -> None:
        while data:
            take = min(len(data), self.part_bytes - self.filled)
            self.chunks.append(data[:take] if take < len(data) else data)
            self.filled += take
            data = data[take:]
            if self.filled == self.part_bytes:
                self._send(self._take_part())

    def close(self) -> None:
        """Send the last part and complete the upload (raises as `_send` does)."""
        if self.filled or not self.futures:
            self._send(self._take_part())
        parts = [f.result() for f in self.futures]
        self.store.client.complete_multipart_upload(
            Bucket=self.store.bucket, Key=self.store.key(self.name), UploadId=self.upload_id,
            MultipartUpload={"Parts": parts})
        self._shutdown()

    def _take_part(self) -> bytes:
        part = b"".join(self.chunks)
        self.chunks, self.filled = [], 0
        return part

    def abort(self) -> None:
        self.chunks, self.filled = [], 0
        if self.upload_id is None:
            return
        for f in self.futures:
            f.cancel()
        self._shutdown()
        try:
            self.store.client.abort_multipart_upload(
                Bucket=self.store.bucket, Key=self.store.key(self.name), UploadId=self.upload_id)
        except Exception as e:   # the store being down: its own expiry cleans up
            log.warning("could not abort a multipart upload: %s", type(e).__name__)
        self.upload_id = None

    def _send(self, part: bytes) -> None:
        with _store_errors(self.store, "storing an upload"):
            if self.upload_id is None:
                self.upload_id = self.store.client.create_multipart_upload(
                    Bucket=self.store.bucket, Key=self.store.key(self.name))["UploadId"]
                self.pool = ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="s3-part")
            while sum(not f.done() for f in self.futures) >= PARTS_IN_FLIGHT:
                next(f for f in self.futures if not f.done()).result()
            for f in self.futures:
                if f.done():
                    f.result()   # a failed part fails the upload now, not at the end
        self.number += 1
        self.futures.append(self.pool.submit(self._upload_part, self.number, part))

    def _upload_part(self, number: int, part: bytes) -> dict:
        with _store_errors(self.store, "storing an upload"):
            got = self.store.client.upload_part(
                Bucket=self.store.bucket, Key=self.store.key(self.name), UploadId=self.upload_id,
                PartNumber=number, Body=part)
        return {"PartNumber": number, "ETag": got["ETag"]}

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


@contextlib.contextmanager
def _store_errors(store: S3BlobStore, doing: str, missing: type | None = None):
    """botocore's errors as ours: a missing object as `missing` (when given),
    anything else as BlobStoreUnavailable (503) naming the store, not the keys."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        if missing is not None and code in ("404", "NoSuchKey", "NotFound"):
            raise missing(error.get("Message") or code) from None
        log.warning("blob store %s: %s failed: %s", store.endpoint, doing, code)
        raise BlobStoreUnavailable(
            f"the blob store ({store.endpoint}, bucket {store.bucket}) refused {doing}: {code}"
            + (" (the bucket does not exist)" if code == "NoSuchBucket" else ""),
        ) from None
    except NoCredentialsError:
        log.warning("blob store %s: %s failed: no keys", store.endpoint, doing)
        raise BlobStoreUnavailable(
            f"the proxy has no keys for the blob store ({doing}): set s3_credentials_file, or"
            " AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the proxy") from None
    except BotoCoreError as e:
        log.warning("blob store %s: %s failed: %s", store.endpoint, doing, type(e).__name__)
        raise BlobStoreUnavailable(
            f"the blob store ({store.endpoint}) cannot be reached ({type(e).__name__});"
            " try again shortly") from None


def _read_credentials(path: str) -> dict:
    """boto3's keyword arguments from a TOML file with access_key_id and
    secret_access_key (and optionally session_token). Raises ConfigError
    naming the file, never its contents."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"s3_credentials_file {path}: cannot read it"
                          f" ({type(e).__name__})") from None
    keys = {"aws_access_key_id": data.get("access_key_id"),
            "aws_secret_access_key": data.get("secret_access_key")}
    if not all(isinstance(v, str) and v for v in keys.values()):
        raise ConfigError(f"s3_credentials_file {path} must set access_key_id and"
                          " secret_access_key (strings)")
    if isinstance(data.get("session_token"), str):
        keys["aws_session_token"] = data["session_token"]
    return keys


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()
