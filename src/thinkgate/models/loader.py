"""Resolve a model spec (directory, GGUF file, hub id, default model) and build the model on a device."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from thinkgate.models.config import ModelConfig, UnsupportedModelError
from thinkgate.models.hub import ModelNotFoundError, download_from_hub
from thinkgate.models.qwen import QwenForCausalLM
from thinkgate.models.tokenizer import ModelTokenizer
from thinkgate.models.weights import CheckpointError, check_shapes, convert_in_parts, convert_state_dict

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    model: QwenForCausalLM
    config: ModelConfig
    tokenizer: ModelTokenizer
    eos_token_ids: list[int]
    generation_defaults: dict = field(default_factory=dict)
    source: str = ""


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype in ("float32", "fp32"):
        return torch.float32
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, bfloat16 or float32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # bf16 is fast on CPUs with AVX-512 BF16 / AMX; elsewhere it is emulated and fp32 wins.
    cap = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if cap in ("AVX512", "AVX512_BF16", "AMX") else torch.float32


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
    return torch.device(device)


def load_model(spec: str, dtype: str = "auto", device: str = "auto", max_model_len: int | None = None,
               weight_quant: str = "none", head_quant: str = "auto", cpu_kernels: bool = True,
               quantization: str = "none") -> LoadedModel:
    """Load `spec`: a HF model directory, a .gguf file, or a hub id such as `Qwen/Qwen3-0.6B`."""
    dev = resolve_device(device)
    tdtype = resolve_dtype(dtype, dev)
    check_quantization(quantization, dev)
    gguf = is_gguf(spec)
    quant = "none" if quantization == "fp8" else resolve_weight_quant(weight_quant, dev, tdtype, dtype_asked=dtype,
                                                                      gguf=gguf, cpu_kernels=cpu_kernels)
    if quant in ("gguf", "gguf-q8"):
        if dtype == "auto":
            tdtype = torch.float32  # activations in fp32 between the quantized products, as llama.cpp keeps them
        loaded = _load(spec, tdtype, dev, max_model_len, GGUF_BLOCKS if quant == "gguf" else GGUF_BLOCKS_Q8)
        from thinkgate.layers.ggml_linear import GGMLLinear
        from thinkgate.models.resident import release_freed_memory

        release_freed_memory()
        n = sum(isinstance(m, GGMLLinear) for m in loaded.model.modules())
        log.info("the GGUF's own quantized blocks on %d linear layers (%s activation blocks)", n,
                 "16-bit" if quant == "gguf" else "llama.cpp's 8-bit")
        return loaded
    head = quant if head_quant == "auto" else head_quant
    prepare = None if quant == "none" else lambda m: _serving_form(m, quant, head, cpu_kernels)
    loaded = _load(spec, tdtype, dev, max_model_len, prepare)
    if quantization == "fp8":
        from thinkgate.layers.fp8 import quantize_model_fp8

        quantize_model_fp8(loaded.model)
        return loaded
    if prepare is not None:
        from thinkgate.layers.linear import QuantizedLinear
        from thinkgate.models.resident import release_freed_memory

        prepare(loaded.model)  # what loading part by part left (a random model is built whole)
        release_freed_memory()
        n = sum(isinstance(m, QuantizedLinear) for m in loaded.model.modules())
        log.info("%s quantization on %d linear layers (output head: %s), int8 embedding", quant, n, head)
    return loaded


def _serving_form(module: torch.nn.Module, quant: str, head: str, cpu_kernels: bool) -> None:
    """One serving form per weight: each float weight is dropped once its quantized form is built (prefill
    runs on the quantized kernels too); the embedding becomes int8 rows (before the linears, so a tied head
    reads those rows rather than getting a copy)."""
    from thinkgate.layers.embedding import quantize_embedding
    from thinkgate.layers.linear import quantize_linears

    if isinstance(getattr(module, "embed_tokens", None), torch.nn.Embedding):
        quantize_embedding(module)
    quantize_linears(module, quant, keep_dense=False, head_mode=head, cpu_kernels=cpu_kernels)


def check_quantization(mode: str, dev: torch.device) -> None:
    if mode not in ("none", "fp8"):
        raise ValueError(f"unknown --quantization {mode!r}; choose none or fp8")
    # fp8 matmuls need Ada or Hopper (sm89+); elsewhere the upcast fallback would be slower than bf16.
    if mode == "fp8" and (dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 9)):
        raise ValueError("--quantization fp8 needs a GPU with fp8 matmuls (compute capability 8.9 or later)")


# `prepare` for --weight-quant gguf / gguf-q8: resolved by _load_gguf, which holds the file
GGUF_BLOCKS, GGUF_BLOCKS_Q8 = "gguf-blocks", "gguf-blocks-q8"
WEIGHT_QUANTS = ("none", "int8", "int4", "w8a8", "mixed", "gguf", "gguf-q8")


def _block_kernels_built() -> bool:
    """Whether csrc/ggml_linear.cpp is built (compiled here once per machine; None without a compiler)."""
    from thinkgate.layers.ggml_linear import available

    return available()


def is_gguf(spec: str) -> bool:
    return spec.endswith(".gguf") and Path(spec).expanduser().is_file()


def resolve_weight_quant(mode: str, dev: torch.device, dtype: torch.dtype, dtype_asked: str = "auto",
                         gguf: bool = False, cpu_kernels: bool = True) -> str:
    if mode in ("gguf", "gguf-q8") and not gguf:
        raise ValueError("--weight-quant gguf serves a GGUF file's own quantized blocks; this model is not a .gguf")
    if mode == "auto":
        # On CPU the weights are served quantized unless float32 was asked for (the exact reference). A GGUF is
        # served from its own blocks, integer sums per block as llama.cpp's (`gguf`) where those kernels run (x86 with
        # AVX2): re-quantizing them into our forms changed the model (issue 19, BENCHMARKS.md). Otherwise: where
        # our AVX-512 VNNI kernels run, one-row steps in int4 and batched ones in W8A8 (`mixed`); elsewhere
        # on x86 W8A8 throughout (fbgemm's kernel beat fp32 and int4 at every row count on an AVX2 EPYC,
        # BENCHMARKS.md); int4 where fbgemm is missing (ARM) and the model runs in bf16.
        if dev.type != "cpu" or dtype_asked in ("float32", "fp32"):
            return "none"
        from thinkgate.layers.cpu_kernels import cpu_supports_avx2, cpu_supports_vnni
        from thinkgate.layers.linear import DynInt8Linear

        if gguf and cpu_kernels and cpu_supports_avx2() and os.environ.get("THINKGATE_CPU_KERNELS", "1") != "0" \
                and _block_kernels_built():
            return "gguf"

        if not DynInt8Linear.available():
            return "int4" if dtype == torch.bfloat16 else "none"
        return "mixed" if cpu_supports_vnni() and dtype == torch.bfloat16 else "w8a8"
    if mode in ("gguf", "gguf-q8") and not _block_kernels_built():
        raise ValueError(f"--weight-quant {mode} needs thinkgate's GGUF block kernels, which could not be built here "
                         "(a C++ compiler is needed; the log says why); choose another --weight-quant")
    if mode not in WEIGHT_QUANTS:
        raise ValueError(f"unknown weight quantization {mode!r}; choose auto, {', '.join(WEIGHT_QUANTS)}")
    if mode != "none" and dev.type != "cpu":
        raise ValueError("weight-only int8/int4 kernels are used on CPU only; serve GPUs in bf16")
    return mode


def _load(spec: str, tdtype, dev, max_model_len, prepare=None) -> LoadedModel:
    """`prepare(module)`, where given, turns each loaded part (a decoder layer, then the whole model once the
    embedding and head are in) into its serving form before the next part is read."""
    if spec.startswith("random:"):
        return _load_random(spec, tdtype, dev, max_model_len)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnsupportedModelError(f"{path} is a file but not a .gguf; pass a model directory or a GGUF file")
        return _load_gguf(path, tdtype, dev, max_model_len, prepare)
    if path.is_dir():
        return _load_hf_dir(path, tdtype, dev, max_model_len, name=path.name, prepare=prepare)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _load_hf_dir(download_from_hub(spec), tdtype, dev, max_model_len, name=spec, prepare=prepare)
    raise ModelNotFoundError(f"model {spec!r} is neither a directory, a .gguf file nor a hub id (org/name)")


def _load_hf_dir(path: Path, dtype, dev, max_model_len, name: str, prepare=None) -> LoadedModel:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json; it is not a Hugging Face model directory")
    hf_cfg = json.loads(cfg_path.read_text())
    cfg = ModelConfig.from_hf(hf_cfg)
    if not (path / "tokenizer.json").exists():
        raise CheckpointError(f"{path} has no tokenizer.json")
    tokenizer = ModelTokenizer.from_dir(path)
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    names, get, closers = _safetensors_source(path)
    try:
        model = _build(cfg, names, get, dtype, dev, max_model_len, prepare)
    finally:
        for c in closers:
            c.__exit__(None, None, None)
    eos = _eos_ids(gen.get("eos_token_id", hf_cfg.get("eos_token_id")), tokenizer)
    return LoadedModel(name=name, model=model, config=cfg, tokenizer=tokenizer, eos_token_ids=eos,
                       generation_defaults=_sampling_defaults(gen), source=str(path))


def _safetensors_source(path: Path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors weights")
        weight_map = None
    handles, closers, where = {}, [], {}
    for f in files:
        try:
            ctx = safe_open(str(path / f), framework="pt", device="cpu")
            h = ctx.__enter__()
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {f}: {e}") from e
        handles[f], closers = h, closers + [ctx]
        for k in h.keys():
            where[k] = f
    if weight_map is not None:
        missing = [k for k, f in weight_map.items() if where.get(k) != f]
        if missing:
            raise CheckpointError(f"safetensors index lists {missing[0]!r} but its shard does not hold it")

    def get(name: str) -> torch.Tensor:
        try:
            return handles[where[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt safetensors data for {name} in {where[name]}: {e}") from e

    return list(where), get, closers


def _load_gguf(path: Path, dtype, dev, max_model_len, prepare=None) -> LoadedModel:
    from thinkgate.models.gguf_file import GGUFModel

    g = GGUFModel(path)
    if prepare in (GGUF_BLOCKS, GGUF_BLOCKS_Q8):
        from thinkgate.models.gguf_blocks import serve_gguf_blocks

        act_bits = 16 if prepare == GGUF_BLOCKS else 8
        prepare = lambda m: serve_gguf_blocks(g, m, act_bits)  # noqa: E731
    cfg = ModelConfig.from_hf(g.hf_config())
    tokenizer = g.tokenizer()
    model = _build(cfg, g.tensor_names(), g.tensor_getter(), dtype, dev, max_model_len, prepare)
    eos = _eos_ids([g.value("tokenizer.ggml.eos_token_id")], tokenizer)
    name = (g.value("general.name") or path.stem).replace(" ", "-")
    return LoadedModel(name=name, model=model, config=cfg, tokenizer=tokenizer, eos_token_ids=eos,
                       generation_defaults={}, source=str(path))


def _load_random(spec: str, dtype, dev, max_model_len) -> LoadedModel:
    """`random:PRESET[:ARCH]`: random weights in real shapes, built directly in device memory (no files),
    like vLLM's dummy load format; for benchmarks of shapes too big to write to disk."""
    from thinkgate.devtools.presets import ARCHITECTURES, PRESETS, hf_config
    from thinkgate.devtools.random_checkpoint import thinking_template
    from thinkgate.devtools.tokenizer_builder import build_tokenizer

    parts = spec.split(":")
    preset = parts[1] if len(parts) > 1 else "tiny"
    arch = parts[2] if len(parts) > 2 else ("qwen3_moe" if "a3b" in preset else
                                            "qwen2" if preset.startswith("qwen2") else "qwen3")
    if preset not in PRESETS or arch not in ARCHITECTURES:
        raise ModelNotFoundError(f"unknown random model {spec!r}; presets: {', '.join(PRESETS)}")
    tok = build_tokenizer()
    tokenizer = ModelTokenizer(tok=tok, chat_template=thinking_template(), eos_token="<|im_end|>",
                               special_ids=frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special))
    cfg = ModelConfig.from_hf(hf_config(arch, preset, tokenizer.vocab_size, "bfloat16"))
    n_pos = max_model_len or cfg.max_position_embeddings
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 30B model never exists in fp32 on device
    try:
        with torch.device(dev):
            torch.manual_seed(0)
            model = QwenForCausalLM(cfg, max_positions=max(n_pos, 1))
    finally:
        torch.set_default_dtype(previous)
    with torch.device(dev):
        for name, p in model.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    if dev.type == "cpu" and dtype == torch.bfloat16:
        model.attn_backend.compute_dtype = torch.float32
    eos = _eos_ids([], tokenizer)
    return LoadedModel(name=f"random-{preset}", model=model.eval(), config=cfg, tokenizer=tokenizer,
                       eos_token_ids=eos, generation_defaults={}, source=spec)


