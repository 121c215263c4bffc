"""The keyed gateway end to end: a real uvicorn server in-process over the tiny engine, called with the
official openai client; on SQLite and on PostgreSQL. Keys, 401/402/403/429, exact billing (also of clients
that disconnect), and the books of 200 concurrent requests."""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import logging
import time
from dataclasses import dataclass
from decimal import Decimal

import httpx
import openai
import orjson
import pytest

from tests.api.engine_probe import EngineProbe
from tests.api.inprocess import InProcessServer
from tests.gateway.dbs import BACKENDS, fresh_database
from thinkgate.api.app import create_app
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price, to_units
from thinkgate.gateway.providers.local import LocalProvider
from thinkgate.gateway.service import BAD_KEY, Gateway
from thinkgate.storage.accounts import AccountStore
from thinkgate.storage.db import Database
from thinkgate.storage.ledger import Ledger

MODEL = "tiny"
PRICE = Price.cny("1", "2")  # CNY per 1000 tokens: 100,000 units a prompt token, 200,000 a completion token
MSGS = [{"role": "user", "content": "Tell me about the weather"}]
SECRETS: list[str] = []  # every key made here: none may appear in a log line


@pytest.fixture(scope="module")
def engine(engine_factory):
    eng = engine_factory("qwen3", max_num_seqs=64)
    probe = EngineProbe(eng)
    async_engine = AsyncEngine(eng)
    yield async_engine, probe
    async_engine.shutdown()


@dataclass
class Env:
    server: InProcessServer
    gateway: Gateway
    probe: EngineProbe
    db: Database

    @property
    def store(self) -> AccountStore:
        return self.gateway.store

    @property
    def ledger(self) -> Ledger:
        return self.gateway.ledger

    def key(self, account: str, balance: str = "1", **kw) -> str:
        if not any(a.name == account for a in self.store.accounts()):
            self.store.create_account(account, balance_units=to_units(balance))
        secret = new_secret()
        SECRETS.append(secret)
        self.store.create_key(account, f"{account}-{len(SECRETS)}", hash_secret(secret), display_prefix(secret), **kw)
        return secret

    def client(self, secret: str | None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base + "/v1", api_key=secret or "none", max_retries=0, timeout=60)

    def post(self, secret: str | None, **body) -> httpx.Response:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.post(self.server.base + "/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": MODEL, "messages": MSGS, **body})

    def books_balance(self) -> None:
        """balance = credits - captures - open holds for every account; captures = usage costs; none open."""
        assert self.ledger.open_holds() == 0
        for acct in self.store.accounts():
            sums: dict[str, int] = {}
            for e in self.ledger.entries(acct.id):
                sums[e["kind"]] = sums.get(e["kind"], 0) + e["amount_units"]
            assert acct.balance_units == sums.get("credit", 0) - sums.get("capture", 0) >= 0
            assert sums.get("hold", 0) == sums.get("capture", 0) + sums.get("release", 0)
            costs = [r["cost_units"] for r in self.ledger.totals("account", acct.id)]
            assert sum(costs) == sums.get("capture", 0)


@pytest.fixture(params=BACKENDS)
def env(request, tmp_path, engine):
    async_engine, probe = engine
    probe.reset()
    db = fresh_database(request.param, tmp_path)
    gateway = Gateway(db, {MODEL: PRICE}, require_keys=True, limiter=MemoryRateLimiter())
    gateway.start_sync()
    app = create_app({MODEL: LocalProvider(async_engine, MODEL)}, gateway=gateway)
    server = InProcessServer(app)
    yield Env(server, gateway, probe, db)
    server.stop()
    db.dispose()


