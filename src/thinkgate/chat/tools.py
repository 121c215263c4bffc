"""Validate `tools` / `tool_choice` and build the grammar that enforces `required` or a named function."""

from __future__ import annotations

import json

from thinkgate.errors import InvalidRequestError
from thinkgate.protocol import ChatCompletionRequest, NamedToolChoice


def validate_tools(req: ChatCompletionRequest) -> None:
    tools = req.tools or []
    seen = set()
    for i, t in enumerate(tools):
        name = t.function.name
        if not all(c.isalnum() or c in "_-." for c in name):
            raise InvalidRequestError(f"tools[{i}].function.name {name!r} may only hold letters, digits, _ - .",
                                      param=f"tools[{i}].function.name")
        if name in seen:
            raise InvalidRequestError(f"tools[{i}].function.name {name!r} is a duplicate",
                                      param=f"tools[{i}].function.name")
        seen.add(name)
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise InvalidRequestError(
                f"tools[{i}].function.parameters must be a JSON Schema of type object, got type {params.get('type')!r}",
                param=f"tools[{i}].function.parameters")
    choice = req.tool_choice
    if choice in ("required",) or isinstance(choice, NamedToolChoice):
        if not tools:
            raise InvalidRequestError("tool_choice requires tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in seen:
        raise InvalidRequestError(f"tool_choice names function {choice.function.name!r}, which is not in tools",
                                  param="tool_choice")


def call_schema(tool) -> dict:
    params = tool.function.parameters or {"type": "object", "properties": {}}
    if "properties" in params and "additionalProperties" not in params:
        # Declared parameters are the function's signature: keep forced calls to them (OpenAI strict style).
        params = {**params, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_calls_schema(req: ChatCompletionRequest) -> dict:
    """The JSON schema of one call of an allowed tool (its number bounds are the grammar's, see
    structured/bounds.py)."""
    tools = req.tools or []
    if isinstance(req.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == req.tool_choice.function.name]
    schemas = [call_schema(t) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def tool_call_lark(req: ChatCompletionRequest, start_id: int | None, end_id: int | None) -> str:
    """Lark grammar (llguidance dialect) for one or more well-formed calls of the allowed tools."""
    # Compact JSON, as the template shows: no whitespace between tokens, so none a model could repeat; times
    # with bounded fractional seconds, as response_format's (structured/bounds.py).
    from thinkgate.structured.bounds import bound_time_formats  # torch: only where a local model constrains

    schema = {**bound_time_formats(tool_calls_schema(req)), "x-guidance": {"whitespace_flexible": False}}
    open_tag = f"<[{start_id}]>" if start_id is not None else json.dumps("<tool_call>")
    close_tag = f"<[{end_id}]>" if end_id is not None else json.dumps("</tool_call>")
    many = req.parallel_tool_calls is not False and not isinstance(req.tool_choice, NamedToolChoice)
    # After any complete call the turn may end (end of sequence is allowed wherever the grammar accepts):
    # the template writes a newline before each further call, so a newline may follow a call and then
    # either another call or the end. One call only: the grammar is done after it, and generation stops.
    start = 'start: call ("\\n" call)* "\\n"?' if many else "start: call"
    return f'{start}\ncall: {open_tag} "\\n" body "\\n" {close_tag}\nbody: %json {json.dumps(schema)}\n'
