"""Reading a JSON request body: one rule for every JSON endpoint of the API."""
from __future__ import annotations

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
