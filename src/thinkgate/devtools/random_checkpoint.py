"""Write random-weight checkpoints in Hugging Face format (the same code backs `thinkgate model random`)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from thinkgate.devtools.presets import hf_config, tensor_shapes
from thinkgate.devtools.tokenizer_builder import build_tokenizer, tokenizer_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "bfloat16": torch.bfloat16, "float32": torch.float32}


def thinking_template() -> str:
    return resources.files("thinkgate.chat").joinpath("templates/qwen3_thinking.jinja").read_text()


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm weights scatter around 1 (as trained ones do); the rest is small Gaussian noise."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = 0.02 if "embed_tokens" in name or "lm_head" in name else min(0.5, 1.0 / fan_in**0.5)
    return std * torch.randn(shape, generator=gen)


def write_random_checkpoint(
    out: str | Path,
    arch: str = "qwen3",
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "fp32",
    tokenizer_vocab: int = 1000,
    max_shard_bytes: int = 4 * 1024**3,
    chat_template: str | None = None,
) -> Path:
    """Build a checkpoint of `arch` with the `preset` shapes under `out` and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    tok = build_tokenizer(vocab_size=tokenizer_vocab, seed=seed)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    # Tiny models get exactly the tokenizer's vocabulary (so greedy tokens compare with transformers, which
    # does not mask padded rows); named presets keep the real padded 151,936 rows.
    cfg = hf_config(arch, preset, vocab_size=n_tok, dtype=str(torch_dtype).split(".")[-1])
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    cfg["bos_token_id"], cfg["eos_token_id"] = eot, im_end

    template = chat_template if chat_template is not None else thinking_template()
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(tok, template, cfg["max_position_embeddings"]))
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {
        "bos_token_id": eot, "do_sample": True, "eos_token_id": [im_end, eot], "pad_token_id": eot,
        "temperature": 0.6, "top_k": 20, "top_p": 0.95,
    })
    _write_weights(out, tensor_shapes(cfg), torch_dtype, seed, max_shard_bytes)
    return out


def _write_weights(out: Path, shapes: dict, dtype: torch.dtype, seed: int, max_shard_bytes: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    elem = torch.tensor([], dtype=dtype).element_size()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    # Build and flush shard by shard so a multi-GB preset never sits whole in memory twice.
    plan: list[list[str]] = [[]]
    for name, shape in shapes.items():
        n = elem
        for s in shape:
            n *= s
        if plan[-1] and size + n > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += n
    if len(plan) == 1:
        save_file({k: random_tensor(k, shapes[k], gen).to(dtype) for k in plan[0]},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, names in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {k: random_tensor(k, shapes[k], gen).to(dtype) for k in names}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        del tensors
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    del shards


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
