"""/openapi.json describes what the API validates: the request schemas are the validating models', so the
document's chat request schema (checked with jsonschema) accepts the seed page's example and every request
body the test suite sends, and rejects what the validator rejects (but for the rules a JSON Schema cannot say,
listed below); real answers match the response schemas; `/docs` is off unless asked for.

The test suite's bodies are collected from the test modules' source (tests/**/test_*.py): every
`chat.completions.create(...)`, `completions.create(...)`, `responses.create(...)` and every POST to one of
those paths with a `json=` body, its arguments evaluated in the module's namespace, with the function's own
simple assignments (`kw = dict(...)`, `body = {...}`) and single-name parametrize values; module-level
tables of bodies (test_errors' CASES) too. An argument that cannot be evaluated outside the running test
(a fixture's value) is dropped, or for `model` replaced by a model name; a body without its required fields
is left out. The counts are asserted, so a change that stops the collection from finding bodies fails here.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import json
import tempfile
from pathlib import Path

import jsonschema
import pytest

from tests.api.inprocess import asgi_client
from tests.api.scripted_provider import ScriptedProvider
from tests.gateway.dbs import fresh_database
from thinkgate.api.app import create_app
from thinkgate.api.openai_responses import validate_response_request
from thinkgate.api.requests import as_model
from thinkgate.api.text_completions import prompts_of, text_params
from thinkgate.config import ServerConfig
from thinkgate.errors import InvalidRequestError
from thinkgate.gateway.limits import MemoryRateLimiter
from thinkgate.gateway.money import Price
from thinkgate.gateway.service import Gateway
from thinkgate.params import validate_chat
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.protocol_endpoints import CompletionRequest, CreateResponseRequest

ROOT = Path(__file__).parents[2]
# The seed page's curl example (../shared/seed/000_6c7a8282063179b1.txt, its `--data` body), kept here
# because a clean clone in CI has no ../shared.
SEED_EXAMPLE = ROOT / "tests" / "data" / "seed_chat_request.json"
SAFE_CALLS = {"dict", "list", "tuple", "set", "range", "len", "str", "int", "float", "sorted", "zip", "enumerate"}
SAFE_METHODS = {"dumps", "join", "format", "copy"}
SDK_ARGS = {"extra_headers", "extra_query", "timeout"}  # the SDK's own keywords, not body fields
ENDPOINTS = {  # what a body is for: (its component, its model, the route's validation after the model)
    "chat": ("ChatCompletionRequest", ChatCompletionRequest, validate_chat),
    "completions": ("CompletionRequest", CompletionRequest, lambda r: (prompts_of(r), text_params(r))),
    "responses": ("CreateResponseRequest", CreateResponseRequest, validate_response_request),
}
REQUIRED = {"chat": ("model", "messages"), "completions": ("model", "prompt"), "responses": ("model", "input")}
# The validator's rules that a JSON Schema cannot state (a field that depends on another, or on what the model
# reads: image parts); a body refused for one of these may pass the schema.
ACROSS_FIELDS = ("requires logprobs", "must not exceed", "is a duplicate", "not in tools", "requires tools",
                 "needs json_schema.schema", "text.format.schema", "best_of must equal n", "echo with logprobs", "suffix",
                 "must be a JSON Schema of type object", "may only hold letters", "input must hold",
                 "missing required parameter: input[", "missing required parameter: tools[", "needs stored",
                 "is not served here", "must not be an empty list", "reads only text parts")


# -- the document --------------------------------------------------------------------------------------------
def gateway_app(tmp: Path, **kw):
    db = fresh_database("sqlite", tmp)
    gw = Gateway(db, {"scripted": Price.cny("1", "2")}, require_keys=True, limiter=MemoryRateLimiter())
    return create_app({"scripted": ScriptedProvider()}, gateway=gw, admin_token="admin-token", **kw), db


@pytest.fixture(scope="module")
def doc():
    app, db = gateway_app(Path(tempfile.mkdtemp()))
    yield app.openapi()
    db.dispose()


def validator(doc: dict, component: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": "#/components/schemas/" + component, "components": doc["components"]}
    jsonschema.Draft202012Validator.check_schema(root)
    return jsonschema.Draft202012Validator(root)


def test_every_route_documents_its_request_answers_and_errors(doc):
    body_of = {}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)  # never sent: bad input is a 400
            for status, answer in op["responses"].items():
                schema = answer["content"]["application/json"]["schema"]
                if status >= "400":
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)
                elif path != "/health/ready":
                    assert schema.get("$ref"), (method, path, status)
            ref = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            body_of[method, path] = ref.get("$ref", "").rsplit("/", 1)[-1] or None
    for base in ("/v1", "/api/gpt/v1"):
        assert body_of["post", base + "/chat/completions"] == "ChatCompletionRequest"
        assert body_of["post", base + "/completions"] == "CompletionRequest"
        assert body_of["post", base + "/responses"] == "CreateResponseRequest"
        assert body_of["post", base + "/redeem"] == "Redeem"
        assert body_of["get", base + "/models"] is None and ("get", base + "/key") in body_of
    assert body_of["post", "/admin/keys"] == "NewKey" and body_of["post", "/admin/codes"] == "NewCodes"
    assert body_of["post", "/admin/accounts"] == "NewAccount"
    assert body_of["post", "/admin/accounts/{name}/topup"] == "TopUp"
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) >= {"200", "400", "401", "402", "404", "413", "429"}
    event = chat["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert event["properties"]["data"]["contentSchema"]["$ref"].endswith("/ChatCompletionChunk")
    assert chat["security"] == [{"key": []}]
    assert doc["paths"]["/admin/keys"]["post"]["security"] == [{"admin": []}]


def test_descriptions_and_ranges_come_from_the_models(doc):
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    temperature = props["temperature"]["anyOf"][0]
    assert temperature == {"type": "number", "minimum": 0, "maximum": 2}
    assert props["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert props["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 8}
    assert props["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert props["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert props["stop"]["anyOf"][1]["maxItems"] == 4
    assert props["logit_bias"]["anyOf"][0]["additionalProperties"] == {"type": "number", "minimum": -100,
                                                                      "maximum": 100}
    assert ChatCompletionRequest.model_fields["top_k"].description == props["top_k"]["description"]
    assert props["messages"]["minItems"] == 1 and "messages" in props and props["model"]["type"] == "string"
    assert set(doc["components"]["schemas"]["ChatCompletionRequest"]["required"]) == {"model", "messages"}


def test_docs_pages_are_off_unless_asked_for(tmp_path):
    async def status(app, path):
        async with asgi_client(app) as http:
            return (await http.get(path)).status_code

    plain = create_app({"scripted": ScriptedProvider()})
    with_docs = create_app({"scripted": ScriptedProvider()}, ServerConfig(docs=True))
    assert asyncio.run(status(plain, "/docs")) == 404 and asyncio.run(status(plain, "/redoc")) == 404
    assert asyncio.run(status(plain, "/openapi.json")) == 200
    assert asyncio.run(status(with_docs, "/docs")) == 200
    open_doc = plain.openapi()
    assert "security" not in open_doc["paths"]["/v1/chat/completions"]["post"]  # no gateway: no key is read


# -- the seed page's example and the test suite's bodies -------------------------------------------------------
def seed_example() -> dict:
    return json.loads(SEED_EXAMPLE.read_text())


class _Unknown(Exception):
    pass


class Collector(ast.NodeVisitor):
    """Request bodies in one test module's source, by endpoint."""

    def __init__(self, module):
        self.ns = vars(module)
        self.bodies: dict[str, list[dict]] = {k: [] for k in ENDPOINTS}
        self.skipped = 0
        self.scopes: list[list[dict]] = [[{}]]  # per function: the possible values of its locals

    def value(self, node: ast.AST, local: dict):
        if not self.pure(node):
            raise _Unknown
        node = _ModelIds().visit(ast.fix_missing_locations(ast.Expression(body=_copy(node))))
        try:
            return eval(compile(node, "<test source>", "eval"), dict(self.ns), dict(local))  # noqa: S307
        except Exception:  # noqa: BLE001 - a fixture's value, a call on one: not known outside the test
            raise _Unknown from None

    def pure(self, node: ast.AST) -> bool:
        """Only expressions that compute a value are evaluated: no call but to builtins that build values and
        to the module's own one-line helpers (`ok(**kw)`), so collecting never sends a request or starts anything."""
        for n in ast.walk(node):
            if isinstance(n, ast.Await | ast.Yield | ast.YieldFrom | ast.NamedExpr):
                return False
            if isinstance(n, ast.Call):
                f = n.func
                if isinstance(f, ast.Attribute) and f.attr in SAFE_METHODS:
                    continue
                if not isinstance(f, ast.Name):
                    return False
                if f.id in SAFE_CALLS:
                    continue
                helper = self.ns.get(f.id)
                if not callable(helper) or getattr(helper, "__module__", None) != self.ns["__name__"] \
                        or not self.pure_helper(helper):
                    return False
        return True

    def pure_helper(self, fn) -> bool:
        try:
            tree = ast.parse(inspect.getsource(fn)).body[0]
        except (OSError, TypeError):
            return False
        body = [s for s in tree.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        return len(body) == 1 and isinstance(body[0], ast.Return) and self.pure(body[0].value)

    def visit_FunctionDef(self, fn):
        variants = [{}]
        for deco in fn.decorator_list:  # @pytest.mark.parametrize("name", [values])
            if isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("parametrize") and \
                    isinstance(deco.args[0], ast.Constant):
                names = [n.strip() for n in deco.args[0].value.split(",")]
                try:
                    values = [x if len(names) > 1 else (x,) for x in self.value(deco.args[1], {})]
                except _Unknown:
                    continue
                variants = [{**v, **dict(zip(names, x, strict=False))} for v in variants for x in values]
        for local in variants:
            for stmt in ast.walk(fn):
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                    try:
                        local[stmt.targets[0].id] = self.value(stmt.value, local)
                    except _Unknown:
                        pass
        self.scopes.append(variants)
        self.generic_visit(fn)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, call):
        func = ast.unparse(call.func)
        endpoint = None
        kwargs = call.keywords
        if func.endswith("chat.completions.create"):
            endpoint = "chat"
        elif func.endswith("completions.create"):
            endpoint = "completions"
        elif func.endswith("responses.create"):
            endpoint = "responses"
        elif func.split(".")[-1] in ("post", "stream") and call.args:
            url = " ".join(ast.unparse(a) for a in call.args)
            for name, suffix in (("chat", "/chat/completions"), ("responses", "/responses"),
                                 ("completions", "/completions")):
                if suffix + '"' in url or suffix + "'" in url:
                    endpoint = name
                    break
            json_kw = [k for k in kwargs if k.arg == "json"]
            if endpoint is None or not json_kw:
                endpoint = None
            else:
                kwargs = [ast.keyword(arg=None, value=json_kw[0].value)]
        if endpoint is not None:
            for local in self.scopes[-1]:
                self.add(endpoint, kwargs, local)
        self.generic_visit(call)

    def add(self, endpoint: str, keywords: list[ast.keyword], local: dict) -> None:
        body: dict = {}
        for k in keywords:
            if k.arg in SDK_ARGS:
                continue
            try:
                v = self.value(k.value, local)
            except _Unknown:
                continue
            if k.arg is None:
                body.update(v if isinstance(v, dict) else {})
            elif k.arg == "extra_body":
                body.update(v)
            else:
                body[k.arg] = v
        body = {k: v for k, v in body.items() if k not in SDK_ARGS}
        if all(k in body for k in REQUIRED[endpoint]) and not isinstance(body.get("response_format"), type):
            self.bodies[endpoint].append(body)
        else:
            self.skipped += 1

    def tables(self) -> None:
        """Module-level lists of bodies (a table of cases)."""
        for name, v in self.ns.items():
            if name.isupper() and isinstance(v, list):
                for row in v:
                    for item in row if isinstance(row, tuple) else (row,):
                        if isinstance(item, dict) and "messages" in item:
                            self.bodies["chat"].append(item)


