"""The console's HTML pages. Each is rendered on the server (Jinja2, autoescaped) in the viewer's language;
what changes as the viewer works (balances, charts, tables, the playground's stream) is filled in by
static/console.js from the JSON endpoints.

Pages send a strict Content-Security-Policy (scripts and styles from this server only, no framing), and the
signed-in pages are never cached. The admin page answers 403 to a customer session and sends anyone else
to sign in: it is never rendered without the admin's session."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from thinkgate.console import i18n
from thinkgate.console.auth import Viewer
from thinkgate.console.context import Console, api_base
from thinkgate.console.model_docs import (
    SAMPLE_LANGS,
    capabilities,
    parameter_rows,
    prices,
    response_example,
    samples,
)
from thinkgate.storage.accounts import now

TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Vary": "Accept-Language, Cookie",  # the language and the viewer change the page
}


def render(request: Request, console: Console, viewer: Viewer, template: str, status: int = 200,
           **ctx) -> HTMLResponse:
    lang = i18n.language(request)
    t = i18n.texts(lang)
    html = TEMPLATES.get_template(template).render(
        t=t, lang=lang, viewer=viewer, csrf=viewer.csrf, has_accounts=console.gateway is not None,
        admin_enabled=console.auth.admin_enabled, page=template.removesuffix(".html"), **ctx)
    headers = dict(SECURITY_HEADERS)
    if viewer.session is not None:
        headers["Cache-Control"] = "no-store"
    return HTMLResponse(html, status_code=status, headers=headers)


def add_pages(app: FastAPI, console: Console) -> None:
    auth = console.auth

    @app.get("/", include_in_schema=False)
    async def catalog(request: Request):
        viewer = await auth.viewer(request)
        models = [{**c, "caps": capabilities(c), "prices": prices(c)} for c in console.cards()]
        return render(request, console, viewer, "catalog.html", models=models, base_url=api_base(request))

    @app.get("/console/models/{model_id:path}", include_in_schema=False)
    async def model_page(request: Request, model_id: str):
        viewer = await auth.viewer(request)
        card = console.card(model_id)
        if card is None:
            return render(request, console, viewer, "message.html", status=404,
                          message_key="no_model")
        base = api_base(request)
        code = samples(base, model_id)
        return render(request, console, viewer, "model.html", model=card, caps=capabilities(card),
                      prices=prices(card), base_url=base, samples=[(k, label, code[k]) for k, label in SAMPLE_LANGS],
                      params=parameter_rows(card.get("supported_parameters")),
                      example=response_example(model_id, card))

    @app.get("/console", include_in_schema=False)
    async def home(request: Request):
        viewer = await auth.viewer(request)
        if viewer.is_admin:
            return RedirectResponse("/console/admin", status_code=303)
        if viewer.account is None:
            return RedirectResponse("/console/signin", status_code=303)
        return render(request, console, viewer, "customer.html")

    @app.get("/console/signin", include_in_schema=False)
    async def signin(request: Request):
        return render(request, console, await auth.viewer(request), "signin.html", mode="signin")

    @app.get("/console/signup", include_in_schema=False)
    async def signup(request: Request):
        return render(request, console, await auth.viewer(request), "signin.html", mode="signup")

    @app.get("/console/admin", include_in_schema=False)
    async def admin(request: Request):
        viewer = await auth.viewer(request)
        if viewer.session is None:
            return RedirectResponse("/console/signin", status_code=303)
        if not viewer.is_admin:
            return render(request, console, viewer, "message.html", status=403,
                          message_key="admin_only_page")
        return render(request, console, viewer, "admin.html")

    @app.get("/console/playground", include_in_schema=False)
    async def playground(request: Request):
        viewer = await auth.viewer(request)
        gw = console.gateway
        open_server = gw is None or not gw.require_keys
        keys = []
        if viewer.account is not None:
            at = now()
            keys = [k for k in await asyncio.to_thread(gw.store.keys, viewer.account.name) if k.usable(at)]
        return render(request, console, viewer, "playground.html", models=list(console.providers),
                      keys=[k.name for k in keys], open_server=open_server)
