"""The web console, served by thinkgate itself: the model catalog at `/`, model pages, sign-up and sign-in,
the customer's and the admin's views and the playground under `/console` (console/pages.py), the JSON they
read and write under `/console/api` (console/api.py, console/admin_api.py, console/playground.py), and static
files (Chart.js, vendored from npm with its licence, the console's own JS and CSS) under `/console/static`.

static/chart.umd.min.js is `dist/chart.umd.min.js` of the npm package chart.js 4.6.1 (`npm pack chart.js@4.6.1`;
sha256 87364cc2b2a76a6684929e7d6b80b18a897794db38400caff1fcf1791c6925d2), unchanged; static/chart.js.LICENSE.md is its MIT licence.

Pages are rendered on the server with Jinja2 and work without a build step; the charts and tables are
drawn by the browser from the JSON endpoints."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from thinkgate.config import ServerConfig
from thinkgate.console.admin_api import add_admin_api
from thinkgate.console.api import add_customer_api
from thinkgate.console.auth import Auth
from thinkgate.console.context import Console
from thinkgate.console.pages import add_pages
from thinkgate.console.playground import add_playground
from thinkgate.gateway.service import Gateway
from thinkgate.storage.console import ConsoleStore

STATIC = Path(__file__).parent / "static"


def add_console(app: FastAPI, providers: dict, gateway: Gateway | None, admin_token: str | None,
                config: ServerConfig) -> None:
    store = gateway.store if gateway is not None else None
    console_store = ConsoleStore(gateway.db) if gateway is not None else None
    console = Console(providers, gateway, Auth(console_store, store, admin_token), console_store)
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    add_pages(app, console)
    add_customer_api(app, console)
    add_admin_api(app, console)
    add_playground(app, console, config)
