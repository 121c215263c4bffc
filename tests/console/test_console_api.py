"""The console's JSON calls against a real keyed `thinkgate serve` (tiny model), without a browser: bad input
is a 400 naming the field (never a 5xx), the session's rights and CSRF token are checked before anything is
read, a customer reaches only their own keys, the playground bills the named key through the API's own path,
and a server without an admin token has no admin sign-in."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
import uuid

import httpx
import pytest

from tests.console.browser import keyed_server

pytestmark = pytest.mark.slow
ADMIN_TOKEN = "console-api-admin-" + uuid.uuid4().hex
MODEL = "tiny-thinker"


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    # 128 tokens of context: each code sample (no max_tokens, like the seed's) ends in a second or two.
    s = keyed_server(checkpoints["qwen3"], tmp_path_factory.mktemp("console-api"), MODEL, ADMIN_TOKEN, 128)
    yield s
    s.stop()


class Browserless:
    """A signed-in console session over httpx: the session cookie, and the CSRF token its pages carry."""

    def __init__(self, server, email: str | None = None):
        self.http = httpx.Client(base_url=server.base, timeout=60)
        self.csrf = ""
        if email is not None:
            r = self.http.post("/console/api/signup", json={"email": email, "password": "password-123"})
            assert r.status_code == 200, r.text
            self.refresh_csrf()

    def refresh_csrf(self, page: str = "/console") -> None:
        html = self.http.get(page).text
        self.csrf = re.search(r'name="csrf-token" content="([^"]*)"', html).group(1)

    def post(self, path: str, body) -> httpx.Response:
        return self.http.post(path, json=body, headers={"X-CSRF-Token": self.csrf})


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_bad_sign_up_and_sign_in_input_is_a_400_naming_the_field(server):
    c = httpx.Client(base_url=server.base)
    assert error(c.post("/console/api/signup", json={"email": "not-an-email", "password": "password-123"}),
                 400)["param"] == "email"
    assert error(c.post("/console/api/signup", json={"email": "a@b.example", "password": "short"}),
                 400)["param"] == "password"
    assert error(c.post("/console/api/signup", json={"email": "a@b.example"}), 400)["param"] == "password"
    assert error(c.post("/console/api/signup", json={"email": "a@b.example", "password": "password-123",
                                                      "admin": True}), 400)["param"] == "admin"
    assert error(c.post("/console/api/signup", content=b"{", headers={"content-type": "application/json"}),
                 400)["message"].startswith("the request body is not valid JSON")
    assert error(c.post("/console/api/signin", content=b"email=a", headers={
        "content-type": "application/x-www-form-urlencoded"}), 400)["message"].startswith("console calls send")
    email = f"dup-{uuid.uuid4().hex[:6]}@example.com"
    assert c.post("/console/api/signup", json={"email": email, "password": "password-123"}).status_code == 200
    taken = error(c.post("/console/api/signup", json={"email": email.upper(), "password": "password-456"}), 409)
    assert taken["param"] == "email" and taken["code"] == "email_taken"  # emails compare lower-cased
    long_email = "x" * 200 + f"-{uuid.uuid4().hex[:6]}@example.com"  # longer than an account name may be
    assert c.post("/console/api/signup", json={"email": long_email, "password": "password-123"}).status_code == 200
    me = c.get("/console/api/me").json()
    assert me["email"] == long_email and me["name"].startswith("user-x")
    unknown = error(c.post("/console/api/signin", json={"email": "nobody@example.com", "password": "password-1"}),
                    401)
    assert unknown["message"] == "wrong email or password"  # the same message as a wrong password


def test_a_customer_manages_only_their_own_keys_with_checked_input(server):
    alice = Browserless(server, f"alice-{uuid.uuid4().hex[:6]}@example.com")
    bob = Browserless(server, f"bob-{uuid.uuid4().hex[:6]}@example.com")
    assert error(alice.post("/console/api/keys", {"name": "k", "expires": "2001-01-01"}), 400)["param"] == "expires"
    assert error(alice.post("/console/api/keys", {"name": "k", "limit": "-1"}), 400)["param"] == "limit"
    assert error(alice.post("/console/api/keys", {"name": "k", "rpm": "0"}), 400)["param"] == "rpm"
    assert error(alice.post("/console/api/keys", {"name": "sk-looks-like-a-key"}), 400)["param"] == "name"
    assert error(alice.post("/console/api/keys", {"name": "n" * 127}), 400)["param"] == "name"  # too long stored
    made = alice.post("/console/api/keys", {"name": "laptop", "limit": "1.5", "rpm": "30",
                                            "expires": "2999-01-01"})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    assert made.json()["secret"].startswith("sk-tg-") and key["limit"] == "1.5" and key["rpm"] == 30
    assert error(alice.post("/console/api/keys", {"name": "laptop"}), 409)["param"] == "name"
    me = alice.http.get("/console/api/me").json()
    assert [k["name"] for k in me["keys"]] == [key["name"]] and "secret" not in me["keys"][0]
    # Bob cannot see or revoke it: to him it does not exist.
    assert bob.http.get("/console/api/me").json()["keys"] == []
    assert error(bob.post(f"/console/api/keys/{key['name']}/revoke", {}), 404)["code"] == "not_found"
    assert alice.post(f"/console/api/keys/{key['name']}/revoke", {}).json()["status"] == "revoked"
    assert error(alice.post("/console/api/redeem", {"code": "tg-code-made-up"}), 400)["param"] == "code"


def test_playground_bills_the_named_key_and_checks_its_input(server):
    alice = Browserless(server, f"pg-{uuid.uuid4().hex[:6]}@example.com")
    key = alice.post("/console/api/keys", {"name": "pg"}).json()["key"]["name"]
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    # No balance yet: the API's own 402, before anything streams.
    assert error(alice.post("/console/api/playground", {"key": key, "request": ask}), 402)["code"] == \
        "insufficient_balance"
    admin = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    code = admin.post("/admin/codes", json={"amount": "1", "count": 1}).json()["codes"][0]
    assert alice.post("/console/api/redeem", {"code": code}).json()["balance"] == "1"
    bad = {**ask, "temperature": 3}
    assert error(alice.post("/console/api/playground", {"key": key, "request": bad}), 400)["param"] == "temperature"
    assert error(alice.post("/console/api/playground", {"request": ask}), 400)["param"] == "key"
    other = Browserless(server, f"other-{uuid.uuid4().hex[:6]}@example.com")
    assert error(other.post("/console/api/playground", {"key": key, "request": ask}), 401)["param"] == "key"
    r = alice.post("/console/api/playground", {"key": key, "request": ask})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]") and '"cost"' in r.text
    rows = alice.http.get("/console/api/requests").json()["data"]
    assert len(rows) == 1 and rows[0]["key"] == key and rows[0]["completion_tokens"] <= 8
    usage = admin.get("/admin/usage", params={"group": "key"}).json()["data"]
    assert [u["key"] for u in usage if u["key"] == key] == [key]  # billed to that key


def test_writes_need_the_session_and_its_csrf_token(server):
    alice = Browserless(server, f"csrf-{uuid.uuid4().hex[:6]}@example.com")
    alice.csrf = "forged"
    assert error(alice.post("/console/api/keys", {"name": "x"}), 403)["code"] == "bad_csrf_token"
    assert error(alice.post("/console/api/signout", {}), 403)["code"] == "bad_csrf_token"
    nobody = httpx.Client(base_url=server.base)
    assert error(nobody.post("/console/api/keys", json={"name": "x"}), 401)["code"] == "not_signed_in"
    assert error(nobody.get("/console/api/admin/keys"), 401)["code"] == "not_signed_in"
    alice.refresh_csrf()
    assert alice.post("/console/api/signout", {}).status_code == 200
    assert error(alice.http.get("/console/api/me"), 401)["code"] == "not_signed_in"  # the session ended


def test_admin_codes_input_is_checked(server):
    admin = Browserless(server)
    r = admin.http.post("/console/api/admin-signin", json={"token": ADMIN_TOKEN})
    assert r.status_code == 200 and r.json()["redirect"] == "/console/admin"
    admin.refresh_csrf("/console/admin")
    assert error(admin.post("/console/api/admin/codes", {"amount": "0", "count": 1}), 400)["param"] == "amount"
    assert error(admin.post("/console/api/admin/codes", {"amount": "1", "count": 0}), 400)["param"] == "count"
    assert error(admin.post("/console/api/admin/codes", {"amount": "1.123456789", "count": 1}), 400)["param"] == \
        "amount"
    assert admin.post("/console/api/admin/codes", {"amount": "2.5", "count": 3}).json()["amount"] == "2.5"
    # The admin's session is not a customer's.
    assert error(admin.http.get("/console/api/me"), 403)["code"] == "customer_only"


# How to run each sample of a model page: the file it is saved as and the command (None: the tool is absent).
RUNNERS = {
    "curl": ("sample.sh", ["bash"]),
    "python": ("sample.py", [sys.executable]),
    "requests": ("sample_requests.py", [sys.executable]),
    "javascript": ("sample.mjs", [shutil.which("node")] if shutil.which("node") else None),
    "go": ("main.go", [shutil.which("go"), "run"] if shutil.which("go") else None),
}


@pytest.mark.parametrize("lang", list(RUNNERS))
def test_every_code_sample_of_a_model_page_runs_against_the_server(server, lang, tmp_path):
    page = httpx.get(server.base + f"/console/models/{MODEL}").text
    code = html.unescape(re.search(rf'<code id="sample-{lang}">(.*?)</code>', page, re.S).group(1))
    assert MODEL in code and server.base + "/api/gpt/v1" in code
    name, command = RUNNERS[lang]
    if command is None:
        pytest.skip(f"no {'node' if lang == 'javascript' else 'go'} on PATH to run the {lang} sample")
    admin = httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    account = f"sample-{lang}"
    assert admin.post("/admin/accounts", json={"name": account, "balance": "10"}).status_code == 201
    secret = admin.post("/admin/keys", json={"account": account, "name": account}).json()["secret"]
    (tmp_path / name).write_text(code)
    run = subprocess.run([*command, name], cwd=tmp_path, env={**os.environ, "THINKGATE_API_KEY": secret},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "chat.completion" in run.stdout or "content" in run.stdout or "answer:" in run.stdout, run.stdout
    assert admin.get(f"/admin/accounts/{account}").json()["usage"]["requests"] == 1  # it reached the model


def test_forms_post_so_no_secret_can_land_in_a_url(server):
    # Should the script not run, a form submits itself: as a POST, never as a GET with the fields in the URL.
    alice = Browserless(server, f"forms-{uuid.uuid4().hex[:6]}@example.com")
    assert alice.post("/console/api/keys", {"name": "k"}).status_code == 201  # the playground shows its form
    pages = [alice.http.get(p).text for p in ("/console", "/console/playground")]
    pages += [httpx.get(server.base + p).text for p in ("/console/signin", "/console/signup")]
    forms = [f for page in pages for f in re.findall(r"<form[^>]*>", page)]
    assert len(forms) >= 6 and all('method="post"' in f for f in forms), forms
    r = httpx.post(server.base + "/console/signin", data={"token": "x"})
    assert r.status_code == 405 and "token" not in str(r.url.query)
