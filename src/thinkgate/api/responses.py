"""Provider events -> `chat.completion.chunk` dicts, and a `chat.completion` assembled from those chunks,
so streaming and non-streaming share one path."""

from __future__ import annotations

from collections.abc import AsyncIterator

from thinkgate.api.provider_run import KEEPALIVE
from thinkgate.errors import error_body
from thinkgate.gateway.providers.base import ChunkEvent, ErrorEvent, ProviderEvent, RequestContext, UsageEvent


async def render_chunks(events: AsyncIterator[ProviderEvent], ctx: RequestContext, model: str, n: int,
                        include_usage: bool) -> AsyncIterator[dict]:
    """Chunks as OpenAI streams them. Usage goes where clients look for it: with
    `stream_options.include_usage`, in an extra last chunk with empty `choices` (OpenAI's contract); without
    it, on the last chunk that carries a `finish_reason`, so code that reads `chunk.choices[0]` of every
    chunk never meets an empty list, and usage and cost still reach every client."""

    def chunk(choices: list[dict], **extra) -> dict:
        return {"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created, "model": model,
                "choices": choices, **extra}

    finishes = 0
    held = None  # the chunk that finishes the last choice waits for the usage record
    async for ev in events:
        if ev is KEEPALIVE:
            yield ev
            continue
        if isinstance(ev, UsageEvent):
            usage = ev.record.openai_usage()
            if held is not None and not include_usage:
                held["usage"] = usage
            if held is not None:
                yield held
                held = None
            if include_usage:
                yield chunk([], usage=usage)
            continue
        if isinstance(ev, ChunkEvent):
            out = chunk(ev.choices)
        else:
            assert isinstance(ev, ErrorEvent)
            out = chunk([ev.choice] if ev.choice else [], error=error_body(ev.message, ev.type, code=ev.code)["error"])
        if held is not None:
            yield held
            held = None
        finishes += sum(1 for c in out["choices"] if c.get("finish_reason"))
        if finishes >= n and out["choices"] and any(c.get("finish_reason") for c in out["choices"]):
            held = out
        else:
            yield out
    if held is not None:
        yield held


def assemble_completion(chunks: list[dict], reasoning_visible: bool, reasoning_mode: str) -> dict:
    head = chunks[0]
    choices: dict[int, dict] = {}
    usage = None
    for ch in chunks:
        if ch.get("usage") is not None:
            usage = ch["usage"]
        for c in ch["choices"]:
            st = choices.setdefault(c["index"], {"content": [], "reasoning": [], "logprobs": [], "tool_calls": {},
                                                 "finish_reason": None, "native_finish_reason": None})
            d = c.get("delta") or {}
            if d.get("content"):
                st["content"].append(d["content"])
            if d.get("reasoning"):
                st["reasoning"].append(d["reasoning"])
            for tc in d.get("tool_calls") or []:
                cur = st["tool_calls"].setdefault(tc["index"], {"id": None, "type": "function",
                                                                "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    cur["id"] = tc["id"]
                fn = tc.get("function") or {}
                cur["function"]["name"] += fn.get("name") or ""
                cur["function"]["arguments"] += fn.get("arguments") or ""
            if c.get("logprobs"):
                st["logprobs"].extend(c["logprobs"].get("content") or [])
            if c.get("finish_reason"):
                st["finish_reason"] = c["finish_reason"]
                st["native_finish_reason"] = c.get("native_finish_reason")
    out_choices = []
    for i in sorted(choices):
        st = choices[i]
        reasoning = "".join(st["reasoning"]) if reasoning_visible and reasoning_mode != "none" else None
        if reasoning == "" and reasoning_mode == "hybrid":
            reasoning = None
        content = "".join(st["content"])
        if content == "" and st["tool_calls"]:
            content = None  # a message of tool calls only, as OpenAI writes it
        msg = {"role": "assistant", "content": content, "refusal": None,
               "reasoning": reasoning, "reasoning_content": reasoning}
        if st["tool_calls"]:
            msg["tool_calls"] = [st["tool_calls"][k] for k in sorted(st["tool_calls"])]
        out_choices.append({"index": i, "message": msg,
                            "logprobs": {"content": st["logprobs"], "refusal": None} if st["logprobs"] else None,
                            "finish_reason": st["finish_reason"],
                            "native_finish_reason": st["native_finish_reason"]})
    return {"id": head["id"], "object": "chat.completion", "created": head["created"], "model": head["model"],
            "choices": out_choices, "usage": usage}
