"""OpenAI messages -> the plain dicts a Qwen chat template expects."""

from __future__ import annotations

from thinkgate.errors import InvalidRequestError
from thinkgate.protocol import Message

VERBOSITY_HINTS = {
    "low": "Answer concisely: keep the final answer brief.",
    "high": "Answer thoroughly: give a detailed, complete final answer.",
}


def flatten_content(m: Message, index: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"messages[{index}].content[{j}] has type {part.type!r}; this model accepts only text parts",
                param=f"messages[{index}].content")
        parts.append(part.text)
    return "".join(parts)


def to_template_messages(messages: list[Message], verbosity: str | None = None) -> list[dict]:
    out: list[dict] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        d: dict = {"role": role, "content": flatten_content(m, i)}
        if m.role == "assistant":
            reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
            if reasoning is not None:
                d["reasoning_content"] = reasoning
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
        if m.role == "tool":
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
        elif m.name is not None:
            d["name"] = m.name
        out.append(d)
    hint = VERBOSITY_HINTS.get(verbosity or "medium")
    if hint:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": (out[0]["content"] + "\n\n" + hint).strip()}
        else:
            out.insert(0, {"role": "system", "content": hint})
    return out
