"""The model catalog (spec section 6): one TOML file, read once at start by `thinkgate serve --config FILE`.

Rules (README, "The model catalog"):
- Numbers are read with `parse_float=Decimal`, so a price is the exact decimal written in the file; a float never
  holds a price (one handed in from elsewhere is refused).
- Unknown keys are refused, with their place: a misspelt `price_output_per_1K` must not leave a model free.
- A model has `[models.backend]` (one table) or `[[models.backends]]` (a list, tried in order), not both. Backend
  types: "local" (our engine; at most one per model) and "openai" (an OpenAI-compatible upstream: parsed and
  checked now; the provider that calls it comes with the upstreams issue, so until then a model whose only
  backends are upstreams is skipped at start with a log line and is not listed in /v1/models).
- Prices are CNY per 1000 tokens: input and output together (0 is a price, and explicit), cached input optional.
  A keyed server refuses to start while any entry lacks a price, naming it; an open one serves it as free.
- Ids are unique. Every error names the file, the entry (index and id) and the key.
- `request_timeout_s` on a model overrides the server's --request-timeout for its requests (longer or shorter):
  past it a request ends with an error chunk or a 504, billed for what it generated (api/admission.py).
- The optional `[server]` table sets `thinkgate serve` options (thinkgate/serve_settings.py checks its keys).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from thinkgate.gateway.money import Price, to_cny

log = logging.getLogger(__name__)
# The seed page's prices (CNY per 1000 tokens), used when the catalog lists its model without any.
DEFAULT_PRICES = {"qwen/qwen3-235b-a22b-thinking-2507": Price.cny("0.00275", "0.0095")}
PRICE_KEYS = ("price_input_per_1k", "price_output_per_1k", "price_cached_input_per_1k")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CatalogError(ValueError):
    """A catalog that cannot be served; the message names the file, the entry and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalBackend(_Strict):
    """Our own engine. Keys left out take the `serve` command line's values (its defaults unless given)."""

    type: Literal["local"]
    model: str = Field(min_length=1)  # a directory, a .gguf file, a hub id or the default model's alias
    dtype: Literal["auto", "bfloat16", "float32"] | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    max_model_len: Annotated[StrictInt, Field(gt=0)] | None = None
    kv_cache_memory: Annotated[StrictInt, Field(gt=0)] | None = None  # bytes for the KV cache pool
    max_num_seqs: Annotated[StrictInt, Field(gt=0)] | None = None
    weight_quant: Literal["auto", "none", "int8", "int4", "w8a8", "mixed", "gguf", "gguf-q8"] | None = None

    def engine_config(self, base, catalog_dir: Path | None = None):
        """`base` (an EngineConfig from the command line) with this backend's keys. A relative `model` path is
        read from the catalog's folder when it exists there (else it is a hub id or an alias)."""
        model = self.model
        if catalog_dir is not None and not Path(model).expanduser().is_absolute():
            candidate = catalog_dir / model
            if candidate.exists():
                model = str(candidate)
        keys = ("dtype", "device", "max_model_len", "kv_cache_memory", "max_num_seqs", "weight_quant")
        given = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        return dataclasses.replace(base, model=model, **given)


class OpenAIBackend(_Strict):
    """An OpenAI-compatible upstream (a vLLM or SGLang cluster, a vendor's API)."""

    type: Literal["openai"]
    base_url: str  # ends before /chat/completions, e.g. http://vllm.internal:8000/v1
    api_key_env: str | None = None  # the name of the environment variable holding its key
    remote_model: str | None = Field(default=None, min_length=1)  # what the upstream calls it (default: the id)
    timeout_s: float = Field(default=600, gt=0)  # the longest wait between two reads of its stream
    first_byte_timeout_s: float = Field(default=60, gt=0)  # before it, a slow backend is failed over
    name: str | None = Field(default=None, min_length=1)  # for provider.order (default: the URL's host:port)
    # The backend sends reasoning as <think>...</think> inside `content` (MiniMax M2 style, or a vLLM started
    # without a reasoning parser): split it with our own parser.
    think_in_content: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_secret_in_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("api_key: a key is never written in the catalog: put it in an environment variable "
                             "and give that variable's name as api_key_env")
        return data

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.fullmatch(v):
            raise ValueError(f"{v!r} is not an environment variable name")
        return v


