"""What every console route needs: the served models, the gateway (None: a server without accounts), the
sign-in checks and the console's storage."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from thinkgate.console.auth import Auth
from thinkgate.errors import NotFoundError
from thinkgate.gateway.service import Gateway
from thinkgate.storage.console import ConsoleStore


@dataclass
class Console:
    providers: dict
    gateway: Gateway | None
    auth: Auth
    store: ConsoleStore | None

    def need_gateway(self) -> Gateway:
        if self.gateway is None:
            raise NotFoundError("this server runs without a gateway: it has no accounts", code="no_gateway")
        return self.gateway

    def cards(self) -> list[dict]:
        return [_card(p) for p in self.providers.values()]

    def card(self, model_id: str) -> dict | None:
        p = self.providers.get(model_id)
        return _card(p) if p is not None else None


def _card(provider) -> dict:
    """The model's /v1/models card, and whether it takes images (a catalog entry's `vision`)."""
    return {**provider.card(), "vision": bool(getattr(provider, "vision", False))}


def api_base(request: Request) -> str:
    """This server's OpenAI base URL as the browser reached it (behind a proxy: uvicorn's forwarded headers)."""
    return str(request.base_url).rstrip("/") + "/api/gpt/v1"
