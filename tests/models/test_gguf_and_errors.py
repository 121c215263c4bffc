"""GGUF loading (names, quant types, tokenizer, template) and load-time errors that name the problem."""

import json

import pytest
import torch

from tests.models.gguf_fixture import write_gguf
from thinkgate.devtools.gguf_export import gguf_to_hf_dir
from thinkgate.models.config import UnsupportedModelError
from thinkgate.models.hub import ModelNotFoundError
from thinkgate.models.loader import load_model
from thinkgate.models.weights import CheckpointError
from thinkgate.sampling.params import SamplingParams


@pytest.mark.parametrize("arch,quant", [("qwen2", "Q8_0"), ("qwen3", "Q4_0"), ("qwen3", "Q5_0"), ("qwen2", "BF16")])
def test_gguf_loads_and_matches_transformers_on_dequantized_weights(checkpoints, tmp_path, arch, quant):
    from transformers import AutoModelForCausalLM

    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine

    path = write_gguf(checkpoints[arch], tmp_path / f"tiny-{quant}.gguf", quant=quant)
    lm = load_model(str(path), dtype="float32", device="cpu")
    assert lm.config.arch == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    # The tokenizer rebuilt from GGUF metadata tokenizes like the original tokenizer.json.
    from thinkgate.models.tokenizer import ModelTokenizer

    orig = ModelTokenizer.from_dir(checkpoints[arch])
    text = "Hello 世界 😀 <think>x</think> <|im_end|>"
    assert lm.tokenizer.encode(text) == orig.encode(text)
    assert lm.tokenizer.chat_template == orig.chat_template
    assert orig.token_id("<|im_end|>") in lm.eos_token_ids
    ref_dir = gguf_to_hf_dir(path, tmp_path / "ref", tokenizer_src=checkpoints[arch])
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    eng = LLMEngine(lm, EngineConfig(kv_cache_memory=16 * 2**20))
    prompt = orig.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ours = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()


def test_gguf_unsupported_quant_type_is_named(checkpoints, tmp_path):
    path = write_gguf(checkpoints["qwen2"], tmp_path / "iq.gguf", quant="Q8_0", raw_type_override="IQ2_XXS")
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        load_model(str(path), dtype="float32", device="cpu")


def test_gguf_unsupported_architecture_is_named(checkpoints, tmp_path):
    path = write_gguf(checkpoints["qwen2"], tmp_path / "llama.gguf", quant="Q8_0", arch="llama")
    with pytest.raises(UnsupportedModelError, match="'llama'"):
        load_model(str(path), dtype="float32", device="cpu")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(tmp_path / "empty"), dtype="float32", device="cpu")


def test_corrupt_safetensors(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["qwen3"], bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:200] + b"\x00garbage" + data[208:len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(str(bad), dtype="float32", device="cpu")


def test_unsupported_architecture_in_config(checkpoints, tmp_path):
    import shutil

    d = tmp_path / "llama"
    shutil.copytree(checkpoints["qwen3"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        load_model(str(d), dtype="float32", device="cpu")


def test_missing_tensor_is_named(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "missing"
    shutil.copytree(checkpoints["qwen3"], d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_norm.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_norm.weight"):
        load_model(str(d), dtype="float32", device="cpu")


def test_unreachable_hub_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="hub"):
        load_model("Qwen/Qwen3-0.6B-thinkgate-test-nonexistent", dtype="float32", device="cpu")


def test_nonsense_spec():
    with pytest.raises(ModelNotFoundError):
        load_model("./no/such/dir/anywhere", dtype="float32", device="cpu")


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_tensors_are_dequantized_to_the_gguf_packages_floats_exactly(checkpoints, tmp_path, quant):
    """The loader dequantizes with the block kernels (10x the gguf package's speed): the same floats, bit for bit,
    on every tensor; with the kernels off, the package's own code serves."""
    import subprocess
    import sys

    import numpy as np
    from gguf.quants import dequantize

    from thinkgate.models.gguf_file import GGUFModel, _block_dequantizer

    assert _block_dequantizer(quant) is not None and _block_dequantizer("F16") is None
    g = GGUFModel(write_gguf(checkpoints["qwen3"], tmp_path / "t.gguf", quant=quant))
    quantized = 0
    for name, t in g._tensors.items():
        ref = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape)))
        assert torch.equal(g.dequantize(name), torch.from_numpy(ref)), name
        quantized += t.tensor_type.name == quant
    assert quantized >= 7  # the layers' linears at least
    code = ("import os, sys; os.environ['THINKGATE_CPU_KERNELS'] = '0'; "
            "from thinkgate.models.gguf_file import _block_dequantizer; print(_block_dequantizer(sys.argv[1]))")
    assert subprocess.run([sys.executable, "-c", code, quant], capture_output=True, text=True,
                          check=True).stdout.strip() == "None"
