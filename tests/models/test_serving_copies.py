"""One serving form per weight on CPU (issue 23): a quantized model holds its linears only in the forms its
kernels run on (no float copy beside them), the embedding as int8 rows, and a tied head reads those same rows.
Bytes are counted over the tensors (and fbgemm's packed weights) the modules hold."""

import pytest
import torch
from torch import nn

from tests.models.gguf_fixture import write_gguf
from thinkgate.layers.embedding import Int8Embedding, TiedInt8Head
from thinkgate.layers.linear import QuantizedLinear
from thinkgate.models.loader import load_model
from thinkgate.models.resident import module_weight_bytes

needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="W8A8 needs fbgemm (x86)")

# Bytes a weight takes in each mode's serving forms, and what a row adds (scales, mins, offsets, bias).
FORM_BYTES = {"w8a8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 32, "mixed": 1.5 + 4 / 32}
PER_ROW = 24


def _linear_report(model: nn.Module, mode: str) -> list[tuple[str, int, int, int]]:
    """(name, bytes held, bytes of the mode's forms, weights) for every linear layer; fails on a float one."""
    out = []
    for name, m in model.named_modules():
        assert not (isinstance(m, nn.Linear) and name != "mlp.gate"), f"{name} is still a float nn.Linear"
        if isinstance(m, QuantizedLinear):
            assert m.dense is None, f"{name} keeps a dense copy beside its quantized form"
            n, k = m.out_features, m.in_features
            out.append((name, module_weight_bytes(m), int(n * k * FORM_BYTES[mode]) + PER_ROW * n, n * k))
    return out


@needs_fbgemm
def test_w8a8_gguf_holds_one_int8_form_per_linear(checkpoints, tmp_path):
    gguf = write_gguf(checkpoints["qwen3"], tmp_path / "tiny.gguf", quant="Q8_0")
    ref = load_model(str(gguf), dtype="float32", device="cpu")
    lm = load_model(str(gguf), dtype="float32", device="cpu", weight_quant="w8a8")
    report = _linear_report(lm.model, "w8a8")
    assert len(report) == 4 * lm.config.num_layers + 1  # qkv, o, gate_up, down per layer, and the head
    for name, held, one_form, weights in report:
        assert weights <= held <= one_form, f"{name} holds {held} bytes for {weights} weights in one int8 form"
    emb = lm.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and emb.qweight.dtype == torch.int8
    # the embedding's rows come back within int8 rounding of the float table
    ids = torch.tensor([0, 5, 77])
    want = ref.model.embed_tokens(ids)
    assert (emb(ids) - want).abs().max().item() <= want.abs().max().item() / 127
    # the whole model: its linears, the embedding at a byte a weight, norms and rotary tables in fp32
    float_bytes = module_weight_bytes(ref.model)
    assert module_weight_bytes(lm.model) < 0.3 * float_bytes + 2**20


@needs_fbgemm
def test_a_tied_head_reads_the_embeddings_int8_rows(tmp_path):
    from thinkgate.devtools.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "tied", arch="qwen3", preset="small", dtype="fp32", seed=1)
    ref = load_model(str(path), dtype="float32", device="cpu")
    assert ref.config.tie_word_embeddings
    lm = load_model(str(path), dtype="float32", device="cpu", weight_quant="w8a8")
    head, emb = lm.model.lm_head, lm.model.embed_tokens
    assert isinstance(head, TiedInt8Head) and head.embedding is emb
    # counted once: the head adds only its bf16 copy of the row scales
    assert module_weight_bytes(head) == module_weight_bytes(emb) + head._scales.numel() * 2
    seen: set[int] = set()
    together = module_weight_bytes(emb, seen) + module_weight_bytes(head, seen)
    assert together == module_weight_bytes(emb) + head._scales.numel() * 2
    x = torch.randn(3, ref.config.hidden_size)
    want = ref.model.compute_logits(x)
    got = lm.model.compute_logits(x)
    assert ((got - want).norm() / want.norm()).item() < 0.02


@pytest.mark.slow
@pytest.mark.network
def test_default_gguf_served_with_one_form_per_linear(default_gguf):
    """The default model re-quantized in the mode `auto` picks for a checkpoint that is not a GGUF (W8A8 on x86
    without our AVX-512 VNNI kernels: one int8 form; `mixed` where they run: its one-row int4 form and its
    batched W8A8 form): every linear in the form(s) its mode serves from, nothing else. (A GGUF itself is served
    from its own blocks where AVX2 runs: tests/models/test_gguf_blocks.py checks what that holds.)"""
    from thinkgate.models.loader import resolve_dtype, resolve_weight_quant

    mode = resolve_weight_quant("auto", torch.device("cpu"), resolve_dtype("auto", torch.device("cpu")))
    lm = load_model(str(default_gguf), dtype="auto", device="cpu", weight_quant=mode)
    report = _linear_report(lm.model, mode)
    assert len(report) == 4 * 24 + 1
    for name, held, forms, weights in report:
        assert weights * min(FORM_BYTES[mode], 1) <= held <= forms, f"{name} holds {held} bytes, its forms {forms}"
    params = sum(n * k for n, k in ((m.out_features, m.in_features) for m in lm.model.modules()
                                    if isinstance(m, QuantizedLinear)))
    linears = sum(held for _, held, _, _ in report)
    emb = lm.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and module_weight_bytes(emb) < 1.01 * emb.qweight.numel()
    # the model holds its linears, the int8 embedding and small fp32 tensors (norms, biases, rotary tables)
    assert module_weight_bytes(lm.model) < linears + module_weight_bytes(emb) + 40 * 2**20
    assert linears <= params * FORM_BYTES[mode] * 1.01 + PER_ROW * 200_000


def test_loading_a_gguf_does_not_import_the_compiler_stack(checkpoints, tmp_path):
    """Building the model on the meta device must not run torch's Python decompositions: their first use imports
    torch._dynamo, sympy and triton, ~230 MiB resident for the server's life (issue 23; measured in BENCHMARKS.md).
    Checked in a fresh interpreter: this one has imported them long ago."""
    import subprocess
    import sys

    gguf = write_gguf(checkpoints["qwen3"], tmp_path / "tiny.gguf", quant="Q8_0")
    code = ("import sys; from thinkgate.models.loader import load_model; "
            f"lm = load_model({str(gguf)!r}, device='cpu'); "
            "print(sorted(m for m in ('sympy', 'torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
