"""`--weight-quant gguf`: a GGUF served from its own blocks (layers/ggml_linear, csrc/ggml_decoder.cpp)."""

from __future__ import annotations

import pytest
import torch

from tests.models.gguf_fixture import write_gguf
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.layers import cpu_kernels
from thinkgate.layers.ggml_linear import GGMLEmbedding, GGMLLinear
from thinkgate.layers.linear import QuantizedLinear
from thinkgate.models.loader import load_model, resolve_weight_quant

pytestmark = pytest.mark.skipif(cpu_kernels.load_ggml() is None, reason="no C++ compiler for the GGUF block kernels")

PROMPT = [5, 17, 99, 3, 250, 41, 7, 7, 64, 128]


def _logits_along(lm, ids: list[int]) -> torch.Tensor:
    """Every position's logits, one token at a time through the model's Python forward (paged fp32 cache)."""
    from thinkgate.layers.attention import AttentionMetadata

    cfg, bs = lm.config, 16
    n_blocks = len(ids) // bs + 2
    kv = [(torch.zeros(n_blocks, bs, cfg.num_kv_heads, cfg.head_dim), torch.zeros(n_blocks, bs, cfg.num_kv_heads,
                                                                                   cfg.head_dim))
          for _ in range(cfg.num_layers)]
    out = []
    with torch.inference_mode():
        for i, t in enumerate(ids):
            meta = AttentionMetadata.build([1], [i + 1], [list(range(n_blocks))], bs, torch.device("cpu"))
            out.append(lm.model.compute_logits(lm.model(torch.tensor([t]), torch.tensor([i]), kv, meta))[0])
    return torch.stack(out)


