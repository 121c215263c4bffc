"""Validate bodies against OpenAI's published schemas (OpenAPI 3.0 `nullable` read as "or null")."""

import json
from pathlib import Path

import jsonschema

_DOC = json.loads((Path(__file__).parents[1] / "data" / "openai-chat-schemas.json").read_text())


def _nullable(node):
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


_COMPONENTS = _nullable(_DOC["components"])


def validate(body: dict, schema: str) -> None:
    root = {"$ref": f"#/components/schemas/{schema}", "components": _COMPONENTS}
    jsonschema.Draft202012Validator(root).validate(body)
