"""Write a GGUF model's dequantized weights as a Hugging Face directory (fp32 safetensors + config), so
transformers can run the very same weights as a reference (tests, benchmarks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.numpy import save_file

from thinkgate.models.gguf_file import GGUFModel


def gguf_to_hf_dir(gguf_path: str | Path, out: str | Path, tokenizer_src: Path | None = None,
                   dtype: str = "float32") -> Path:
    g = GGUFModel(gguf_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = g.hf_config()
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg))
    get = g.tensor_getter()
    save_file({n: get(n).numpy() for n in g.tensor_names()}, str(out / "model.safetensors"))
    if tokenizer_src is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_src) / f, out / f)
    else:
        tok = g.tokenizer()
        tok.tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": tok.chat_template, "eos_token": tok.eos_token, "tokenizer_class": "Qwen2Tokenizer",
             "add_bos_token": False, "bos_token": None}))
    return out
