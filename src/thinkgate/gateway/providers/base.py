"""The seam between the API and whatever serves a model (our engine; OpenAI-compatible upstreams later).

A provider takes validated `ChatParams`, prepares them (model-specific checks, rendering) and streams typed
events: chunks, errors, and exactly one `UsageEvent`, always last, however the request ends. The API owns
the HTTP side (the envelope of each chunk, SSE, disconnects) and hands the usage record to one hook, which
the gateway uses for billing and metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Protocol

from thinkgate.gateway.money import json_number, to_units
from thinkgate.params import ChatParams


@dataclass(frozen=True)
class PreparedRequest:
    """A request a provider accepted: past this point errors travel in the stream. Providers subclass it
    to keep their own state (token ids, sampling parameters); the API reads only these fields."""

    params: ChatParams
    reasoning_mode: str  # how the output carries reasoning: open (starts thinking) | hybrid | none
    prompt_tokens: int  # as the backend counts them (what a hold is sized by)
    max_tokens: int  # the cap on each choice's completion tokens, as the backend will apply it

    def capped(self, max_tokens: int) -> PreparedRequest:
        """The same request with a lower completion cap (what the caller's balance can pay for)."""
        return replace(self, max_tokens=min(self.max_tokens, max_tokens))


@dataclass
class RequestContext:
    """One request as the API sees it: its id, and the signal that its client went away."""

    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.monotonic)
    # Set by the API when the client disconnects: the provider stops generating, then still ends its
    # stream with the usage record of what was generated.
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the provider's request has left for its backend (a remote provider sets it as the request's
    # last byte goes out), else with the run's first event or its end (api/provider_run.py): the API places a
    # hold that overlaps the request after this, so the ledger's work does not delay the request.
    sent: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class UsageRecord:
    """What a request consumed, exactly: the tokens the backend generated up to the end, however it ended."""

    request_id: str
    model: str
    choices: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int  # over all choices, reasoning included
    reasoning_tokens: int
    finish_reason: str | None  # OpenAI's, of the first choice (None when it never started)
    native_finish_reason: str | None  # the backend's own reason (e.g. "eos", "max_tokens", "abort")
    ended_by: str  # "finished" | "client_disconnect" | "error"
    time_to_first_token_s: float | None  # from arrival to the first generated token; None if none came
    total_time_s: float
    cost: Decimal = Decimal(0)  # CNY, set by the gateway when it captures the charge
    usage_source: str = "engine"  # engine | upstream | tokenizer (upstream sent none) | estimate
    backend: str | None = None  # the upstream backend that served it

    def openai_usage(self) -> dict:
        """The `usage` object of a chat completion; `cost` is a JSON number with the capture's exact digits."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_prompt_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "cost": json_number(to_units(self.cost))}


@dataclass(frozen=True)
class ChunkEvent:
    """The `choices` of one `chat.completion.chunk` (the API adds id, created, model)."""

    choices: list[dict]


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed after it was accepted. `choice` is the finishing choice it ends, if any."""

    message: str
    type: str = "server_error"
    code: str | None = None
    choice: dict | None = None
    status: int = 500  # the HTTP status when it comes before any chunk (the API answers with it)
    headers: dict[str, str] | None = None  # e.g. Retry-After for an upstream's 429


@dataclass(frozen=True)
class UsageEvent:
    record: UsageRecord


ProviderEvent = ChunkEvent | ErrorEvent | UsageEvent


class ChatProvider(Protocol):
    model_id: str

    def card(self) -> dict:
        """The model's entry in /v1/models."""

    async def prepare(self, params: ChatParams) -> PreparedRequest:
        """Check what depends on the model and render the request; raise ThinkgateError (4xx) before
        anything streams."""

    def stream(self, prepared: PreparedRequest, ctx: RequestContext) -> AsyncIterator[ProviderEvent]:
        """Chunk and error events, then exactly one UsageEvent, last, also when `ctx.cancelled` is set."""

    def num_active(self) -> int:
        """Requests in flight (for health and metrics)."""