Backend = Annotated[LocalBackend | OpenAIBackend, Field(discriminator="type")]
BACKEND_TYPES = ("local", "openai")


class ModelEntry(_Strict):
    id: str  # what clients send as "model"
    name: str | None = None  # default: the id
    description: str = ""
    context_length: Annotated[StrictInt, Field(gt=0)] | None = None
    price_input_per_1k: Decimal | None = None  # CNY per 1000 prompt tokens
    price_output_per_1k: Decimal | None = None  # CNY per 1000 completion tokens (reasoning included)
    price_cached_input_per_1k: Decimal | None = None  # default: the input price
    backend: Backend | None = None  # `[models.backend]`: one table
    backends: list[Backend] | None = None  # `[[models.backends]]`: tried in order
    # Image parts (OpenAI's `image_url`) pass through to its upstreams; a text-only model refuses them (400).
    vision: bool = False
    # Seconds a request to this model may run (instead of the server's --request-timeout).
    request_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError(f"{v!r} is not a model id: not empty, no whitespace")
        return v

    @field_validator("request_timeout_s", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float | Decimal | None):
            raise ValueError("a number of seconds, e.g. 120")
        return float(v) if isinstance(v, Decimal) else v

    @field_validator(*PRICE_KEYS, mode="before")
    @classmethod
    def _exact(cls, v: Any) -> Any:
        if isinstance(v, float):
            raise ValueError("a price is never a float: write it in the TOML file (read as an exact decimal) "
                             "or as a string")
        if isinstance(v, bool) or not isinstance(v, int | str | Decimal | None):
            raise ValueError("a price is a number of CNY per 1000 tokens, e.g. 0.00275")
        return v

    @field_validator(*PRICE_KEYS)
    @classmethod
    def _whole_units(cls, v: Decimal | None) -> Decimal | None:
        if v is not None:
            if v < 0:
                raise ValueError("a price is never negative")
            if v.normalize().as_tuple().exponent < -8:  # refused, never rounded
                raise ValueError(f"{v:f} has more than 8 decimal places (the smallest amount is 0.00000001 CNY)")
        return v

    @model_validator(mode="after")
    def _one_backend_form(self) -> ModelEntry:
        if self.backend is not None and self.backends is not None:
            raise ValueError("give either [models.backend] (one table) or [[models.backends]] (a list), not both")
        backends = self.backends if self.backends is not None else [self.backend] if self.backend else []
        if not backends:
            raise ValueError("no backend: add a [models.backend] table or [[models.backends]] tables")
        if sum(b.type == "local" for b in backends) > 1:
            raise ValueError("at most one local backend per model (each local backend is an engine of its own)")
        if self.vision and any(b.type == "local" for b in backends):
            raise ValueError("vision: our engine reads text only; a vision model is served by openai backends")
        self.backends, self.backend = backends, None
        given = [k for k in PRICE_KEYS if getattr(self, k) is not None]
        if given and (self.price_input_per_1k is None or self.price_output_per_1k is None):
            missing = " and ".join(k for k in PRICE_KEYS[:2] if getattr(self, k) is None)
            raise ValueError(f"{', '.join(given)} given without {missing}: a price has an input and an output "
                             "part (0 is a price)")
        return self

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def price(self) -> Price | None:
        """None when the entry has no price (refused by a keyed server)."""
        if self.price_input_per_1k is None:
            return None
        return Price.cny(self.price_input_per_1k, self.price_output_per_1k, self.price_cached_input_per_1k)

    @property
    def local_backend(self) -> LocalBackend | None:
        return next((b for b in self.backends if isinstance(b, LocalBackend)), None)


