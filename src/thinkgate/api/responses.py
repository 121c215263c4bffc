"""Build a `chat.completion` from the chunk stream, so streaming and non-streaming share one path."""

from __future__ import annotations


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
        msg = {"role": "assistant", "content": "".join(st["content"]), "refusal": None,
               "reasoning": reasoning, "reasoning_content": reasoning}
        if st["tool_calls"]:
            msg["tool_calls"] = [st["tool_calls"][k] for k in sorted(st["tool_calls"])]
        out_choices.append({"index": i, "message": msg,
                            "logprobs": {"content": st["logprobs"], "refusal": None} if st["logprobs"] else None,
                            "finish_reason": st["finish_reason"],
                            "native_finish_reason": st["native_finish_reason"]})
    return {"id": head["id"], "object": "chat.completion", "created": head["created"], "model": head["model"],
            "choices": out_choices, "usage": usage}
