"""What travels on the wire besides the request models: the strict JSON parser every body goes
through (UTF-8, finite numbers, bounded nesting) and OpenAI's error envelope. `moeflow router`
uses both too. Never imports torch or fastapi."""

from __future__ import annotations

import json
import math
from typing import Any

MAX_JSON_DEPTH = 64


class BadRequestBody(ValueError):
    """The body is not acceptable JSON, or not a JSON object (400)."""


def error_body(
    message: str,
    type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error envelope: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body: UTF-8 only, no NaN/Infinity (literal or overflowing, like 1e999), no
    lone surrogates, nesting at most MAX_JSON_DEPTH. Duplicate keys: the last one wins.
    Raises BadRequestBody."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestBody("the body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise BadRequestBody(f"the body is not valid JSON: {e.msg} at {e.pos}") from None
    except RecursionError:
        raise BadRequestBody(f"the body is nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as e:  # an integer of more than 4300 digits, or our own rejections
        if isinstance(e, BadRequestBody):
            raise
        raise BadRequestBody(f"the body is not valid JSON: {e}") from None
    _check_value(value, 0)
    return value


def require_object(value: Any) -> dict[str, Any]:
    """The parsed body, which must be a JSON object. Raises BadRequestBody."""
    if not isinstance(value, dict):
        raise BadRequestBody("the body must be a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise BadRequestBody(f"the JSON literal {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequestBody(f"the number {text[:32]} is out of range")
    return value


def _check_value(value: Any, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise BadRequestBody(f"the body is nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, str):
        _check_str(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_str(k)
            _check_value(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_value(v, depth + 1)


def _check_str(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestBody("the body holds a lone surrogate (invalid Unicode)") from None
