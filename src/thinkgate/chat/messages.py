"""OpenAI messages -> the plain dicts a Qwen chat template expects."""

from __future__ import annotations

from thinkgate.errors import InvalidRequestError
from thinkgate.protocol import Message

VERBOSITY_HINTS = {
    "low": "Answer concisely: keep the final answer brief.",
    "high": "Answer thoroughly: give a detailed, complete final answer.",
}


def check_parts(messages: list[Message], model_id: str, vision: bool = False) -> int:
    """Refuse, naming the model, a content part it cannot read: text parts always, `image_url` parts (OpenAI's
    shape, `{"type": "image_url", "image_url": {"url": ...}}`) only on a vision model. Returns the images."""
    images = 0
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            if part.type == "text" and part.text is not None:
                continue
            if part.type == "image_url":
                if not vision:
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}] is an image, and the model {model_id!r} reads text only",
                        param=f"messages[{i}].content")
                url = (part.model_extra or {}).get("image_url")
                if not isinstance(url, dict) or not isinstance(url.get("url"), str) or not url["url"]:
                    raise InvalidRequestError(f"messages[{i}].content[{j}].image_url.url must be a URL or a data: "
                                              "URL", param=f"messages[{i}].content")
                images += 1
                continue
            kinds = "text and image_url" if vision else "text"
            raise InvalidRequestError(f"messages[{i}].content[{j}] has type {part.type!r}; the model {model_id!r} "
                                      f"reads only {kinds} parts", param=f"messages[{i}].content")
    return images


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
