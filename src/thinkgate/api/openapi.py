"""/openapi.json from the same pydantic models that validate each request.

The routes read their bodies themselves (api/requests.py: the size limit before parsing, the content-type
check, errors in the OpenAI shape), so FastAPI sees no body parameter and would document none. Each route
therefore names its models with `documented(...)`: its `openapi_extra` refers to them by name, and the app's
`openapi()` (installed by `install_openapi`) adds their JSON schemas, made by pydantic from the models in one
pass, as components; descriptions and ranges come from the models' fields. FastAPI's own 422 answers are
dropped from the document: this API never sends them (a bad parameter is a 400 in the OpenAI error shape).

`/docs` and `/redoc` load their scripts from a CDN, so they are off unless `ServerConfig.docs` turns them on;
/openapi.json itself is always served.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from thinkgate.protocol_responses import ErrorResponse

REF = "#/components/schemas/"
ERRORS = {
    400: "invalid or missing parameter, malformed JSON, wrong content type, prompt longer than the context",
    401: "missing, unknown, revoked or expired key",
    402: "the balance or the key's limit cannot cover the request",
    403: "the key may not use this model (or this endpoint)",
    404: "unknown model, route or object",
    409: "the name is taken",
    413: "the body is larger than the server's limit",
    429: "rate limit or a full queue; see Retry-After",
    502: "an upstream provider failed",
    503: "the model cannot be served now, or the server is draining",
    504: "the request ran past its timeout (an upstream, or the per-request limit)",
}
GENERATES = (400, 401, 402, 403, 404, 413, 429, 502, 503, 504)  # chat, responses, completions
READS = (401, 403, 404)  # the caller's own GETs (models, key, generation)
ADMIN = (400, 401, 404)
STREAMED = "with `stream: true`: each event's data is a {} (chat and text completions end with `data: [DONE]`)"

# Every model a route names, by the component name it is referred to with (one class per name).
_REQUESTS: dict[str, type[BaseModel]] = {}
_RESPONSES: dict[str, type[BaseModel]] = {}


def _ref(model: type[BaseModel], table: dict[str, type[BaseModel]]) -> dict:
    known = table.setdefault(model.__name__, model)
    if known is not model:
        raise TypeError(f"two models are named {model.__name__}: {known.__module__} and {model.__module__}")
    return {"$ref": REF + model.__name__}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def documented(request: type[BaseModel] | None = None, response: type[BaseModel] | None = None, *,
               errors: tuple[int, ...] = (), status: int = 200, stream: type[BaseModel] | None = None,
               auth: str | None = "key", parameters: list[dict] | None = None) -> dict:
    """The keywords for `add_api_route` (or a route decorator) that document a route: its JSON request body
    (`request`, the model the route validates with), its answer (`response`, also as an event stream of
    `stream` objects when the request asks for one), its error statuses, who may call it (`auth`: "key",
    "admin" or None), and `parameters` the route reads itself (hidden from FastAPI with include_in_schema=False,
    e.g. a query parameter that is required but checked after the caller is authenticated)."""
    extra: dict = {"parameters": parameters} if parameters else {}
    if request is not None:
        extra["requestBody"] = {"required": True, **_json(_ref(request, _REQUESTS))}
    responses: dict = {}
    if response is not None:
        ok = _json(_ref(response, _RESPONSES))
        if stream is not None:  # OpenAPI 3.1: the schema of an event stream describes one event
            data = {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref(stream, _RESPONSES),
                    "description": STREAMED.format(stream.__name__)}
            ok["content"]["text/event-stream"] = {"schema": {
                "type": "object", "required": ["data"],
                "properties": {"data": data, "event": {"type": "string", "description": "the event's type (Responses)"}}}}
        about = (response.__doc__ or "").split("\n\n")[0].replace("\n", " ") or response.__name__
        responses[str(status)] = {"description": about, **ok}
    for code in errors:
        responses[str(code)] = {"description": ERRORS[code], **_json(_ref(ErrorResponse, _RESPONSES))}
    extra["responses"] = responses
    if auth is not None:
        extra["security"] = [{auth: []}]
    return {"openapi_extra": extra}


def install_openapi(app: FastAPI, keys: str = "required") -> None:
    """Serve the document with the named models' schemas as components. `keys`: "required" (a gateway that
    requires keys), "optional" (an open gateway) or "none" (no gateway: no key is read)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = finish(build(), keys)
        return app.openapi_schema

    app.openapi = openapi


def finish(doc: dict, keys: str) -> dict:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path in doc.get("paths", {}).values():
        for op in path.values():
            answers = op.get("responses", {})
            answers.pop("422", None)
            for status, answer in list(answers.items()):
                if status.startswith("2") and answer.get("content", {}).get("application/json", {}).get("schema") == {}:
                    # FastAPI's default for a route that names no answer: a route that only errs has none.
                    if len(answers) > 1:
                        del answers[status]
                    else:
                        answer["content"]["application/json"]["schema"] = {"type": "object"}
            sec = op.get("security")
            if sec == [{"key": []}] and keys != "required":
                if keys == "none":
                    op.pop("security")
                else:
                    op["security"] = [{"key": []}, {}]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for table, mode in ((_REQUESTS, "validation"), (_RESPONSES, "serialization")):
        names, defs = models_json_schema([(m, mode) for m in table.values()], ref_template=REF + "{model}")
        for (model, _), ref in names.items():
            if ref["$ref"] != REF + model.__name__:  # another class of the same name, nested somewhere
                raise TypeError(f"{model.__name__} is documented as {ref['$ref']}: rename one of the models")
        for name, schema in defs.get("$defs", {}).items():
            if schemas.setdefault(name, schema) != schema:
                raise TypeError(f"two models are named {name} (a request's and a response's)")
    doc["components"]["securitySchemes"] = {
        "key": {"type": "http", "scheme": "bearer", "description": "an API key (sk-tg-...)"},
        "admin": {"type": "http", "scheme": "bearer", "description": "the admin token"}}
    return _prune(doc)


def _prune(doc: dict) -> dict:
    """Keep the components the paths refer to (directly or through other components)."""
    schemas = doc["components"]["schemas"]
    keep: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF) and ref[len(REF):] not in keep:
                keep.add(ref[len(REF):])
                walk(schemas.get(ref[len(REF):]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc["paths"])
    doc["components"]["schemas"] = {k: v for k, v in sorted(schemas.items()) if k in keep}
    return doc