class Catalog(_Strict):
    models: list[ModelEntry] = Field(min_length=1)
    server: dict[str, Any] = Field(default_factory=dict)  # `thinkgate serve` options (serve_settings.py)
    _source: str = PrivateAttr("<catalog>")  # the file, for messages
    _directory: Path | None = PrivateAttr(None)  # relative local model paths are read from here

    @property
    def source(self) -> str:
        return self._source

    @property
    def directory(self) -> Path | None:
        return self._directory

    @model_validator(mode="after")
    def _unique_ids(self) -> Catalog:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.id in seen:
                raise ValueError(f"models[{i}]: id {m.id!r} is already used by models[{seen[m.id]}]; ids are unique")
            seen[m.id] = i
        return self

    def where(self, entry: ModelEntry) -> str:
        return f"catalog {self.source}: models[{self.models.index(entry)}] (id {entry.id!r})"

    def prices(self, require_keys: bool) -> dict[str, Price]:
        """Every entry's price. A keyed server refuses an entry without one (never a silent default price);
        an open server serves it as free."""
        out = {}
        for m in self.models:
            price = price_of(m)
            if price is None:
                if require_keys:
                    raise CatalogError(
                        f"{self.where(m)} has no price, and a keyed server charges for every model: set "
                        "price_input_per_1k and price_output_per_1k (CNY per 1000 tokens; 0 is a price), or "
                        "serve with --no-auth")
                price = Price()
            out[m.id] = price
        return out

    def servable(self) -> list[ModelEntry]:
        """The entries this server serves: each on its local engine, or on its upstreams in order."""
        for m in self.models:
            if m.local_backend is not None and len(m.backends) > 1:
                log.warning("%s: serving its local backend only (a local model has no upstream fallbacks)",
                            self.where(m))
        return list(self.models)