def _copy(node):
    return ast.parse(ast.unparse(node), mode="eval").body


class _ModelIds(ast.NodeTransformer):
    """`server.model_id` and the like: a fixture's model name; any name will do for the schema."""

    def visit_Attribute(self, node):
        if node.attr == "model_id":
            return ast.copy_location(ast.Constant("tiny-thinker"), node)
        return self.generic_visit(node)


@pytest.fixture(scope="module")
def suite_bodies() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {k: [] for k in ENDPOINTS}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name.startswith("test_openapi"):
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        try:
            module = importlib.import_module(name)
        except (Exception, pytest.skip.Exception) as e:  # noqa: BLE001 - one needing what this machine lacks
            print(f"not read: {name}: {e}")
            continue
        c = Collector(module)
        c.visit(ast.parse(path.read_text()))
        c.tables()
        for k, v in c.bodies.items():
            out[k] += v
    return out


def verdict(endpoint: str, body) -> str | None:
    """None when the route's validation (the model's type checks, then its range and field checks) accepts the
    body, else the 400's message."""
    _, model, check = ENDPOINTS[endpoint]
    try:
        check(as_model(body, model))
    except InvalidRequestError as e:
        return e.message
    return None


def test_the_seed_example_is_a_valid_chat_request(doc):
    body = seed_example()
    assert body["model"] == "qwen/qwen3-235b-a22b-thinking-2507"
    validator(doc, "ChatCompletionRequest").validate(body)
    assert verdict("chat", body) is None


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_the_schema_accepts_what_the_validator_accepts_and_refuses_what_it_refuses(doc, suite_bodies, endpoint):
    v = validator(doc, ENDPOINTS[endpoint][0])
    accepted = refused = across = 0
    for body in suite_bodies[endpoint]:
        problem = verdict(endpoint, body)
        schema_errors = [e.message for e in v.iter_errors(body)]
        if problem is None:
            assert not schema_errors, (body, schema_errors)
            accepted += 1
        elif schema_errors:
            refused += 1
        else:  # only a rule that ties fields together may pass the schema
            assert any(s in problem for s in ACROSS_FIELDS), (body, problem)
            across += 1
    print(f"{endpoint}: {accepted} valid bodies accepted, {refused} invalid refused by the schema, "
          f"{across} refused only by a rule across fields")
    # What the suite sent when this was written (chat 97 / 45, completions 17 / 14, responses 16 / 17), less
    # some room: far fewer means the collection stopped finding them.
    floor = {"chat": (90, 40), "completions": (15, 12), "responses": (14, 15)}[endpoint]
    assert accepted >= floor[0] and refused >= floor[1]
