"""Turn one choice's engine outputs into OpenAI chunk deltas: reasoning split, then tool calls."""

from __future__ import annotations

from thinkgate.chat.reasoning import ReasoningParser
from thinkgate.chat.tool_parser import ToolCallParser, ToolEvent
from thinkgate.engine.request import FinishReason, RequestOutput

FINISH = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.STOP_TOKEN: "stop",
          FinishReason.GRAMMAR: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "stop",
          FinishReason.ERROR: "error"}


class ChoiceStream:
    def __init__(self, index: int, mode: str, show_reasoning: bool, tools: bool):
        self.index = index
        self.show_reasoning = show_reasoning
        self.reasoning = ReasoningParser(mode, end_tags=("<tool_call>",) if tools else ())
        self.tools = ToolCallParser() if tools else None
        self.num_calls = 0

    def deltas(self, out: RequestOutput) -> list[dict]:
        """Deltas for this output (in order); the finish is reported separately by `finish()`."""
        r, c = self.reasoning.feed(out.text)
        if out.finished:
            r2, c2 = self.reasoning.finish()
            r, c = r + r2, c + c2
        result: list[dict] = []
        if r and self.show_reasoning:
            result.append({"reasoning": r, "reasoning_content": r})
        if self.tools is None:
            if c:
                result.append({"content": c})
            return result
        events = self.tools.feed(c) if c else []
        if out.finished:
            events += self.tools.finish()
        for e in events:
            result.extend(self._event(e))
        return _merge_text(result)

    def _event(self, e: ToolEvent) -> list[dict]:
        if e.call is not None:  # a call begins: index, id, type and name once, as OpenAI streams it
            self.num_calls += 1
            return [{"tool_calls": [{"index": self.num_calls - 1, "id": e.call.id, "type": "function",
                                     "function": {"name": e.call.name, "arguments": ""}}]}]
        if e.arguments:  # the arguments as the model writes them
            return [{"tool_calls": [{"index": self.num_calls - 1, "function": {"arguments": e.arguments}}]}]
        return [{"content": e.text}]

    def finish(self, out: RequestOutput) -> dict:
        reason = FINISH[out.finish_reason]
        native = out.finish_reason.value
        if self.num_calls and reason == "stop":
            reason = "tool_calls"
        if self.tools is not None and self.tools.malformed and reason != "length":
            native = "malformed_tool_call"  # a call's JSON was malformed (a call cut by the cap is "length")
        return {"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason,
                "native_finish_reason": native}


def _merge_text(deltas: list[dict]) -> list[dict]:
    merged: list[dict] = []
    for d in deltas:
        if merged and "content" in d and set(merged[-1]) == {"content"}:
            merged[-1] = {"content": merged[-1]["content"] + d["content"]}
        else:
            merged.append(d)
    return merged
