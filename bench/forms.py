"""Job submission bodies (multipart/form-data) as the API receives them: small
ones built in memory, and a large one streamed from a file with a known length.
"""
from __future__ import annotations

import os
import secrets

FIELDS = {"name": "bench", "cpus": "1", "memory_mb": "512", "timeout_s": "600"}


def job_form(script: bytes, fields: dict | None = None) -> tuple[bytes, str]:
    """A complete submission with the script as a file part; returns (body, Content-Type)."""
    boundary = "bench" + secrets.token_hex(8)
    head, tail = _around_file(boundary, fields or FIELDS, "script", "main.py", "text/x-python")
    return head + script + tail, f"multipart/form-data; boundary={boundary}"


def _around_file(boundary: str, fields: dict, file_field: str, filename: str,
                 mimetype: str, before: bytes = b"") -> tuple[bytes, bytes]:
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    parts.append(before)
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}";'
                 f' filename="{filename}"\r\nContent-Type: {mimetype}\r\n\r\n'.encode())
    return b"".join(parts), f"\r\n--{boundary}--\r\n".encode()


class StreamedJobForm:
    """A submission whose dataset part is read from `path` while it is sent.

    requests sends an object with `read` and `__len__` as a body with that
    Content-Length, reading it block by block: the client never holds the
    dataset in memory either.
    """

    def __init__(self, script: bytes, dataset_path: str):
        self.boundary = "bench" + secrets.token_hex(8)
        script_head, script_tail = _around_file(self.boundary, FIELDS, "script", "main.py",
                                                "text/x-python")
        self.head, self.tail = _around_file(self.boundary, {}, "dataset", "dataset.zip",
                                            "application/zip",
                                            before=script_head + script + script_tail[:2])
        self.path = dataset_path
        self.file = open(dataset_path, "rb")
        self.length = len(self.head) + os.path.getsize(dataset_path) + len(self.tail)
        self.pending = [self.head]

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self.length

    def read(self, n: int = -1) -> bytes:
        if self.pending:
            return self.pending.pop(0)
        data = self.file.read(n if n and n > 0 else 1024 * 1024)
        if data:
            return data
        if self.tail:
            data, self.tail = self.tail, b""
            return data
        return b""

    def close(self) -> None:
        self.file.close()
