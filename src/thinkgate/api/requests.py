"""Read a request body into the typed request: size limit, JSON, pydantic type checks -> 4xx naming the field."""

from __future__ import annotations

from typing import TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from thinkgate.errors import InvalidRequestError, PayloadTooLarge
from thinkgate.protocol import ChatCompletionRequest

M = TypeVar("M", bound=BaseModel)


def _is_branch(p: str) -> bool:
    """A union branch name pydantic puts in an error's location (`str`, `list[ContentPart]`,
    `function-after[...]`, `literal['none','auto']`, a model class name), not a parameter name."""
    return p in ("str", "int", "float", "bool", "dict") or any(c in p for c in "[-'") or p[:1].isupper()


def _param_from_loc(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_branch(str(p)):
            continue
        else:
            out += ("." if out else "") + str(p)
    return out or None


def validation_error(e: ValidationError) -> InvalidRequestError:
    first = e.errors()[0]
    param = _param_from_loc(tuple(first["loc"]))
    msg = first["msg"]
    if first["type"] == "missing":
        return InvalidRequestError(f"missing required parameter: {param}", param=param)
    value = first.get("input")
    shown = repr(value)[:80] if not isinstance(value, dict) else "an object"
    return InvalidRequestError(f"invalid value for {param}: {msg} (got {shown})", param=param)


async def parse_chat_request(request: Request, limit: int) -> ChatCompletionRequest:
    return await parse_body(request, limit, ChatCompletionRequest)


async def parse_body(request: Request, limit: int, model: type[M]) -> M:
    """The JSON body of `request` as `model` (any endpoint's request type), or a 4xx naming the field."""
    ctype = request.headers.get("content-type", "")
    if "json" not in ctype.lower():
        raise InvalidRequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}")
    body = await read_limited(request, limit)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidRequestError(f"the request body is not valid JSON: {e}") from None
    return as_model(data, model)


async def read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def as_model(data, model: type[M], to_error=validation_error) -> M:
    """A decoded JSON body as `model`: a 400 unless it is an object that validates."""
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise to_error(e) from None