def wait_settled(env: Env, request_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (row := env.ledger.generation(request_id)) is None:
        assert time.monotonic() < deadline, f"{request_id} was never settled"
        time.sleep(0.05)
    return row


def units(json_cost) -> int:
    return to_units(Decimal(str(json_cost)))


def test_keys_required_and_one_answer_for_every_bad_key(env):
    good = env.key("a")
    revoked = env.key("a")
    env.store.revoke_key(env.store.keys("a")[-1].name)
    expired = env.key("a", expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    r = env.post(None, max_tokens=2)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for bad in ("sk-tg-" + "x" * 43, revoked, expired, "Basic " + good):
        r = env.post(bad, max_tokens=2)
        assert r.status_code == 401 and r.json()["error"]["message"] == BAD_KEY, (bad[:12], r.text)
    assert env.post(good, max_tokens=2).status_code == 200
    r = httpx.get(env.server.base + f"/v1/models?api_key={good}", timeout=10)
    assert r.status_code == 400 and good not in r.text
    with pytest.raises(openai.AuthenticationError):
        env.client("sk-tg-unknown").models.list()
    assert [m.id for m in env.client(good).models.list().data] == [MODEL]


def test_models_and_addresses_a_key_may_not_use(env):
    only_other = env.key("a", models=["another-model"])
    far_away = env.key("a", ips=["10.0.0.0/8"])
    near = env.key("a", ips=["127.0.0.0/8", "::1/128"])
    r = env.post(only_other, max_tokens=2)
    assert r.status_code == 403 and r.json()["error"]["param"] == "model"
    assert env.post(far_away, max_tokens=2).status_code == 403
    assert env.post(near, max_tokens=2).status_code == 200


def test_exact_cost_and_a_cap_lowered_to_what_the_balance_pays(env):
    rich = env.key("rich", "10")
    body = env.post(rich, max_tokens=6, ignore_eos=True).json()
    u = body["usage"]
    cost = PRICE.cost(u["prompt_tokens"], u["completion_tokens"], u["prompt_tokens_details"]["cached_tokens"])
    assert units(u["cost"]) == cost == wait_settled(env, body["id"])["cost_units"]
    assert env.store.account("rich").balance_units == to_units("10") - cost
    # Enough for the prompt and 3 completion tokens: the request runs, cut at 3 by the balance.
    prompt_units = u["prompt_tokens"] * 100_000
    poor = env.key("poor", str(Decimal(prompt_units + 3 * 200_000 + 150_000) / 10**8))
    body = env.post(poor, max_tokens=50, ignore_eos=True, temperature=1.0, seed=1).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3
    assert env.store.account("poor").balance_units == 150_000  # what 3 tokens left: less than one more token
    r = env.post(poor, max_tokens=50)
    assert r.status_code == 402 and r.json()["error"]["type"] == "insufficient_quota"
    assert env.store.account("poor").balance_units == 150_000
    env.books_balance()


def test_a_key_limit_of_its_own(env):
    capped = env.key("big", "100", limit_units=to_units("0.05"))
    assert env.post(capped, max_tokens=2).status_code == 200
    while (r := env.post(capped, max_tokens=8, ignore_eos=True)).status_code == 200:
        pass
    assert r.status_code == 402
    key = env.store.keys("big")[0]
    assert key.spent_units <= key.limit_units and key.held_units == 0
    env.books_balance()


def test_rate_limits_answer_429_with_retry_after(env):
    slow = env.key("a", rpm=2)
    assert [env.post(slow, max_tokens=1).status_code for _ in range(2)] == [200, 200]
    r = env.post(slow, max_tokens=1)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        env.client(slow).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)


def test_a_client_that_disconnects_is_billed_exactly_what_was_generated(env):
    secret = env.key("a", "10")
    env.probe.delay_s = 0.02
    seen, request_id = 0, None
    with httpx.stream("POST", env.server.base + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {secret}"},
                      json={"model": MODEL, "messages": MSGS, "max_tokens": 300, "ignore_eos": True,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                request_id = orjson.loads(line[6:])["id"]
                seen += 1
                if seen == 6:
                    break
    row = wait_settled(env, request_id)
    generated = env.probe.generated(request_id)
    assert row["completion_tokens"] == generated and 5 <= generated < 300 and row["cancelled"]
    assert row["cost_units"] == PRICE.cost(row["prompt_tokens"], generated, row["cached_tokens"])
    info = httpx.get(env.server.base + f"/v1/generation?id={request_id}", timeout=10,
                     headers={"Authorization": f"Bearer {secret}"}).json()["data"]
    assert units(info["total_cost"]) == row["cost_units"] and info["cancelled"] is True
    env.books_balance()


@pytest.mark.slow
def test_200_concurrent_requests_over_10_keys_keep_the_books(env):
    keys = [env.key(f"acct{i}", "0.4") for i in range(10)]  # ~12 small requests each, then 402
    before = {a.name: a.balance_units for a in env.store.accounts()}
    received: dict[str, list[int]] = {f"acct{i}": [] for i in range(10)}
    statuses = []

    def one(i: int) -> None:
        account, secret = f"acct{i % 10}", keys[i % 10]
        client = env.client(secret)
        kw = dict(model=MODEL, messages=MSGS, max_tokens=8, extra_body={"ignore_eos": True}, temperature=1.0,
                  seed=i)
        try:
            if i % 3 == 0:
                resp = client.chat.completions.create(**kw)
                received[account].append(units(resp.usage.model_extra["cost"]))
            elif i % 3 == 1:
                last = None
                for chunk in client.chat.completions.create(stream=True, **kw):
                    last = chunk
                received[account].append(units(last.usage.model_extra["cost"]))
            else:  # leaves after two chunks: its cost is read back from the generation endpoint
                stream = client.chat.completions.create(stream=True, **kw)
                rid = next(iter(stream)).id
                next(iter(stream))
                stream.close()
                row = wait_settled(env, rid)
                info = httpx.get(env.server.base + f"/v1/generation?id={rid}", timeout=30,
                                 headers={"Authorization": f"Bearer {secret}"}).json()["data"]
                assert units(info["total_cost"]) == row["cost_units"]
                received[account].append(row["cost_units"])
            statuses.append(200)
        except openai.APIStatusError as e:
            statuses.append(e.status_code)

    with cf.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(200)))
    assert set(statuses) <= {200, 402} and statuses.count(200) >= 50 and 402 in statuses
    time.sleep(0.5)
    env.books_balance()
    for acct in env.store.accounts():
        spent = before[acct.name] - acct.balance_units
        usage_rows = env.ledger.totals("account", acct.id)
        assert spent == sum(r["cost_units"] for r in usage_rows) == sum(received[acct.name]) >= 0
        assert sum(r["requests"] for r in usage_rows) == len(received[acct.name])


def test_no_secret_in_any_log_line(env, caplog):
    caplog.set_level(logging.DEBUG)
    secret = env.key("a", "1")
    env.post(secret, max_tokens=2)
    env.post(secret + "x", max_tokens=2)
    httpx.get(env.server.base + f"/v1/models?key={secret}", timeout=10)
    # The server's loggers (the test's own httpx client logs the URL it was told to call: not the server's).
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore", "openai"))]
    text = "\n".join(r.getMessage() + str(r.args) for r in server)
    assert server and not any(s in text for s in SECRETS)
    assert not any(s[6:20] in text for s in SECRETS)
