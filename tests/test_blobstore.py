"""The blob store's contract, held by both backends: files under data_dir and
a real S3-compatible store (SeaweedFS on loopback, tests/s3server.py).

Then what only the S3 store does: presigned URLs (and their expiry), checked
output uploads, a store that is down, and keys kept out of errors and logs.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import zipfile

import pytest
import requests

from proxy.blobs import BlobStore
from proxy.config import load_config
from proxy.errors import BlobStoreUnavailable, ConfigError, TooLarge, ValidationError
from proxy.s3blobs import PART_BYTES, S3BlobStore
from tests.conftest import free_port, wait_until

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return BlobStore(str(tmp_path / "data"))
    settings = request.getfixturevalue("s3_settings")
    return S3BlobStore.from_config(load_config(env={}, overrides=dict(
        settings, data_dir=str(tmp_path / "data"))))


@pytest.fixture
def s3_store(s3_settings, tmp_path):
    def make(**overrides):
        return S3BlobStore.from_config(load_config(env={}, overrides=dict(
            s3_settings, data_dir=str(tmp_path / "data"), **overrides)))
    return make


def received(store, data: bytes, limit: int | None = None, chunk: int = 1 * MiB):
    """An upload fed `data` a chunk at a time, as the form parser feeds it."""
    upload = store.new_upload(limit or len(data) + 1, "the dataset")
    for start in range(0, len(data), chunk):
        upload.write(data[start:start + chunk])
    return upload


def stored_names(store) -> set[str]:
    """Every blob the store holds, by name."""
    if isinstance(store, BlobStore):
        return {p.name for p in store.blobs.rglob("*") if p.is_file()}
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket,
                                                                     Prefix=store.prefix + "/")
    return {o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", [])}


def unfinished_uploads(store) -> list:
    """Multipart uploads begun and neither completed nor aborted (S3 only)."""
    if isinstance(store, BlobStore):
        return []
    return [u for u in store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
            if u["Key"].startswith(store.prefix + "/")]


def tmp_files(store) -> list:
    return [p for p in store.tmp.iterdir()]


# ------------------------------------------------------------ both backends

@pytest.mark.parametrize("size", [0, 1000, 2 * PART_BYTES + 12345],
                         ids=["empty", "small", "multipart"])
def test_a_committed_upload_reads_back_whole_with_its_sha256(store, size):
    data = os.urandom(size)
    upload = received(store, data)
    store.prepare(upload)
    blob = store.commit(upload)
    upload.kept = True
    upload.discard()
    assert (blob.sha256, blob.size) == (hashlib.sha256(data).hexdigest(), size)
    assert store.exists(blob.name)
    with store.open(blob.name) as f:
        assert f.read() == data
    assert stored_names(store) == {blob.name}
    assert tmp_files(store) == [] and unfinished_uploads(store) == []


@pytest.mark.parametrize("size", [1000, 2 * PART_BYTES + 1], ids=["small", "multipart"])
def test_a_refused_upload_leaves_nothing_anywhere(store, size):
    # Refused after the bytes went to the store (a check failed, the row
    # was not written): discard removes what was stored.
    upload = received(store, os.urandom(size))
    store.prepare(upload)
    upload.discard()
    assert stored_names(store) == set()
    # Refused while still arriving (past its limit): nothing stored, nothing begun.
    upload = store.new_upload(PART_BYTES + 10, "the dataset")
    with pytest.raises(TooLarge, match="the dataset is larger than the limit"):
        for _ in range(3):
            upload.write(os.urandom(PART_BYTES))
    upload.discard()
    assert stored_names(store) == set()
    assert tmp_files(store) == [] and unfinished_uploads(store) == []


def test_remove_deletes_once_and_reports_the_size(store):
    upload = received(store, b"x" * 4321)
    store.prepare(upload)
    blob = store.commit(upload)
    upload.kept = True
    upload.discard()
    assert store.remove(blob.name) == 4321
    assert store.remove(blob.name) is None
    assert not store.exists(blob.name)
    with pytest.raises(FileNotFoundError):
        with store.open(blob.name):
            pass


def test_names_are_checked_before_any_path_or_key_is_made(store):
    for bad in ("../../etc/passwd", "A" * 64, "ab", "0" * 63 + "/"):
        with pytest.raises(ValueError):
            store.exists(bad)


# --------------------------------------------------------------- S3 only

def test_a_presigned_get_needs_no_keys_names_the_download_and_expires(s3_store):
    store = s3_store(blob_presign_ttl_s=2)
    upload = received(store, b"print('hi')\n")
    blob = store.commit(upload)
    url = store.presign_get(blob.name, "main.py", "text/x-python")
    assert store.presign_get(blob.name, "main.py", "text/x-python") == url   # reused
    got = requests.get(url, timeout=10)
    assert got.status_code == 200 and got.content == b"print('hi')\n"
    assert got.headers["Content-Disposition"] == 'attachment; filename="main.py"'
    assert got.headers["Content-Type"] == "text/x-python"
    # Past its lifetime the store refuses it: wait for that, not for a time.
    wait_until(lambda: requests.get(url, timeout=10).status_code == 403, timeout=30,
               what="the presigned URL to expire")


def test_a_presigned_put_takes_only_the_announced_bytes(s3_store):
    store = s3_store()
    archive = _zip(b"result")
    sha = hashlib.sha256(archive).hexdigest()
    name = "ab" * 32
    put = store.presign_put(name, sha, len(archive))
    assert put["method"] == "PUT" and "Authorization" not in put["headers"]
    other = _zip(b"forged")
    refused = requests.put(put["url"], data=other, headers=dict(
        put["headers"], **{"Content-Length": str(len(other))}), timeout=10)
    assert refused.status_code == 400
    assert not store.exists(name)
    with pytest.raises(ValidationError) as e:
        store.check_upload(name, sha, len(archive))
    assert e.value.code == "outputs_missing"
    assert requests.put(put["url"], data=archive, headers=put["headers"],
                        timeout=10).status_code == 200
    blob = store.check_upload(name, sha, len(archive))
    assert (blob.name, blob.sha256, blob.size) == (name, sha, len(archive))


def test_an_upload_that_is_not_what_the_result_names_is_refused_and_deleted(s3_store):
    store = s3_store()
    # Objects put with the proxy's own keys (as a store that checked no
    # checksum would have kept them): the proxy's check is the last word.
    archive = _zip(b"result")
    sha = hashlib.sha256(archive).hexdigest()
    for name, body, code in (("cd" * 32, _zip(b"other"), "outputs_mismatch"),
                             ("ef" * 32, b"not a zip" * 10, "invalid_outputs")):
        store.client.put_object(Bucket=store.bucket, Key=store.key(name), Body=body)
        announced = hashlib.sha256(body).hexdigest() if code == "invalid_outputs" else sha
        with pytest.raises(ValidationError) as e:
            store.check_upload(name, announced, len(body) if code == "invalid_outputs"
                               else len(archive))
        assert e.value.code == code
        assert not store.exists(name)


def test_a_store_that_is_down_is_a_503_not_a_hang_or_a_500(s3_settings, tmp_path, caplog):
    store = S3BlobStore.from_config(load_config(env={}, overrides=dict(
        s3_settings, data_dir=str(tmp_path / "data"),
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}")))
    caplog.set_level(logging.DEBUG)
    small = received(store, b"x" * 100)
    with pytest.raises(BlobStoreUnavailable) as e:
        store.prepare(small)
    assert e.value.status == 503 and "cannot be reached" in e.value.detail
    small.discard()
    with pytest.raises(BlobStoreUnavailable):
        received(store, os.urandom(2 * PART_BYTES))   # the first part goes as it arrives
    assert tmp_files(store) == [f for f in tmp_files(store) if f.name.startswith("up-")]
    keys = (tmp_path / "s3-credentials.toml").read_text()
    secret = keys.split("secret_access_key = ")[1].strip().strip('"')
    assert secret not in caplog.text and secret not in e.value.detail


def test_a_wrong_bucket_or_key_is_a_503_naming_the_store_not_the_keys(s3_settings, tmp_path,
                                                                      s3_server):
    store = S3BlobStore.from_config(load_config(env={}, overrides=dict(
        s3_settings, data_dir=str(tmp_path / "data"), blob_url="s3://no-such-bucket-here/x")))
    upload = received(store, b"x")
    with pytest.raises(BlobStoreUnavailable, match="bucket no-such-bucket-here"):
        store.prepare(upload)
    upload.discard()
    bad = tmp_path / "bad.toml"
    bad.write_text('access_key_id = "nobody"\nsecret_access_key = "wrong-secret-1234"\n')
    store = S3BlobStore.from_config(load_config(env={}, overrides=dict(
        s3_settings, data_dir=str(tmp_path / "data"), s3_credentials_file=str(bad))))
    upload = received(store, b"x")
    with pytest.raises(BlobStoreUnavailable) as e:
        store.prepare(upload)
    assert "wrong-secret-1234" not in e.value.detail
    upload.discard()


@pytest.mark.parametrize("text, message", [
    (None, "cannot read it"),
    ("not toml [", "cannot read it"),
    ('access_key_id = "only-the-id"\n', "must set access_key_id and secret_access_key"),
])
def test_a_bad_credentials_file_is_refused_at_start_without_its_contents(tmp_path, text,
                                                                        message):
    path = tmp_path / "creds.toml"
    if text is not None:
        path.write_text(text)
    cfg = load_config(env={}, overrides={"data_dir": str(tmp_path / "d"),
                                         "blob_url": "s3://bucket/x",
                                         "s3_credentials_file": str(path)})
    with pytest.raises(ConfigError, match=message) as e:
        S3BlobStore.from_config(cfg)
    assert "only-the-id" not in str(e.value)


@pytest.mark.parametrize("setting, value, message", [
    ("blob_url", "http://bucket/x", "blob_url must be empty"),
    ("blob_url", "s3://UPPER/x", "blob_url must be empty"),
    ("blob_url", "s3://bucket/a(b)", "nothing a URL would have to escape"),
    ("s3_endpoint_url", "ftp://host", "s3_endpoint_url"),
    ("blob_presign_ttl_s", 0, "blob_presign_ttl_s"),
    ("blob_user_downloads", "proxy", "blob_user_downloads must be redirect or stream"),
])
def test_blob_settings_are_validated(tmp_path, setting, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides={"data_dir": str(tmp_path), setting: value})


def _zip(content: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("out.txt", content)
    return buf.getvalue()


def test_no_keys_anywhere_is_a_503_when_a_url_is_signed_not_a_500(tmp_path, monkeypatch):
    # No credentials file, no AWS_* variables, no ~/.aws: boto3 finds no keys.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3BlobStore.from_config(load_config(env={}, overrides={
        "data_dir": str(tmp_path / "d"), "blob_url": "s3://bucket/x",
        "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}))
    with pytest.raises(BlobStoreUnavailable, match="signing a download URL"):
        store.presign_get("ab" * 32)
    with pytest.raises(BlobStoreUnavailable, match="signing an upload URL"):
        store.presign_put("ab" * 32, "cd" * 32, 10)
