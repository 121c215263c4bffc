"""The web console in headless Chromium against a real keyed `thinkgate serve` (tiny random-weight model):
the catalog and a model page (its copied Python sample runs against the server), the admin view (creates
top-up codes), a customer's sign-up, sign-in, key (seen once), redemption, a streamed playground run with
reasoning apart from the answer, the usage chart and request table showing it, and the walls: admin pages
and calls refused to a customer session and to nobody, CSRF and Origin checks, the sign-in rate limit.

The tests run in file order and share one server, one browser and the state they build (module `state`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from decimal import Decimal

import httpx
import pytest

from tests.console.browser import CHROMIUM, PageErrors, keyed_server, needs_chromium, shoot
from thinkgate.protocol import ChatCompletionRequest

pytestmark = [pytest.mark.slow, needs_chromium]
ADMIN_TOKEN = "console-test-admin-" + uuid.uuid4().hex
MODEL = "tiny-thinker"
PASSWORD = "correct horse battery"
state: dict = {}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    # 512 tokens of context: the copied sample (no max_tokens, like the seed's) ends in seconds.
    s = keyed_server(checkpoints["qwen3"], tmp_path_factory.mktemp("console"), MODEL, ADMIN_TOKEN, 512)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _context(browser, server):
    return browser.new_context(base_url=server.base, viewport={"width": 1280, "height": 800}, locale="zh-CN",
                               permissions=["clipboard-read", "clipboard-write"])


@pytest.fixture(scope="module")
def customer(browser, server):
    ctx = _context(browser, server)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def admin(browser, server):
    ctx = _context(browser, server)
    yield ctx
    ctx.close()


def admin_api(server, method: str, path: str, **kw) -> dict:
    r = httpx.request(method, server.base + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kw)
    assert r.status_code < 300, r.text
    return r.json()


def test_catalog_and_model_page_and_its_python_sample(browser, server, tmp_path):
    from playwright.sync_api import expect

    ctx = _context(browser, server)
    page = ctx.new_page()
    errors = PageErrors(page)
    page.goto("/")
    card = page.locator(f'.model-card[data-model="{MODEL}"]')
    expect(card).to_contain_text("¥ 1")
    expect(card).to_contain_text("¥ 2")
    expect(card).to_contain_text("512")  # context length
    expect(page.locator("#base-url")).to_have_text(server.base + "/api/gpt/v1")
    shoot(page, "catalog")

    card.locator("a.button").click()
    page.wait_for_url(f"**/console/models/{MODEL}")
    expect(page.locator("#model-id")).to_have_text(MODEL)
    expect(page.locator("#price-input")).to_have_text("¥ 1")
    expect(page.locator("#price-output")).to_have_text("¥ 2")
    # The parameter table is the validator's schema: every range shown is the schema's.
    schema = ChatCompletionRequest.model_json_schema()["properties"]
    for name, lo, hi in (("temperature", "[0", "2]"), ("top_p", "(0", "1]"), ("n", "[1", "8]"),
                         ("top_logprobs", "[0", "20]")):
        branch = next(b for b in schema[name]["anyOf"] if b.get("type") != "null")
        assert str(branch["maximum"]) in hi
        expect(page.locator(f'tr[data-param="{name}"] td').nth(2)).to_have_text(f"{lo}, {hi}")
    expect(page.locator('tr[data-param="reasoning.max_tokens"]')).to_be_visible()
    expect(page.locator('tr[data-param="messages"]')).to_contain_text("*")  # required
    for lang in ("curl", "python", "requests", "javascript", "go"):
        page.click(f'.tab[data-tab="{lang}"]')
        code = page.locator(f"#sample-{lang}")
        expect(code).to_be_visible()
        expect(code).to_contain_text(MODEL)
        expect(code).to_contain_text(server.base + "/api/gpt/v1")
    expect(page.locator("#response-example")).to_contain_text('"reasoning"')

    page.click('.tab[data-tab="python"]')
    page.click('button.copy[data-copy="sample-python"]')
    copied = page.evaluate("navigator.clipboard.readText()")
    assert "from openai import OpenAI" in copied and "THINKGATE_API_KEY" in copied
    shoot(page, "model")

    admin_api(server, "POST", "/admin/accounts", json={"name": "sample-runner", "balance": "100"})
    secret = admin_api(server, "POST", "/admin/keys", json={"account": "sample-runner", "name": "sample"})["secret"]
    script = tmp_path / "sample.py"
    script.write_text(copied)
    run = subprocess.run([sys.executable, str(script)], env={**os.environ, "THINKGATE_API_KEY": secret},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "answer:" in run.stdout and "cost=" in run.stdout
    runner = admin_api(server, "GET", "/admin/accounts/sample-runner")
    assert runner["usage"]["requests"] == 1 and Decimal(runner["balance"]) < 100

    page.click("#lang-switch")  # English, kept in a cookie
    expect(page.locator("h2").first).to_have_text("API base URL")
    page.goto("/")
    expect(page.locator("h1")).to_have_text("Models and prices")
    shoot(page, "catalog-en")
    errors.expect_none()
    ctx.close()


def test_admin_signs_in_with_the_token_and_creates_top_up_codes(admin, server):
    from playwright.sync_api import expect

    page = admin.new_page()
    errors = PageErrors(page)
    page.goto("/console/admin")
    page.wait_for_url("**/console/signin")  # no session: sent to sign in
    shoot(page, "signin")
    page.fill("#admin-form input[name=token]", "not-the-token")
    page.click("#admin-form button[type=submit]")
    expect(page.locator("#admin-form .error")).to_have_attribute("data-code", "bad_admin_token")
    expect(page.locator("#admin-form .error")).to_have_text("管理员令牌错误。")  # in the page's language
    page.fill("#admin-form input[name=token]", ADMIN_TOKEN)
    page.click("#admin-form button[type=submit]")
    page.wait_for_url("**/console/admin")
    expect(page.locator("#accounts-table tbody")).to_contain_text("sample-runner")
    expect(page.locator("#keys-table tbody")).to_contain_text("sample")
    expect(page.locator("#backends-table tbody")).to_contain_text(MODEL)
    expect(page.locator("#backends-table tbody")).to_contain_text("running")
    expect(page.locator("#usage-table tfoot")).to_contain_text("1")  # the sample's request

    page.fill("#codes-form input[name=amount]", "5")
    page.fill("#codes-form input[name=count]", "2")
    page.click("#codes-form button[type=submit]")
    expect(page.locator("#new-codes")).to_be_visible()
    codes = page.locator("#new-codes-value").text_content().split("\n")
    assert len(codes) == 2 and all(c.startswith("tg-code-") for c in codes)
    state["codes"] = codes
    shoot(page, "admin")
    errors.expect_none(allowed=("401",))  # the wrong token's answer
    page.close()


def _storage_dump(page) -> str:
    return page.evaluate("JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage), "
                         "document.cookie, location.href, history.length])")


def test_customer_signs_up_signs_in_makes_a_key_and_redeems_a_code(customer, server):
    from playwright.sync_api import expect

    page = customer.new_page()
    errors = PageErrors(page)
    email = f"user-{uuid.uuid4().hex[:8]}@example.com"
    state["email"] = email
    page.goto("/console/signup")
    shoot(page, "signup")
    page.fill("#auth-form input[name=email]", email)
    page.fill("#auth-form input[name=password]", PASSWORD)
    page.click("#auth-form button[type=submit]")
    page.wait_for_url("**/console")
    expect(page.locator("#balance")).to_have_text("¥ 0")
    cookie = next(c for c in customer.cookies() if c["name"] == "tg_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    page.click("#sign-out")
    page.wait_for_url(server.base + "/")
    page.goto("/console")
    page.wait_for_url("**/console/signin")
    page.fill("#auth-form input[name=email]", email)
    page.fill("#auth-form input[name=password]", "wrong password!")
    page.click("#auth-form button[type=submit]")
    expect(page.locator("#auth-form .error")).to_have_attribute("data-code", "bad_credentials")
    page.fill("#auth-form input[name=password]", PASSWORD)
    page.click("#auth-form button[type=submit]")
    page.wait_for_url("**/console")

    page.fill("#key-form input[name=name]", "laptop")
    page.fill("#key-form input[name=limit]", "3")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#new-secret")).to_be_visible()
    secret = page.locator("#new-secret-value").text_content()
    assert re.fullmatch(r"sk-tg-[A-Za-z0-9_-]{40,}", secret)
    row = page.locator("#keys-table tbody tr", has_text="laptop")
    expect(row).to_contain_text(secret[:10] + "...")
    expect(row).to_contain_text("active")
    state["key_name"] = row.locator("td").first.text_content()
    state["secret"] = secret
    assert secret not in _storage_dump(page)
    assert all(secret not in c["value"] for c in customer.cookies())
    shoot(page, "customer-new-key")
    page.reload()
    expect(page.locator("#keys-table tbody tr", has_text="laptop")).to_be_visible()
    assert secret not in page.content()  # seen once

    page.fill("#redeem-form input[name=code]", state["codes"][0])
    page.click("#redeem-form button[type=submit]")
    expect(page.locator("#balance")).to_have_text("¥ 5")
    page.fill("#redeem-form input[name=code]", state["codes"][0])
    page.click("#redeem-form button[type=submit]")
    expect(page.locator("#redeem-form .error")).to_have_attribute("data-code", "invalid_code")
    expect(page.locator("#balance")).to_have_text("¥ 5")
    errors.expect_none(allowed=("401", "400"))  # the wrong password, the second redemption
    page.close()


def test_playground_streams_reasoning_apart_and_the_console_shows_the_run(customer, server):
    from playwright.sync_api import expect

    page = customer.new_page()
    errors = PageErrors(page)
    page.goto("/console/playground")
    page.select_option("#playground-form select[name=model]", MODEL)
    page.select_option("#playground-form select[name=key]", state["key_name"])
    page.fill("#playground-form textarea[name=user]", "hello")
    page.fill("#playground-form input[name=max_tokens]", "40")
    page.fill("#playground-form input[name=thinking_budget]", "8")
    page.fill("#playground-form input[name=seed]", "1")  # sampled, yet the same answer every run
    page.click("#pg-send")
    expect(page.locator("#pg-usage")).not_to_be_empty(timeout=120_000)
    reasoning = page.locator("#pg-reasoning-text").text_content()
    answer = page.locator("#pg-content").text_content()
    assert reasoning and answer and reasoning != answer
    cost = Decimal(page.locator("#pg-usage").get_attribute("data-cost"))
    assert cost > 0
    page.click("#pg-reasoning summary")  # the reasoning folds away
    expect(page.locator("#pg-reasoning-text")).to_be_hidden()
    page.click("#pg-reasoning summary")
    expect(page.locator("#pg-reasoning-text")).to_be_visible()
    shoot(page, "playground")

    # The next message carries the conversation, and a forced tool call is shown apart, as a call.
    tool = '[{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]'
    page.fill("#playground-form textarea[name=tools]", tool)
    page.select_option("#playground-form select[name=tool_choice]", "required")
    page.fill("#playground-form input[name=max_tokens]", "60")
    page.fill("#playground-form textarea[name=user]", "what time is it?")
    page.click("#pg-send")
    expect(page.locator("#pg-usage")).not_to_be_empty(timeout=120_000)
    expect(page.locator("#pg-tools")).to_contain_text("get_time(")
    tool_cost = Decimal(page.locator("#pg-usage").get_attribute("data-cost"))
    shoot(page, "playground-tools")
    expect(page.locator("#pg-history li")).to_have_count(2)  # the first turn, above this one
    expect(page.locator("#pg-history li").first).to_contain_text("hello")
    page.click("#pg-new")
    expect(page.locator("#pg-history li")).to_have_count(0)
    expect(page.locator("#pg-usage")).to_be_empty()

    page.goto("/console")
    expect(page.locator("#requests-table tbody tr")).to_have_count(2)
    first = page.locator("#requests-table tbody tr").nth(1)  # newest first: the first run is second
    expect(first).to_contain_text(MODEL)
    expect(first).to_contain_text(state["key_name"])
    assert Decimal(first.locator("td").nth(6).text_content()) == cost
    chart = page.evaluate("(() => { const c = Chart.getChart(document.getElementById('usage-chart'));"
                          " return {labels: c.data.labels, sets: c.data.datasets.map(d => [d.label, d.data])}; })()")
    assert chart["sets"][0][0] == MODEL and len(chart["labels"]) == 1
    assert Decimal(str(chart["sets"][0][1][0])) == cost + tool_cost
    expect(page.locator("#balance")).to_have_text(f"¥ {Decimal(5) - cost - tool_cost}")
    shoot(page, "customer")
    errors.expect_none()
    page.close()


def test_a_revoked_key_stops_working(customer, server):
    from playwright.sync_api import expect

    page = customer.new_page()
    page.goto("/console")
    page.once("dialog", lambda d: d.accept())
    page.locator("#keys-table tbody tr", has_text="laptop").locator("button.revoke").click()
    expect(page.locator("#keys-table tbody tr", has_text="laptop")).to_contain_text("revoked")
    r = httpx.get(server.base + "/v1/key", headers={"Authorization": f"Bearer {state['secret']}"})
    assert r.status_code == 401
    page.close()


def test_admin_pages_and_calls_are_walled_off(customer, browser, server):
    page = customer.new_page()  # a customer's session
    r = page.goto("/console/admin")
    assert r.status == 403 and page.locator("#codes-form").count() == 0
    csrf = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert page.request.get("/console/api/admin/accounts").status == 403
    made = page.request.post("/console/api/admin/codes", data={"amount": "100", "count": 1},
                             headers={"X-CSRF-Token": csrf})
    assert made.status == 403 and made.json()["error"]["code"] == "admin_only"
    # Writes without the session's CSRF token, or from another site, are refused.
    no_token = page.request.post("/console/api/keys", data={"name": "x1"})
    assert no_token.status == 403 and no_token.json()["error"]["code"] == "bad_csrf_token"
    foreign = page.request.post("/console/api/keys", data={"name": "x2"},
                                headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})
    assert foreign.status == 403 and foreign.json()["error"]["code"] == "bad_origin"
    page.close()

    nobody = _context(browser, server)
    page = nobody.new_page()
    page.goto("/console/admin")
    page.wait_for_url("**/console/signin")
    assert page.request.get("/console/api/admin/accounts").status == 401
    assert page.request.get("/console/api/me").status == 401
    nobody.close()


def test_sign_in_attempts_are_rate_limited(server):
    email = state["email"]
    url = server.base + "/console/api/signin"
    for _ in range(5):
        r = httpx.post(url, json={"email": email, "password": "not the password"})
        assert r.status_code == 401, r.text
    r = httpx.post(url, json={"email": email, "password": PASSWORD})  # even the right one, for a while
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "too_many_sign_ins"
