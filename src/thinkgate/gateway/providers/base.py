"""The seam between the API and whatever serves a model (our engine now; OpenAI-compatible upstreams later)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from thinkgate.protocol import ChatCompletionRequest


class ChatProvider(Protocol):
    model_id: str

    def card(self) -> dict:
        """The model's entry in /v1/models."""

    async def prepare(self, req: ChatCompletionRequest) -> object:
        """Validate and render the request; raise ThinkgateError (4xx) before anything streams."""

    def stream(self, req: ChatCompletionRequest, prepared: object, completion_id: str,
               created: int) -> AsyncIterator[dict]:
        """`chat.completion.chunk` dicts; the last one carries `usage` with empty choices."""

    def num_active(self) -> int:
        """Requests in flight (for tests and metrics)."""
