"""A bounded schemathesis run driven by our own /openapi.json, against a real server (in-process uvicorn) on the
tiny random-weight model, behind the keyed gateway with the admin API on: every documented operation gets
generated requests; no answer may be a 5xx, and every answer must match the document (status, content type,
body schema). Most generated requests must get past validation: the document describes what is accepted.

One deliberate change to the generated cases: a request's `model` is the served model's id (a generated string
names no served model, so it would only ever test the 404). The run prints the share of cases that got past
validation (not a 400, 413 or 422) and that succeeded (2xx), per operation and in all.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.inprocess import InProcessServer
from tests.gateway.dbs import fresh_database
from thinkgate.api.app import create_app
from thinkgate.config import ServerConfig
from thinkgate.engine.async_engine import AsyncEngine
from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price, to_units
from thinkgate.gateway.providers.local import LocalProvider
from thinkgate.gateway.service import Gateway

MODEL = "tiny"
ADMIN = "admin-token-for-the-fuzzer"
CASES_PER_OPERATION = 12
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
VALIDATION = {400, 413, 422}


@pytest.fixture(scope="module")
def server(engine_factory, tmp_path_factory):
    # A short context keeps each generated request's generation short (a prompt past it is a 400).
    async_engine = AsyncEngine(engine_factory("qwen3", max_model_len=192, max_num_seqs=8))
    db = fresh_database("sqlite", tmp_path_factory.mktemp("fuzz-db"))
    gateway = Gateway(db, {MODEL: Price.cny("1", "2")}, require_keys=True, limiter=MemoryRateLimiter())
    gateway.start_sync()
    gateway.store.create_account("fuzzer", balance_units=to_units("1000000"))
    secret = new_secret()
    gateway.store.create_key("fuzzer", "fuzzer-key-not-to-be-guessed", hash_secret(secret), display_prefix(secret))
    app = create_app({MODEL: LocalProvider(async_engine, MODEL)}, ServerConfig(), gateway=gateway, admin_token=ADMIN)
    s = InProcessServer(app)
    s.secret = secret
    try:
        yield s
    finally:
        s.stop()
        async_engine.shutdown()
        db.dispose()


@pytest.mark.slow
def test_generated_requests_get_past_validation_and_never_get_a_5xx(server):
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    statuses: dict[str, Counter] = defaultdict(Counter)
    failures: list[str] = []
    started = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        fuzz(op, server.base, ADMIN if op.path.startswith("/admin") else server.secret, statuses[op.label], failures)
    total = Counter()
    for label, c in sorted(statuses.items()):
        total.update(c)
        past = sum(n for s, n in c.items() if s not in VALIDATION)
        print(f"{label}: {dict(sorted(c.items()))} past validation {past}/{c.total()}")
    past = sum(n for s, n in total.items() if s not in VALIDATION)
    ok = sum(n for s, n in total.items() if 200 <= s < 300)
    print(f"all: {total.total()} cases in {time.monotonic() - started:.0f} s; past validation {past} "
          f"({past / total.total():.0%}); 2xx {ok} ({ok / total.total():.0%}); {dict(sorted(total.items()))}")
    assert not failures, "\n".join(failures[:20])
    assert not [s for s in total if s >= 500]
    assert past / total.total() > 0.5


def fuzz(op, base: str, token: str, statuses: Counter, failures: list[str]) -> None:
    @hypothesis.given(case=op.as_strategy())
    @hypothesis.settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
        response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - gathered, then reported together
            failures.append(f"{op.label} -> {response.status_code}: {str(e)[:600]}\n  body: {str(case.body)[:300]}")

    run()
