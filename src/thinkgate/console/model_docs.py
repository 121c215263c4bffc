"""What a model page shows, built from what the API itself uses: the model's card (GET /v1/models), the
request schema the API validates with (protocol.ChatCompletionRequest, whose ranges params.validate_chat
checks), and code samples filled with this server's base URL and the model's id.

Every sample reads the key from the THINKGATE_API_KEY environment variable, so a copied sample runs as it is
and no key is ever written into a page."""

from __future__ import annotations

import json
from decimal import Decimal
from functools import cache

from thinkgate.protocol import ChatCompletionRequest

SAMPLE_LANGS = (("curl", "curl"), ("python", "Python (OpenAI SDK)"), ("requests", "Python (requests)"),
                ("javascript", "JavaScript"), ("go", "Go"))
# Rows of the parameter table beyond the card's supported_parameters: always accepted by the API.
ALWAYS = ("model", "messages", "stream", "stream_options")


def capabilities(card: dict) -> list[str]:
    """Text keys (console/i18n.py) of what the model can do, from its supported parameters."""
    params = set(card.get("supported_parameters") or [])
    caps = ["cap_text"]
    if "reasoning" in params or "include_reasoning" in params:
        caps.append("cap_reasoning")
    if "tools" in params:
        caps.append("cap_tools")
    if "response_format" in params:
        caps.append("cap_json")
    if card.get("vision") or "image" in (card.get("architecture") or {}).get("input_modalities", []):
        caps.append("cap_vision")
    return caps


def prices(card: dict) -> dict[str, str | None]:
    p = card.get("pricing") or {}
    return {"input": p.get("prompt"), "output": p.get("completion"), "cached": p.get("input_cache_read")}


# -- the parameter table ---------------------------------------------------------------------------
def _unwrap(schema: dict) -> list[dict]:
    """The non-null branches of a property's schema."""
    branches = schema.get("anyOf", [schema])
    return [b for b in branches if b.get("type") != "null"] or [schema]


def _type_of(branches: list[dict], defs: dict) -> str:
    names = []
    for b in branches:
        if "$ref" in b:
            names.append("object")
        elif "enum" in b:
            names.append(" | ".join(json.dumps(v) for v in b["enum"]))
        elif b.get("type") == "array":
            names.append("array")
        elif "type" in b:
            names.append(b["type"])
        elif "const" in b:
            names.append(json.dumps(b["const"]))
    return " | ".join(dict.fromkeys(names)) or "any"


def _num(v) -> str:
    return format(Decimal(str(v)).normalize(), "f")


def _range_of(branches: list[dict]) -> str:
    parts = []
    for b in branches:
        lo, hi = b.get("minimum"), b.get("maximum")
        if "exclusiveMinimum" in b:
            parts.append(f"({_num(b['exclusiveMinimum'])}, {_num(hi) if hi is not None else '∞'}]")
        elif lo is not None or hi is not None:
            parts.append(f"[{_num(lo) if lo is not None else '-∞'}, {_num(hi) if hi is not None else '∞'}]")
        if b.get("type") == "array" and "maxItems" in b:
            parts.append(f"≤ {b['maxItems']} items")
        if b.get("type") == "object" and isinstance(b.get("additionalProperties"), dict):
            inner = _range_of([b["additionalProperties"]])
            if inner:
                parts.append(f"values {inner}")
    return "; ".join(parts)


@cache
def _schema() -> dict:
    return ChatCompletionRequest.model_json_schema()


