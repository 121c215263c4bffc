"""A forward that keeps only the rows that get logits (models/qwen.QwenForCausalLM.forward's `keep`): past the
last layer's K/V nothing else of the other rows is computed, and what is computed is what the full forward gives."""

from __future__ import annotations

import pytest
import torch

from tests.models.gguf_fixture import write_gguf
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.layers import cpu_kernels
from thinkgate.layers.attention import AttentionMetadata
from thinkgate.layers.ggml_linear import GEMM_MIN_ROWS
from thinkgate.models.loader import load_model
from thinkgate.sampling.params import SamplingParams

BS = 16


def _run(lm, ids: list[int], start: int, kv, keep: list[int] | None) -> torch.Tensor:
    """One chunk, positions start.. over blocks 0.. of `kv`."""
    n = len(ids)
    meta = AttentionMetadata.build([n], [start + n], [list(range(kv[0][0].shape[0]))], BS, torch.device("cpu"))
    with torch.inference_mode():
        return lm.model(torch.tensor(ids), torch.arange(start, start + n), kv, meta,
                        keep=None if keep is None else torch.tensor(keep, dtype=torch.long))


def _cache(lm, tokens: int):
    cfg = lm.config
    blocks = tokens // BS + 2
    return [(torch.zeros(blocks, BS, cfg.num_kv_heads, cfg.head_dim), torch.zeros(blocks, BS, cfg.num_kv_heads,
                                                                                   cfg.head_dim))
            for _ in range(cfg.num_layers)]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_kept_rows_are_the_full_forwards_rows_and_every_rows_keys_are_written(checkpoints, arch):
    lm = load_model(str(checkpoints[arch]), dtype="float32", device="cpu")
    ids = [(7 * i + 3) % 500 for i in range(40)]
    full_kv, kept_kv, none_kv = _cache(lm, 60), _cache(lm, 60), _cache(lm, 60)
    # Two chunks: the first a fresh prompt, the second over the first's cached keys.
    for start, chunk in ((0, ids[:24]), (24, ids[24:])):
        full = _run(lm, chunk, start, full_kv, None)
        kept = _run(lm, chunk, start, kept_kv, [len(chunk) - 1, 2])
        none = _run(lm, chunk, start, none_kv, [])
        assert full.shape == (len(chunk), lm.config.hidden_size)
        assert kept.shape == (2, lm.config.hidden_size) and none.shape == (0, lm.config.hidden_size)
        torch.testing.assert_close(kept, full[[len(chunk) - 1, 2]], rtol=1e-5, atol=1e-5)
        for (fk, fv), (kk, kv_), (nk, nv) in zip(full_kv, kept_kv, none_kv, strict=True):
            assert torch.equal(fk, kk) and torch.equal(fv, kv_)  # the last layer's keys too
            assert torch.equal(fk, nk) and torch.equal(fv, nv)
    assert full_kv[-1][0].abs().sum() > 0


def test_a_prefill_runs_the_last_layers_mlp_for_the_sampled_row_alone(checkpoints, engine_factory):
    """A chunked prompt: the chunks that sample nothing stop at the last layer's K/V, the one that samples runs
    its MLP on one row; the greedy answer is the one the full forward gives (the engine's reference path)."""
    lm = load_model(str(checkpoints["qwen3"]), dtype="float32", device="cpu")
    eng = LLMEngine(lm, EngineConfig(model=str(checkpoints["qwen3"]), dtype="float32", max_num_batched_tokens=32,
                                     enable_prefix_caching=False, kv_cache_memory=8 * 2**20))
    rows: list[int] = []
    lm.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    prompt = [(11 * i + 5) % 500 for i in range(80)]
    eng.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    got = []
    while eng.has_unfinished():
        for out in eng.step():
            got.extend(out.new_token_ids)
    assert rows and all(r == 1 for r in rows)  # chunks of 32: two without the MLP, then the sampled row alone

    # The reference: every row through the whole stack, the argmax at the last one, token by token.
    kv = _cache(lm, 100)
    ids, want = list(prompt), []
    with torch.inference_mode():
        h = _run(lm, ids, 0, kv, None)
        for _ in range(4):
            want.append(int(lm.model.compute_logits(h[-1:]).argmax()))
            h = _run(lm, [want[-1]], len(ids), kv, None)
            ids.append(want[-1])
    assert got == want


@pytest.mark.skipif(cpu_kernels.load_ggml() is None, reason="no C++ compiler for the GGUF block kernels")
def test_a_gguf_prefills_kept_row_takes_the_float_gemm_like_its_chunk(checkpoints, tmp_path):
    """The last layer of a 64+ row chunk multiplies its kept row with the float GEMM over the exact weights, as
    the full chunk does, not with the 16-bit blocks a lone row would take: its hidden state is the full
    forward's to fp32 rounding, far closer than the blocks' arithmetic would leave it."""
    path = write_gguf(checkpoints["qwen2"], tmp_path / "tiny-q5.gguf", quant="Q5_0")
    lm = load_model(str(path), device="cpu", weight_quant="gguf")
    ids = [(13 * i + 1) % 500 for i in range(GEMM_MIN_ROWS + 9)]
    full = _run(lm, ids, 0, _cache(lm, 100), None)
    kept = _run(lm, ids, 0, _cache(lm, 100), [len(ids) - 1])
    err = (kept[0] - full[-1]).abs().max().item()
    assert err < 2e-6 * full[-1].abs().max().item(), err  # ~2e-7 here; the 16-bit blocks: ~1e-5