@contextmanager
def empty_modules():
    """Build modules on the meta device without running their initialisers: the checkpoint replaces every
    parameter anyway, and an initialiser on a meta tensor goes through torch's Python decompositions, whose
    first use imports torch._dynamo, sympy and triton (~140 MiB resident for the life of the server)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _build(cfg: ModelConfig, names, get, dtype, dev, max_model_len, prepare=None) -> QwenForCausalLM:
    with empty_modules():
        model = QwenForCausalLM(cfg, max_positions=1)
    if prepare is None or dev.type != "cpu":
        sd = convert_state_dict(cfg, names, get, dtype)
        check_shapes(model, sd)
        model.load_state_dict(sd, assign=True, strict=True)
    else:  # part by part into the serving form: peak memory is the quantized model plus one float part
        for part in convert_in_parts(cfg, names, get, dtype):
            check_shapes(model, part, partial=True)
            model.load_state_dict(part, assign=True, strict=False)
            layer = next(iter(part)).split(".")
            prepare(model.layers[int(layer[1])] if layer[0] == "layers" else model)
            del part
        on_meta = [k for k, v in model.state_dict().items() if v.is_meta]
        if on_meta:
            raise CheckpointError(f"checkpoint lacks weights for {on_meta[0]}")
    # Rotary tables are computed, not loaded: rebuild them on the real device for the served length.
    from thinkgate.layers.rotary import RotaryEmbedding

    n_pos = max_model_len or cfg.max_position_embeddings
    model.rope = RotaryEmbedding(cfg.head_dim, max(n_pos, 1), cfg.rope_theta, cfg.rope_scaling)
    model.to(dev)
    if dev.type == "cpu" and dtype == torch.bfloat16:
        model.attn_backend.compute_dtype = torch.float32
    return model.eval()


def _eos_ids(raw, tokenizer: ModelTokenizer) -> list[int]:
    ids = raw if isinstance(raw, list) else ([raw] if raw is not None else [])
    ids = [int(i) for i in ids if i is not None]
    # Qwen chat models end a turn with <|im_end|> and sometimes with <|endoftext|>: stop on both.
    for t in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.token_id(t)
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def _sampling_defaults(gen: dict) -> dict:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    out = {k: gen[k] for k in keys if k in gen and gen[k] is not None}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