def parse_catalog(data: dict, source: str = "<catalog>", directory: Path | None = None) -> Catalog:
    """Validate parsed TOML (a dict); CatalogError lists every problem with its place."""
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as e:
        models = data.get("models") if isinstance(data, dict) else None
        lines = [_describe(err, models) for err in e.errors()]
        raise CatalogError(f"catalog {source}: " + ("\n  " if len(lines) > 1 else "") + "\n  ".join(lines)) from None
    catalog._source, catalog._directory = source, directory
    return catalog


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f, parse_float=Decimal)
    except OSError as e:
        raise CatalogError(f"catalog {path}: cannot read it: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"catalog {path}: not valid TOML: {e}") from None
    return parse_catalog(data, str(path), path.resolve().parent)


def _describe(err: dict, models: Any) -> str:
    loc = list(err["loc"])
    where: list[str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        if part == "models" and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            idx = loc[i + 1]
            entry = models[idx] if isinstance(models, list) and idx < len(models) else None
            mid = entry.get("id") if isinstance(entry, dict) else None
            where.append(f"models[{idx}]" + (f" (id {mid!r})" if isinstance(mid, str) else ""))
            i += 2
            continue
        if isinstance(part, int):
            where[-1:] = [f"{where[-1] if where else ''}[{part}]"]
        elif part in BACKEND_TYPES and where and where[-1].startswith("backend"):
            pass  # the union's tag, not a key of the file
        else:
            where.append(str(part))
        i += 1
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (refused, so that a misspelt key is never silently ignored)"
    elif err["type"] == "union_tag_invalid":
        msg = f"unknown backend type {err['input'].get('type')!r}: one of {', '.join(BACKEND_TYPES)}"
    elif err["type"] == "union_tag_not_found":
        msg = f"a backend needs a type: one of {', '.join(BACKEND_TYPES)}"
    elif err["type"] == "missing":
        msg = "required key missing"
    elif loc == ["models"] and err["type"] == "too_short":
        msg = "the catalog lists no models"
    elif loc == ["models"] and err["type"] == "list_type":
        msg = "write each model as a [[models]] table"
    head = ": ".join(p for p in (where[0] if where else "", ".".join(where[1:])) if p)
    return f"{head}: {msg}" if head else msg


def price_of(m: ModelEntry) -> Price | None:
    """The entry's own price, else the seed page's for the model it sells (else None: unpriced)."""
    return m.price if m.price is not None else DEFAULT_PRICES.get(m.id)


def pricing_card(price: Price | None) -> dict:
    """The `pricing` of a /v1/models card: CNY per 1000 tokens as decimal strings."""
    price = price or Price()
    out = {"prompt": _decimal_str(price.input_per_1k), "completion": _decimal_str(price.output_per_1k)}
    if price.cached_input_per_1k is not None:
        out["input_cache_read"] = _decimal_str(price.cached_input_per_1k)
    return {**out, "currency": "CNY", "unit": "1K tokens"}


def _decimal_str(units: int) -> str:
    return format(to_cny(units), "f")


def local_providers(catalog: Catalog, base_engine_config) -> dict:
    """One engine and one LocalProvider per servable entry, in catalog order, with the entry's card fields and
    its request timeout (`request_timeout_s`, read by admission control; None: the server's)."""
    entries = catalog.servable()
    if not entries:
        raise CatalogError(f"catalog {catalog.source}: lists no model")
    local = [m for m in entries if m.local_backend is not None]
    if local:  # only then: a gateway of upstream models alone never imports torch (start-up, memory)
        from thinkgate.engine.async_engine import AsyncEngine
        from thinkgate.engine.llm_engine import LLMEngine
        from thinkgate.gateway.providers.local import LocalProvider

        check_memory(catalog, local, base_engine_config)
    providers = {}
    for m in entries:
        if m.local_backend is None:
            providers[m.id] = upstream_provider(m)
            continue
        ecfg = m.local_backend.engine_config(base_engine_config, catalog.directory)
        try:
            engine = AsyncEngine.build(lambda ecfg=ecfg: LLMEngine.from_config(ecfg))
        except Exception as e:
            for p in providers.values():
                if getattr(p, "engine", None) is not None:
                    p.engine.shutdown()
            raise CatalogError(f"{catalog.where(m)}: cannot load its local model {ecfg.model!r}: {e}") from e
        providers[m.id] = LocalProvider(engine, m.id, m.description, name=m.display_name,
                                        context_length=m.context_length, pricing=pricing_card(price_of(m)))
    for m in entries:
        providers[m.id].request_timeout_s = m.request_timeout_s
    return providers


def check_memory(catalog: Catalog, local: list[ModelEntry], base_engine_config) -> None:
    """Refuse, before anything loads, local models that do not fit together, naming what each needs."""
    from thinkgate.models.footprint import DoesNotFit, check_fit

    entries = [(f"models[{catalog.models.index(m)}] (id {m.id!r})",
                m.local_backend.engine_config(base_engine_config, catalog.directory)) for m in local]
    try:
        for need in check_fit(entries):
            log.info("memory: %s", need.describe())
    except DoesNotFit as e:
        raise CatalogError(f"catalog {catalog.source}: {e}") from None


def upstream_provider(m: ModelEntry):
    """An UpstreamProvider for an entry whose backends are OpenAI-compatible upstreams, tried in order."""
    from thinkgate.gateway.providers.upstream import UpstreamBackend, UpstreamProvider

    backends = []
    for k, b in enumerate(m.backends):
        key = os.environ.get(b.api_key_env) if b.api_key_env else None
        if b.api_key_env and not key:
            log.warning("%s: backend %d: $%s is not set: calling it without a key", m.id, k, b.api_key_env)
        name = b.name or urlsplit(b.base_url).netloc or f"backend{k}"
        backends.append(UpstreamBackend(name=name, base_url=b.base_url, remote_model=b.remote_model or m.id,
                                        api_key=key, timeout_s=b.timeout_s,
                                        first_byte_timeout_s=b.first_byte_timeout_s,
                                        think_in_content=b.think_in_content))
    card = {"name": m.display_name, "description": m.description, "pricing": pricing_card(price_of(m))}
    return UpstreamProvider(m.id, backends, card=card, context_length=m.context_length or 32768, vision=m.vision)
