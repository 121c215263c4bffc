"""The model catalog (spec section 6): parsing both backend forms, exact prices, an error that names its place for
every mistake, the example catalog, and real `thinkgate serve --config` processes called with the openai client."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ServerProcess, free_port
from thinkgate.catalog import (
    CatalogError,
    LocalBackend,
    OpenAIBackend,
    load_catalog,
    parse_catalog,
    pricing_card,
)
from thinkgate.config import EngineConfig
from thinkgate.gateway.money import Price

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "catalog.toml"
FLAGSHIP = "qwen/qwen3-235b-a22b-thinking-2507"
SPEC_EXAMPLE = '''
[[models]]
id = "qwen/qwen3-235b-a22b-thinking-2507"     # what clients send as "model"
name = "Qwen3 235B A22B Thinking 2507"
description = "..."
context_length = 131072
price_input_per_1k = 0.00275                  # CNY per 1000 prompt tokens
price_output_per_1k = 0.0095                  # CNY per 1000 completion tokens (reasoning included)
price_cached_input_per_1k = 0.0011            # optional
[[models.backends]]                           # tried in order; `[models.backend]` (one table) is also accepted
type = "openai"                               # an OpenAI-compatible upstream, e.g. a vLLM or SGLang cluster
base_url = "http://vllm.internal:8000/v1"
api_key_env = "VLLM_API_KEY"                  # name of the env var holding its key (optional)
remote_model = "Qwen/Qwen3-235B-A22B-Thinking-2507"
timeout_s = 600

[[models]]
id = "qwen/qwen2.5-coder-0.5b-instruct"
name = "Qwen2.5 Coder 0.5B Instruct"
context_length = 32768
price_input_per_1k = 0.0005
price_output_per_1k = 0.001
[models.backend]
type = "local"                                # our engine
model = "path/to/dir, file.gguf, or a hub id"
dtype = "auto"                                # auto | bfloat16 | float32
'''


def parse(text: str, source: str = "cat.toml"):
    return parse_catalog(tomllib.loads(text, parse_float=Decimal), source)


def local(model_id: str = "m", extra: str = "", backend: str = 'type = "local"\nmodel = "x"') -> str:
    return f'[[models]]\nid = "{model_id}"\n{extra}\n[models.backend]\n{backend}\n'


# -- parsing -------------------------------------------------------------------------------------------------

def test_the_spec_example_works_as_written():
    cat = parse(SPEC_EXAMPLE)
    flagship, coder = cat.models
    assert flagship.id == FLAGSHIP and flagship.display_name == "Qwen3 235B A22B Thinking 2507"
    assert flagship.price_input_per_1k == Decimal("0.00275") and flagship.price_output_per_1k == Decimal("0.0095")
    assert flagship.price == Price.cny("0.00275", "0.0095", "0.0011")
    assert flagship.price.input_per_1k == 275_000 and flagship.price.cached_input_per_1k == 110_000  # 1e-8 CNY
    [up] = flagship.backends  # the list form
    assert isinstance(up, OpenAIBackend)
    assert (up.base_url, up.api_key_env, up.remote_model, up.timeout_s) == (
        "http://vllm.internal:8000/v1", "VLLM_API_KEY", "Qwen/Qwen3-235B-A22B-Thinking-2507", 600)
    assert flagship.local_backend is None
    [lb] = coder.backends  # the one-table form, normalised to a list of one
    assert isinstance(lb, LocalBackend) and coder.local_backend is lb and coder.backend is None
    assert coder.price == Price.cny("0.0005", "0.001") and coder.price.cached_input_per_1k is None
    assert coder.description == "" and coder.context_length == 32768
    assert cat.servable() == cat.models  # local entries on their engine, the others on their upstreams


def test_prices_are_exact_decimals_also_past_float_precision():
    cat = parse(local(extra="price_input_per_1k = 0.00000001\nprice_output_per_1k = 1234567.12345678\n"
                            'price_cached_input_per_1k = "0.1"'))
    m = cat.models[0]
    assert m.price_output_per_1k == Decimal("1234567.12345678")  # a float would be 1234567.1234567799
    assert m.price == Price(1, 123456712345678, 10_000_000)
    assert parse(local(extra="price_input_per_1k = 0\nprice_output_per_1k = 0")).models[0].price.is_free


def test_a_float_price_handed_in_is_refused():
    data = tomllib.loads(local(extra="price_input_per_1k = 0.1\nprice_output_per_1k = 0.2"))  # floats
    with pytest.raises(CatalogError, match=r"models\[0\] \(id 'm'\): price_input_per_1k: a price is never a float"):
        parse_catalog(data, "cat.toml")


def test_local_backend_keys_map_to_the_engine_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    cat = parse(local(backend='type = "local"\nmodel = "ckpt"\ndtype = "float32"\ndevice = "cpu"\n'
                              "max_model_len = 2048\nkv_cache_memory = 1048576\nmax_num_seqs = 4\n"
                              'weight_quant = "int8"'))
    base = EngineConfig(max_num_batched_tokens=512, kv_cache_memory=7)
    cfg = cat.models[0].local_backend.engine_config(base, tmp_path)
    assert cfg == EngineConfig(model=str(tmp_path / "ckpt"), dtype="float32", device="cpu", max_model_len=2048,
                               kv_cache_memory=1048576, max_num_seqs=4, weight_quant="int8",
                               max_num_batched_tokens=512)  # what the catalog leaves out: the command line's
    # Not a path next to the catalog: a hub id or an alias, as written.
    hub = parse(local(backend='type = "local"\nmodel = "Qwen/Qwen3-0.6B"')).models[0].local_backend
    assert hub.engine_config(base, tmp_path) == EngineConfig(model="Qwen/Qwen3-0.6B", max_num_batched_tokens=512,
                                                             kv_cache_memory=7)


def test_pricing_card_is_cny_per_1000_tokens_as_decimal_strings():
    assert pricing_card(Price.cny("0.00275", "0.0095")) == {
        "prompt": "0.00275", "completion": "0.0095", "currency": "CNY", "unit": "1K tokens"}
    card = pricing_card(Price.cny("10", "20.5", "0.00000001"))
    assert (card["prompt"], card["completion"], card["input_cache_read"]) == ("10", "20.5", "0.00000001")
    assert pricing_card(None)["prompt"] == "0"


def test_keyed_server_refuses_an_entry_without_price_and_an_open_one_serves_it_free():
    cat = parse(local("priced", "price_input_per_1k = 1\nprice_output_per_1k = 2") + local("unpriced"))
    with pytest.raises(CatalogError) as e:
        cat.prices(require_keys=True)
    assert "catalog cat.toml: models[1] (id 'unpriced') has no price" in str(e.value)
    assert cat.prices(require_keys=False) == {"priced": Price.cny("1", "2"), "unpriced": Price()}


SEED_PRICES = '\nprice_input_per_1k = 1\nprice_output_per_1k = 1'


@pytest.mark.parametrize("text, place", [
    # unknown keys, anywhere
    ('extra = 1\n' + local(), "cat.toml: extra: unknown key"),
    (local(extra="price_output_per_1K = 1" + SEED_PRICES), "models[0] (id 'm'): price_output_per_1K: unknown key"),
    (local(backend='type = "local"\nmodel = "x"\nmax_batch = 4'), "models[0] (id 'm'): backend.max_batch: unknown key"),
    # backends
    (local(backend='model = "x"'), "models[0] (id 'm'): backend: a backend needs a type"),
    (local(backend='type = "grpc"'), "models[0] (id 'm'): backend: unknown backend type 'grpc'"),
    (local(backend='type = "local"'), "models[0] (id 'm'): backend.model: required key missing"),
    (local(backend='type = "local"\nmodel = "x"\ndtype = "fp16"'), "models[0] (id 'm'): backend.dtype: Input should"),
    (local(backend='type = "local"\nmodel = "x"\nmax_num_seqs = 0'), "models[0] (id 'm'): backend.max_num_seqs:"),
    (local(backend='type = "local"\nmodel = "x"\nkv_cache_memory = 1.5'), "(id 'm'): backend.kv_cache_memory:"),
    ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "local"\nmodel = "x"\n[[models.backends]]\n'
     'type = "openai"\nbase_url = "ftp://host"', "models[0] (id 'a'): backends[1].base_url: 'ftp://host' is not"),
    ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "openai"', "(id 'a'): backends[0].base_url: required key"),
    ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "openai"\nbase_url = "http://h/v1"\ntimeout_s = -1',
     "models[0] (id 'a'): backends[0].timeout_s:"),
    ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "openai"\nbase_url = "http://h/v1"\napi_key_env = "A-B"',
     "models[0] (id 'a'): backends[0].api_key_env: 'A-B' is not an environment variable name"),
    ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "openai"\nbase_url = "http://h/v1"\napi_key = "sk-x"',
     "models[0] (id 'a'): backends[0]: api_key: a key is never written in the catalog"),
    ('[[models]]\nid = "a"', "models[0] (id 'a'): no backend"),
    (local() + '[[models.backends]]\ntype = "local"\nmodel = "y"', "models[0] (id 'm'): give either"),
    ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "local"\nmodel = "x"\n[[models.backends]]\n'
     'type = "local"\nmodel = "y"', "models[0] (id 'a'): at most one local backend"),
    (local(extra="vision = true"), "models[0] (id 'm'): vision: our engine reads text only"),
    (local(extra='vision = "yes"'), "models[0] (id 'm'): vision:"),
    # prices
    (local(extra="price_input_per_1k = 1"), "models[0] (id 'm'): price_input_per_1k given without "
                                            "price_output_per_1k"),
    (local(extra="price_cached_input_per_1k = 1"), "(id 'm'): price_cached_input_per_1k given without "
                                                   "price_input_per_1k and price_output_per_1k"),
    (local(extra="price_input_per_1k = -0.1\nprice_output_per_1k = 1"), "price_input_per_1k: a price is never neg"),
    (local(extra="price_input_per_1k = 0.000000001\nprice_output_per_1k = 1"),
     "models[0] (id 'm'): price_input_per_1k: 0.000000001 has more than 8 decimal places"),
    (local(extra="price_input_per_1k = 1\nprice_output_per_1k = nan"), "(id 'm'): price_output_per_1k:"),
    (local(extra="price_input_per_1k = true\nprice_output_per_1k = 1"), "(id 'm'): price_input_per_1k: a price is"),
    # entries
    (local() + local("n") + local(), "models[2]: id 'm' is already used by models[0]"),
    (local("a b"), "models[0] (id 'a b'): id: 'a b' is not a model id"),
    ('[[models]]\nname = "x"\n[models.backend]\ntype = "local"\nmodel = "x"', "models[0]: id: required key missing"),
    (local(extra="context_length = 0"), "models[0] (id 'm'): context_length:"),
    ("models = []", "cat.toml: models: the catalog lists no models"),
    ('[models]\nid = "a"', "cat.toml: models: write each model as a [[models]] table"),
    ("", "cat.toml: models: required key missing"),
])
def test_every_error_names_its_place(text, place):
    with pytest.raises(CatalogError) as e:
        parse(text)
    assert place in str(e.value)
    assert str(e.value).startswith("catalog cat.toml: ")


def test_all_errors_are_listed_at_once():
    with pytest.raises(CatalogError) as e:
        parse(local("a", "colour = 1") + local("b", backend='type = "local"\nmodel = "x"\ndevice = "tpu"'))
    assert "models[0] (id 'a'): colour: unknown key" in str(e.value)
    assert "models[1] (id 'b'): backend.device:" in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nid = "a"\nprice_input_per_1k = \n')
    with pytest.raises(CatalogError, match=rf"catalog {bad}: not valid TOML: .*line 3"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match=rf"catalog {tmp_path / 'none.toml'}: cannot read it"):
        load_catalog(tmp_path / "none.toml")


# -- the example catalog ---------------------------------------------------------------------------------------

def test_example_catalog_lists_the_seed_models():
    cat = load_catalog(EXAMPLE)
    by_id = {m.id: m for m in cat.models}
    flagship = by_id[FLAGSHIP]
    assert flagship.price == Price.cny("0.00275", "0.0095")  # the seed page's prices
    assert flagship.context_length == 131072
    assert [b.type for b in flagship.backends] == ["openai"]
    assert flagship.backends[0].remote_model == "Qwen/Qwen3-235B-A22B-Thinking-2507"
    coder = by_id["qwen/qwen2.5-coder-0.5b-instruct"]
    assert coder.local_backend.model == "qwen2.5-coder-0.5b-instruct" and coder.price is not None
    assert cat.servable() == cat.models  # local entries on their engine, the others on their upstreams
    assert cat.prices(require_keys=True).keys() == by_id.keys()  # every active entry has a price


def test_example_catalog_seed_models_without_price_are_valid_once_uncommented():
    """The seed page's other models stay commented out (no price is given there): uncommented, they parse as
    upstream entries and a keyed server refuses them for want of a price."""
    text = EXAMPLE.read_text()
    section = text[text.index("# --- The seed page's other models"):].splitlines()[1:]
    uncommented = "\n".join(line[2:] for line in section if line.startswith("# "))  # not the "## " notes
    cat = parse(text + "\n" + uncommented, "example")
    ids = [m.id for m in cat.models]
    for name in ("deepseek/deepseek-v3.2", "moonshotai/kimi-k2-thinking", "z-ai/glm-4.7", "minimax/minimax-m2.1"):
        assert name in ids
    extra = cat.models[2:]
    assert len(extra) >= 8 and all(m.price is None and m.backends[0].type == "openai" for m in extra)
    with pytest.raises(CatalogError, match=r"models\[2\] \(id 'deepseek/deepseek-v3.2'\) has no price"):
        cat.prices(require_keys=True)
    vision = {m.id for m in cat.models if m.vision}
    assert vision == {"z-ai/glm-4.6v", "qwen/qwen3-vl-plus"}  # image parts pass through to these only


def test_a_vision_entry_builds_a_vision_upstream_provider():
    from thinkgate.catalog import upstream_provider

    cat = parse('[[models]]\nid = "v"\nvision = true\n[models.backend]\ntype = "openai"\nbase_url = "http://h/v1"\n'
                '[[models]]\nid = "t"\n[models.backend]\ntype = "openai"\nbase_url = "http://h/v1"\n')
    assert [upstream_provider(m).vision for m in cat.models] == [True, False]


# -- real servers ----------------------------------------------------------------------------------------------

class CatalogServer(ServerProcess):
    """`thinkgate serve --config FILE` (no --model: the catalog names the models)."""

    def __init__(self, catalog: Path, extra: list[str]):
        self.port, self.model_id = free_port(), None
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"thinkgate-test-{self.port}.log", "w+")
        self.proc = subprocess.Popen(serve_cmd(catalog, self.port, extra), stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait()

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()


def serve_cmd(catalog: Path, port: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "thinkgate.cli", "serve", "--config", str(catalog), "--port", str(port),
            "--log-level", "warning", *extra]


def write_catalog(tmp_path: Path, checkpoints, priced: bool = True) -> Path:
    prices = 'price_input_per_1k = 0.5\nprice_output_per_1k = "1.25"\nprice_cached_input_per_1k = 0.125\n'
    path = tmp_path / "catalog.toml"
    (tmp_path / "tiny-qwen2").symlink_to(checkpoints["qwen2"])  # read relative to the catalog's folder
    path.write_text(f'''
[[models]]
id = "acme/tiny-thinker"
name = "Tiny Thinker"
description = "random weights"
context_length = 1024
{prices if priced else ""}
[models.backend]
type = "local"
model = "{checkpoints["qwen3"]}"
dtype = "float32"
max_model_len = 2048
kv_cache_memory = {64 * 2**20}

[[models]]
id = "acme/upstream-only"
price_input_per_1k = 0.00275
price_output_per_1k = 0.0095
[[models.backends]]
type = "openai"
base_url = "http://127.0.0.1:9/v1"

[[models]]
id = "acme/tiny-qwen2"
price_input_per_1k = 0
price_output_per_1k = 0
[[models.backends]]
type = "local"
model = "tiny-qwen2"
dtype = "float32"
kv_cache_memory = {32 * 2**20}
[[models.backends]]
type = "openai"
base_url = "http://127.0.0.1:9/v1"
''')
    return path


@pytest.fixture(scope="module")
def catalog_server(checkpoints, tmp_path_factory):
    s = CatalogServer(write_catalog(tmp_path_factory.mktemp("catalog"), checkpoints), ["--no-auth"])
    yield s
    s.stop()


def test_catalog_server_lists_its_local_models_with_prices(catalog_server):
    listing = httpx.get(catalog_server.base + "/v1/models", timeout=10).json()
    by_id = {m["id"]: m for m in listing["data"]}
    assert list(by_id) == ["acme/tiny-thinker", "acme/upstream-only", "acme/tiny-qwen2"]
    assert by_id["acme/upstream-only"]["pricing"]["prompt"] == "0.00275"  # served by its upstream
    card = by_id["acme/tiny-thinker"]
    assert card["name"] == "Tiny Thinker" and card["description"] == "random weights"
    assert card["context_length"] == 1024  # the catalog's, below the engine's 2048
    assert card["pricing"] == {"prompt": "0.5", "completion": "1.25", "input_cache_read": "0.125",
                               "currency": "CNY", "unit": "1K tokens"}
    other = by_id["acme/tiny-qwen2"]
    assert other["name"] == "acme/tiny-qwen2" and other["pricing"]["prompt"] == "0"
    assert other["context_length"] == 4096  # the engine's (the tiny preset), the catalog giving none
    r = httpx.get(catalog_server.base + "/api/gpt/v1/models/acme/upstream-only", timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "acme/upstream-only"
    log = catalog_server.log_text()
    assert "models[2] (id 'acme/tiny-qwen2'): serving its local backend only" in log


def test_catalog_server_answers_each_local_model(catalog_server):
    client = catalog_server.client()
    for model in ("acme/tiny-thinker", "acme/tiny-qwen2"):
        c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, extra_body={"ignore_eos": True})
        assert c.model == model and c.usage.completion_tokens == 5
    cost = c.usage.model_extra.get("cost")
    assert cost in (None, 0)  # a free model
    with pytest.raises(openai.APIStatusError) as e:  # its upstream (port 9) is down: 502, nothing streamed
        client.chat.completions.create(model="acme/upstream-only", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and e.value.body["type"] == "upstream_error"


def test_catalog_context_length_is_enforced(catalog_server):
    with pytest.raises(openai.BadRequestError) as e:
        catalog_server.client().chat.completions.create(
            model="acme/tiny-thinker", messages=[{"role": "user", "content": "hello " * 1100}], max_tokens=1)
    assert "maximum context length is 1024 tokens" in str(e.value)


def run_serve(catalog: Path, extra: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(serve_cmd(catalog, free_port(), extra), capture_output=True, text=True, timeout=120)


def test_keyed_server_refuses_to_start_with_a_model_without_price(checkpoints, tmp_path):
    catalog = write_catalog(tmp_path, checkpoints, priced=False)
    done = run_serve(catalog, [])  # keys are required by default with --config
    assert done.returncode != 0
    assert f"catalog {catalog}: models[0] (id 'acme/tiny-thinker') has no price" in done.stderr
    assert "Uvicorn running" not in done.stderr


def test_config_errors_stop_the_start(checkpoints, tmp_path):
    catalog = write_catalog(tmp_path, checkpoints)
    done = run_serve(catalog, ["--no-auth", "--model", "x"])
    assert done.returncode != 0 and "--model cannot be used with --config" in done.stderr
    catalog.write_text(catalog.read_text().replace("context_length = 1024", "context_len = 1024"))
    done = run_serve(catalog, ["--no-auth"])
    assert done.returncode != 0
    assert f"catalog {catalog}: models[0] (id 'acme/tiny-thinker'): context_len: unknown key" in done.stderr


def test_one_model_card_shows_the_command_line_prices(checkpoints):
    s = ServerProcess(str(checkpoints["qwen3"]), extra=["--kv-cache-memory", str(32 * 2**20), "--price-input",
                                                       "0.00275", "--price-output", "0.0095"])
    try:
        [card] = httpx.get(s.base + "/v1/models", timeout=10).json()["data"]
    finally:
        s.stop()
    assert card["id"] == card["name"] == "tiny-thinker"
    assert card["pricing"] == {"prompt": "0.00275", "completion": "0.0095", "currency": "CNY", "unit": "1K tokens"}


def test_the_flagship_without_prices_gets_the_seed_pages():
    cat = parse_catalog({"models": [{"id": "qwen/qwen3-235b-a22b-thinking-2507",
                                     "backend": {"type": "openai", "base_url": "http://vllm:8000/v1"}}]})
    assert cat.prices(require_keys=True) == {"qwen/qwen3-235b-a22b-thinking-2507": Price.cny("0.00275", "0.0095")}


def test_local_models_that_do_not_fit_stop_the_start_naming_each_need(checkpoints, tmp_path):
    catalog = write_catalog(tmp_path, checkpoints)  # two local models: 64 and 32 MiB of KV cache
    env = {**os.environ, "THINKGATE_AVAILABLE_MEMORY": str(80 * 2**20)}
    done = subprocess.run(serve_cmd(catalog, free_port(), ["--no-auth"]), capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode != 0 and "Uvicorn running" not in done.stderr
    assert f"catalog {catalog}: the local models need" in done.stderr and "80.0 MiB of RAM available" in done.stderr
    assert "models[0] (id 'acme/tiny-thinker'): " in done.stderr and "64.0 MiB of KV cache" in done.stderr
    assert "models[2] (id 'acme/tiny-qwen2'): " in done.stderr and "32.0 MiB of KV cache" in done.stderr