@pytest.mark.parametrize("arch,quant", [("qwen2", "Q5_0"), ("qwen3", "Q8_0"), ("qwen3", "Q4_0")])
def test_blocks_model_is_the_exact_model_up_to_activation_rounding(checkpoints, tmp_path, arch, quant):
    path = write_gguf(checkpoints[arch], tmp_path / f"tiny-{quant}.gguf", quant=quant)
    exact = load_model(str(path), dtype="float32", device="cpu")
    blocks = load_model(str(path), device="cpu", weight_quant="gguf")
    mods = list(blocks.model.modules())
    assert isinstance(blocks.model.embed_tokens, GGMLEmbedding)
    assert sum(isinstance(m, GGMLLinear) for m in mods) == 4 * exact.config.num_layers + 1  # + the head
    assert not any(isinstance(m, (QuantizedLinear, torch.nn.Linear)) for m in mods)
    assert blocks.model.norm.weight.dtype == torch.float32  # activations stay fp32, as in llama.cpp
    ids = PROMPT * 3
    a, b = _logits_along(exact, ids), _logits_along(blocks, ids)
    # Only the activations' 8-bit rounding separates the two (the weights are the same codes): close, not equal.
    assert not torch.equal(a, b)
    err = (a - b).abs().max().item()
    assert err < 0.05 * a.abs().max().item(), err
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_a_tied_head_and_the_embedding_read_one_copy_of_the_blocks(checkpoints, tmp_path):
    """A GGUF without output.weight (tied embeddings): the head's kernels take the embedding's blocks in their own
    layout (Q8_0 as R4L on AVX2) and the lookup reads that same tensor, so the matrix is held once; its rows are
    still the file's values, and the logits the exact model's up to activation rounding."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src, tied = checkpoints["qwen3"], tmp_path / "tied"
    shutil.copytree(src, tied)
    weights = load_file(str(tied / "model.safetensors"))
    weights.pop("lm_head.weight", None)
    save_file(weights, str(tied / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    path = write_gguf(tied, tmp_path / "tied-q8.gguf", quant="Q8_0")
    exact = load_model(str(path), dtype="float32", device="cpu")
    blocks = load_model(str(path), device="cpu", weight_quant="gguf")
    emb, head = blocks.model.embed_tokens, blocks.model.lm_head
    assert exact.config.tie_word_embeddings
    assert emb.qtype == head.types[0] and emb.blocks.data_ptr() == head.blocks[0].data_ptr()
    # (Q8_0 as R4L where rows are a multiple of 128 long on AVX2; this tiny model's are not: the file's layout)
    assert head.types[0] == (108 if cpu_kernels.cpu_supports_avx2() and head.in_features % 128 == 0 else 8)
    ids = torch.tensor(PROMPT)
    assert torch.equal(emb(ids).float(), exact.model.embed_tokens(ids).float())
    a, b = _logits_along(exact, PROMPT), _logits_along(blocks, PROMPT)
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_decode_steps_in_the_cpp_layer_loop_match_the_python_path(checkpoints, tmp_path, arch):
    """Three sequences decode together through the C++ loop, teacher-forced along the same tokens as the
    model's Python forward: the hidden states agree to fp32 rounding at every step (the random tiny models'
    nearly flat distributions make greedy paths part on such rounding, so states, not paths, are compared)."""
    from thinkgate.layers.attention import AttentionMetadata

    path = write_gguf(checkpoints[arch], tmp_path / "tiny-q5.gguf", quant="Q5_0")
    lm = load_model(str(path), device="cpu", weight_quant="gguf")
    cfg = EngineConfig(model=str(path), kv_cache_memory=16 * 2**20, weight_quant="gguf", enable_prefix_caching=False)
    runner = LLMEngine(lm, cfg).runner
    assert runner.cpu_decoder is not None and runner.decoder_rows == cfg.max_num_seqs
    assert runner.kv_caches[0][0].dtype == torch.float16  # llama.cpp's cache dtype, the auto choice here
    bs, seqs = runner.block_size, [PROMPT * 4, PROMPT[::-1] * 3, PROMPT[3:] * 5]
    tables = [[10 * i + b for b in range(4)] for i in range(3)]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        for i, ids in enumerate(seqs):  # the first 4 tokens of each as a prefill, through the Python forward
            meta = AttentionMetadata.build([4], [4], [tables[i]], bs, cpu)
            lm.model(torch.tensor(ids[:4]), torch.arange(4), runner.kv_caches, meta)
        for pos in range(4, min(len(s) for s in seqs)):
            toks = torch.tensor([s[pos] for s in seqs])
            slots = torch.tensor([t[pos // bs] * bs + pos % bs for t in tables])
            lens = torch.full((3,), pos + 1, dtype=torch.int32)
            got = runner.cpu_decoder.forward(lm.model.embed_tokens(toks), torch.full((3,), pos), slots,
                                             torch.tensor(tables, dtype=torch.int32), lens)
            for i in range(3):  # the reference writes the same K/V into the same slot: the cache stays shared
                meta = AttentionMetadata.build([1], [pos + 1], [tables[i]], bs, cpu)
                want = lm.model(toks[i:i + 1], torch.tensor([pos]), runner.kv_caches, meta)[0]
                assert torch.allclose(got[i], want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), (pos, i)


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_decode_attention_over_a_long_scattered_context_matches_the_python_path(checkpoints, tmp_path, kv_dtype):
    """The C++ decode attention (query heads grouped per KV head, keys in tiles) over 300 cached tokens in
    blocks out of order: the same hidden states as the Python path's attention, step after step."""
    from thinkgate.layers.attention import AttentionMetadata

    path = write_gguf(checkpoints["qwen3"], tmp_path / "tiny-q8.gguf", quant="Q8_0")
    lm = load_model(str(path), device="cpu", weight_quant="gguf")
    cfg = EngineConfig(model=str(path), kv_cache_memory=16 * 2**20, weight_quant="gguf", enable_prefix_caching=False,
                       kv_cache_dtype=kv_dtype)
    runner = LLMEngine(lm, cfg).runner
    assert runner.cpu_decoder is not None and runner.kv_caches[0][0].dtype == getattr(torch, kv_dtype)
    bs, n = runner.block_size, 300
    table = [(7 * b + 3) % 61 for b in range(-(-(n + 4) // bs))]  # distinct blocks, scattered
    ids = (PROMPT * 31)[:n + 3]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        meta = AttentionMetadata.build([n], [n], [table], bs, cpu)
        lm.model(torch.tensor(ids[:n]), torch.arange(n), runner.kv_caches, meta)
        for pos in range(n, n + 3):
            slot = torch.tensor([table[pos // bs] * bs + pos % bs])
            got = runner.cpu_decoder.forward(lm.model.embed_tokens(torch.tensor([ids[pos]])), torch.tensor([pos]), slot,
                                             torch.tensor([table], dtype=torch.int32),
                                             torch.tensor([pos + 1], dtype=torch.int32))[0]
            meta = AttentionMetadata.build([1], [pos + 1], [table], bs, cpu)
            want = lm.model(torch.tensor([ids[pos]]), torch.tensor([pos]), runner.kv_caches, meta)[0]
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), pos


def test_auto_serves_a_gguf_from_its_blocks_and_only_a_gguf(checkpoints, tmp_path):
    cpu = torch.device("cpu")
    expected = "gguf" if cpu_kernels.cpu_supports_avx2() else resolve_weight_quant("auto", cpu, torch.float32)
    assert resolve_weight_quant("auto", cpu, torch.float32, gguf=True) == expected
    assert resolve_weight_quant("auto", cpu, torch.float32, dtype_asked="float32", gguf=True) == "none"
    assert resolve_weight_quant("auto", cpu, torch.float32, gguf=True, cpu_kernels=False) != "gguf"
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(str(checkpoints["qwen3"]), device="cpu", weight_quant="gguf")


def test_the_default_model_keeps_the_files_types(default_gguf):
    lm = load_model(str(default_gguf), device="cpu", weight_quant="gguf", max_model_len=256)
    layer = lm.model.layers[0]
    names = {2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K"}
    if cpu_kernels.cpu_supports_avx2():
        # rearranged for the AVX2 kernels (same codes and scales): Q5_0 as R4 / R4L, Q8_0 as R4L
        names.update({106: "Q5_0", 107: "Q5_0", 108: "Q8_0"})
    assert [names[t] for t in layer.self_attn.qkv_proj.types] == ["Q5_0", "Q5_0", "Q8_0"]
    assert [names[t] for t in layer.mlp.gate_up_proj.types] == ["Q5_0", "Q5_0"]
    assert {names[lm.model.layers[i].mlp.down_proj.types[0]] for i in range(24)} == {"Q4_K", "Q6_K"}
    assert names[lm.model.lm_head.types[0]] == "Q8_0"
    held = sum(b.numel() for m in lm.model.modules() if isinstance(m, (GGMLLinear, GGMLEmbedding))
               for b in m.buffers())
    # the file's blocks, nothing re-quantized beside them (Q5_0's scales held as fp32 on AVX2: 24 bytes a block)
    assert 0.97 < held / default_gguf.stat().st_size < 1.06


def test_speculative_greedy_answers_are_the_plain_ones(checkpoints, tmp_path):
    """Verify steps run through the same C++ decoder as plain steps, each draft a row at its own position, so
    n-gram speculation changes no greedy token (repetitive prompts: most drafts are accepted)."""
    import random

    from thinkgate.sampling.params import SamplingParams

    path = write_gguf(checkpoints["qwen3"], tmp_path / "tiny-q5.gguf", quant="Q5_0")
    lm = load_model(str(path), device="cpu", weight_quant="gguf")
    rng = random.Random(3)
    prompts = []
    for _ in range(3):
        unit = [rng.randrange(5, 900) for _ in range(rng.randrange(6, 12))]
        prompts.append(unit * 4 + unit[:2])
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    base = dict(model=str(path), kv_cache_memory=16 * 2**20, weight_quant="gguf", enable_prefix_caching=False)
    plain = LLMEngine(lm, EngineConfig(**base))
    want = [plain.generate([p], params)[0] for p in prompts]
    spec = LLMEngine(lm, EngineConfig(**base, speculative="ngram"))
    assert spec.runner.cpu_decoder is not None
    assert [spec.generate([p], params)[0] for p in prompts] == want
    assert spec.generate(prompts, params) == plain.generate(prompts, params)
    # One sequence slot (a single-stream server): verify steps still run in the C++ decoder, not the model's
    # Python layer loop (which took ~7x a decode step there), and answers stay the plain ones.
    single = LLMEngine(lm, EngineConfig(**base, speculative="ngram", max_num_seqs=1))
    verify_rows = []
    decoder = single.runner.cpu_decoder

    class Counting:
        def forward(self, embeds, *rest):
            verify_rows.append(embeds.shape[0])
            return decoder.forward(embeds, *rest)

    single.runner.cpu_decoder = Counting()
    model_steps = []
    forward = lm.model.forward
    lm.model.forward = lambda ids, *rest, **kw: model_steps.append(ids.shape[0]) or forward(ids, *rest, **kw)
    try:
        assert [single.generate([p], params)[0] for p in prompts] == want
    finally:
        lm.model.forward = forward
    assert model_steps == [len(p) for p in prompts]  # the prefills only
    assert max(verify_rows) > 1 and single.proposer.accepted > 0


def test_without_the_block_kernels_auto_falls_back_and_gguf_says_why(monkeypatch, checkpoints, tmp_path):
    import thinkgate.layers.ggml_linear as gl

    monkeypatch.setattr(gl, "available", lambda: False)  # as where no C++ compiler could build them
    cpu = torch.device("cpu")
    assert resolve_weight_quant("auto", cpu, torch.float32, gguf=True) not in ("gguf", "gguf-q8")
    path = write_gguf(checkpoints["qwen3"], tmp_path / "tiny.gguf", quant="Q8_0")
    with pytest.raises(ValueError, match="could not be built"):
        load_model(str(path), device="cpu", weight_quant="gguf")


def test_a_decoding_sequence_is_the_same_beside_a_long_prefill(checkpoints, tmp_path):
    """A prefill of many rows multiplies in a float GEMM (layers/ggml_linear.GEMM_MIN_ROWS); a step that mixes it
    with decoding sequences runs as two, so a decoding sequence's logprobs are bit for bit the ones it gets
    alone, and the prefilled sequence's are the ones it gets alone too."""
    from thinkgate.layers.ggml_linear import GEMM_MIN_ROWS
    from thinkgate.sampling.params import SamplingParams

    path = write_gguf(checkpoints["qwen2"], tmp_path / "tiny-q5.gguf", quant="Q5_0")
    lm = load_model(str(path), device="cpu", weight_quant="gguf")
    eng = LLMEngine(lm, EngineConfig(model=str(path), kv_cache_memory=16 * 2**20, weight_quant="gguf",
                                     enable_prefix_caching=False))
    split = []
    inner = eng.runner._split_logits
    eng.runner._split_logits = lambda *a: split.append(1) or inner(*a)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=True)
    long_prompt = (PROMPT * 10)[:GEMM_MIN_ROWS + 7]

    def run(requests: list[tuple[str, list[int], int]]) -> dict[str, list]:
        """requests: (id, prompt, the step at which it is added)."""
        got: dict[str, list] = {rid: [] for rid, _, _ in requests}
        step = 0
        while step == 0 or eng.has_unfinished():
            for rid, prompt, at in requests:
                if at == step:
                    eng.add_request(rid, prompt, params)
            for out in eng.step():
                got[out.request_id].extend(out.logprobs or [])
            step += 1
        return got

    alone_a = run([("a", PROMPT, 0)])["a"]
    alone_b = run([("b", long_prompt, 0)])["b"]
    assert not split
    both = run([("a", PROMPT, 0), ("b", long_prompt, 4)])
    assert split  # the long prefill shared a step with a's decoding
    assert both["a"] == alone_a and len(alone_a) == 20
    assert both["b"] == alone_b
