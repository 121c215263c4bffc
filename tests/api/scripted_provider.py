"""A provider that plays a script of events: API and gateway behaviour tested without an engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from thinkgate.gateway.providers.base import (
    ChunkEvent,
    ErrorEvent,
    PreparedRequest,
    RequestContext,
    UsageEvent,
    UsageRecord,
)
from thinkgate.params import ChatParams


@dataclass(frozen=True)
class Scripted(PreparedRequest):
    pass


def content(index: int, text: str) -> ChunkEvent:
    return ChunkEvent([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])


def finish(index: int, reason: str = "stop", native: str = "eos") -> ChunkEvent:
    return ChunkEvent([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason,
                        "native_finish_reason": native}])


class ScriptedProvider:
    """Each choice says `words` one content chunk at a time, then finishes; `fail_with` ends choice 0 with an
    ErrorEvent instead; `step_s` paces the script (and a cancel stops it, as a real provider does)."""

    def __init__(self, model_id: str = "scripted", words=("Hello", " world"), fail_with: str | None = None,
                 step_s: float = 0.0):
        self.model_id = model_id
        self.words = list(words)
        self.fail_with = fail_with
        self.step_s = step_s
        self.active = 0

    def card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "test"}

    def num_active(self) -> int:
        return self.active

    async def prepare(self, params: ChatParams) -> Scripted:
        return Scripted(params, "none", prompt_tokens=7, max_tokens=params.max_tokens or 100)

    async def stream(self, prep: Scripted, ctx: RequestContext):
        n = prep.params.n
        said, ended_by = 0, "finished"
        self.active += 1
        try:
            for i in range(n):
                yield ChunkEvent([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}])
            for w in self.words:
                if ctx.cancelled.is_set():
                    ended_by = "client_disconnect"
                    break
                await asyncio.sleep(self.step_s)
                for i in range(n):
                    said += 1
                    yield content(i, w)
            for i in range(n):
                if i == 0 and self.fail_with:
                    ended_by = "error"
                    yield ErrorEvent(self.fail_with, choice=finish(0, "error", "error").choices[0])
                else:
                    yield finish(i)
            yield UsageEvent(UsageRecord(
                request_id=ctx.request_id, model=self.model_id, choices=n, prompt_tokens=7, cached_prompt_tokens=0,
                completion_tokens=said, reasoning_tokens=0, finish_reason="stop", native_finish_reason="eos",
                ended_by=ended_by, time_to_first_token_s=None, total_time_s=0.0))
        finally:
            self.active -= 1
