"""A claimed job's place in a job array (the claim's `array`: id, index and,
for a parameters file, its row; proxy/arrays.py): what the job sees of it.

The job reads its index from JOBCLOUD_ARRAY_INDEX (and the array's id from
JOBCLOUD_ARRAY_ID); a parameters row comes both as JOBCLOUD_PARAMS (the row
as JSON) and as /job/input/params.json, for rows too awkward for a variable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError

PARAMS_FILE = "params.json"


def environment(array) -> tuple[tuple[str, str], ...]:
    """The job's JOBCLOUD_ARRAY_* and JOBCLOUD_PARAMS variables; () for a lone job.

    Never raises: the job's spec is built in places that must not fail (its
    slot's clean-up); a malformed `array` fails the job in `write_params`.
    """
    if not _valid(array):
        return ()
    env = [("JOBCLOUD_ARRAY_ID", array["id"]), ("JOBCLOUD_ARRAY_INDEX", str(array["index"]))]
    if array.get("params") is not None:
        env.append(("JOBCLOUD_PARAMS", json.dumps(array["params"], sort_keys=True)))
    return tuple(env)


def write_params(array, input_dir: Path) -> None:
    """/job/input/params.json: the job's parameters row, when it has one.

    Raises:
        InputError: the claim's `array` is not what the proxy sends.
    """
    if not array:
        return
    if not _valid(array):
        raise InputError(f"malformed array in the claim: {array!r:.200}")
    if array.get("params") is None:
        return
    path = input_dir / PARAMS_FILE
    path.write_text(json.dumps(array["params"], sort_keys=True, indent=1) + "\n", encoding="utf-8")
    os.chmod(path, 0o644)


def _valid(array) -> bool:
    return (isinstance(array, dict) and isinstance(array.get("id"), str)
            and type(array.get("index")) is int
            and (array.get("params") is None or isinstance(array["params"], dict)))
