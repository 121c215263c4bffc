"""Validate bodies against OpenAI's published schemas (OpenAPI 3.0 `nullable` read as "or null").

Each file in tests/data is the closure of some components of openai/openai-openapi's openapi.json: `chat`
(chat completions, models, errors), `responses` (Response, its stream events, CreateResponse) and
`completions` (the legacy text completions)."""

import json
from functools import cache
from pathlib import Path

import jsonschema

_DATA = Path(__file__).parents[1] / "data"


def _nullable(node):
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@cache
def _components(doc: str) -> dict:
    return _nullable(json.loads((_DATA / f"openai-{doc}-schemas.json").read_text())["components"])


@cache
def _validator(doc: str, schema: str):
    root = {"$ref": f"#/components/schemas/{schema}", "components": _components(doc)}
    return jsonschema.Draft202012Validator(root)


def validate(body: dict, schema: str, doc: str = "chat") -> None:
    _validator(doc, schema).validate(body)