def parameter_rows(supported: list[str] | None) -> list[dict]:
    """One row per parameter the model accepts (its card's supported_parameters, plus the ones every request
    carries), in the schema's order, with nested objects (reasoning.max_tokens, ...) as their own rows."""
    schema = _schema()
    defs = schema.get("$defs", {})
    wanted = set(ALWAYS) | set(supported if supported is not None else schema["properties"])
    required = set(schema.get("required", []))
    rows: list[dict] = []
    for name, prop in schema["properties"].items():
        if name not in wanted:
            continue
        branches = _unwrap(prop)
        rows.append({"name": name, "type": _type_of(branches, defs), "range": _range_of(branches),
                     "required": name in required, "description": prop.get("description", "")})
        for b in branches:
            ref = b.get("$ref", "").rsplit("/", 1)[-1]
            if ref in ("Reasoning", "StreamOptions", "ResponseFormat"):
                for sub, sp in defs[ref].get("properties", {}).items():
                    sb = _unwrap(sp)
                    rows.append({"name": f"{name}.{sub}", "type": _type_of(sb, defs), "range": _range_of(sb),
                                 "required": sub in set(defs[ref].get("required", [])),
                                 "description": sp.get("description", "")})
    # What every request carries first, then the rest in the schema's order.
    return sorted(rows, key=lambda r: r["name"].split(".")[0] not in ALWAYS)


# -- code samples ----------------------------------------------------------------------------------
def samples(base_url: str, model: str) -> dict[str, str]:
    """Request samples for `model` at `base_url` (such as http://host:8000/api/gpt/v1)."""
    url = base_url + "/chat/completions"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "你好"}]}, ensure_ascii=False,
                      indent=2)
    m, b = json.dumps(model), json.dumps(base_url)
    return {
        "curl": (f"curl {url} \\\n  -H 'Content-Type: application/json' \\\n"
                 f"  -H \"Authorization: Bearer $THINKGATE_API_KEY\" \\\n  -d '{body}'\n"),
        "python": f'''import os

from openai import OpenAI

client = OpenAI(base_url={b}, api_key=os.environ["THINKGATE_API_KEY"])
completion = client.chat.completions.create(
    model={m},
    messages=[{{"role": "user", "content": "你好"}}],
)
message = completion.choices[0].message
print("reasoning:", getattr(message, "reasoning", None))
print("answer:", message.content)
print("usage:", completion.usage)
''',
        "requests": f'''import os

import requests

response = requests.post(
    {json.dumps(url)},
    headers={{"Authorization": "Bearer " + os.environ["THINKGATE_API_KEY"]}},
    json={{"model": {m}, "messages": [{{"role": "user", "content": "你好"}}]}},
    timeout=600,
)
response.raise_for_status()
print(response.json()["choices"][0]["message"])
''',
        "javascript": f'''// Node.js 18+ or a browser
const response = await fetch({json.dumps(url)}, {{
  method: "POST",
  headers: {{
    "Content-Type": "application/json",
    Authorization: `Bearer ${{process.env.THINKGATE_API_KEY}}`,
  }},
  body: JSON.stringify({{ model: {m}, messages: [{{ role: "user", content: "你好" }}] }}),
}});
const data = await response.json();
console.log(data.choices[0].message);
''',
        "go": f'''package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {{
	body, _ := json.Marshal(map[string]any{{
		"model":    {m},
		"messages": []map[string]string{{{{"role": "user", "content": "你好"}}}},
	}})
	req, _ := http.NewRequest("POST", {json.dumps(url)}, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+os.Getenv("THINKGATE_API_KEY"))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {{
		panic(err)
	}}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	fmt.Println(string(out))
}}
''',
    }


def response_example(model: str, card: dict) -> str:
    """A chat.completion as this server answers it (reasoning apart from the content, usage with its cost in
    CNY at the model's prices)."""
    p = prices(card)
    prompt, completion, reasoning = 10, 120, 96
    cost = (Decimal(p["input"] or 0) * prompt + Decimal(p["output"] or 0) * completion) / 1000
    example = {
        "id": "chatcmpl-3f2a9c0e5b7d4e61a8c2b1f0d9e8a7c6", "object": "chat.completion", "created": 1767225600,
        "model": model,
        "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "你好!有什么可以帮你的吗?",
            "reasoning": "用户用中文打招呼,我应该用中文友好地回应……",
            "reasoning_content": "用户用中文打招呼,我应该用中文友好地回应……"},
            "finish_reason": "stop", "native_finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "completion_tokens_details": {"reasoning_tokens": reasoning},
                  "prompt_tokens_details": {"cached_tokens": 0}, "cost": float(cost)},
    }
    return json.dumps(example, ensure_ascii=False, indent=2)
