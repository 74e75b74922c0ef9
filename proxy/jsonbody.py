"""Reading JSON: the request body, and the numbers in it.

One rule for every JSON endpoint of the API, so they refuse bad input alike.
JSON has one number type, and Python's reader adds traps: `true` is an int
(bool subclasses int), `1e400` is an infinity and `NaN` is accepted. A field
reader refuses all of those, checks the range, and names the field in its
400; nothing out of range reaches the database (a 64-bit INTEGER) or a JSON
answer (which cannot carry an infinity).
"""
from __future__ import annotations

import math

from flask import request

from .errors import ValidationError


def json_object() -> dict:
    """The request's JSON object; an empty body counts as {}.

    Raises:
        ValidationError: the body is not JSON, or JSON but not an object.
    """
    body = request.get_json(silent=True)
    if body is None and not request.data:
        body = {}
    if not isinstance(body, dict):
        raise ValidationError("send a JSON object with Content-Type: application/json",
                              code="invalid_json")
    return body


def is_number(value, *, integer: bool = False) -> bool:
    """True for a finite JSON number (not a boolean); a whole one when `integer`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return True  # whole, and float() of a huge one would overflow
    return math.isfinite(value) and (not integer or value.is_integer())


def number(data: dict, key: str, *, lo: float, hi: float, code: str, integer: bool = False,
           default=None, required: bool = True, message: str | None = None):
    """`data[key]` as a number from `lo` to `hi` (an int when `integer`).

    Args:
        default: the value of a missing or null field when not `required`.
        message: the 400's detail instead of the generic one for either refusal.

    Raises:
        ValidationError (with `code`): missing and required, not a (whole)
            number, or out of range.
    """
    value = data.get(key)
    if value is None and not required:
        return default
    if not is_number(value, integer=integer):
        raise ValidationError(message or f"{key} must be {'an integer' if integer else 'a number'}",
                              code=code)
    if not lo <= value <= hi:
        raise ValidationError(message or f"{key} must be between {lo} and {hi}", code=code)
    return int(value) if integer else float(value)


def integer(data: dict, key: str, *, lo: int, hi: int, code: str, **options) -> int | None:
    """`number` for whole numbers: `data[key]` as an int from `lo` to `hi`."""
    return number(data, key, lo=lo, hi=hi, code=code, integer=True, **options)
