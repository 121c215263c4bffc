"""What a catalog's local models need in memory, checked before any of them loads (`thinkgate serve --config`).

Each local model needs its weights plus its KV cache pool:
- weights: the checkpoint's parameter count (read from the safetensors headers, the GGUF tensor table, or the
  random preset's shapes; never by loading) times the bytes of the form the engine serves them in: the dtype's
  on a GPU or with --weight-quant none (a GGUF is dequantized at load, so its file size would undercount), else
  the CPU's quantized form, which replaces the float weights (int8 / W8A8: 1 byte a parameter, int4: 0.5 plus
  its scales, mixed: both). A hub id not yet downloaded, or a checkpoint in another format, is counted by its
  files' size, or not at all (said so in the message);
- KV cache: `kv_cache_memory` when the entry sets it; else the engine's own rule (engine/kv_pool.py: on CPU
  max_model_len x max_num_seqs tokens, or 8 x 8192 by default, within a share of what is free; on a GPU 85%),
  so models load in catalog order and each default is counted against what the models before it left.

Available memory is the machine's available RAM (MemAvailable) for models on the CPU and the GPU's free memory
for models on it, or THINKGATE_AVAILABLE_MEMORY (bytes) when set (tests, or a container whose limit the kernel
does not report). The check is an estimate of the steady state: activations and allocator slack come on top.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MEMORY_ENV = "THINKGATE_AVAILABLE_MEMORY"
CPU_KV_FRACTION_NOTE = "a quarter of available RAM, at most 65536 tokens"
GPU_KV_FRACTION = 0.85  # LLMEngine._num_blocks: of the GPU memory free after the weights
# Bytes a parameter takes in the CPU's quantized serving forms, which replace the float weights (int4: groups
# of 32 with a 2-byte scale and min; mixed: int4 and int8 side by side). "none": the dtype's own size.
QUANT_BYTES = {"int8": 1.0, "w8a8": 1.0, "int4": 0.5 + 4 / 32, "mixed": 1.5 + 4 / 32}


@dataclass(frozen=True)
class Shape:
    params: int | None  # None: unknown
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    file_bytes: int | None = None  # the checkpoint's files, when params are unknown


@dataclass(frozen=True)
class Need:
    label: str  # the catalog entry, for messages
    device: str  # "cpu" or "cuda"
    weights: int | None  # bytes; None: not known before it is downloaded
    kv: int
    kv_source: str  # "kv_cache_memory" or how the default was counted

    @property
    def total(self) -> int:
        return (self.weights or 0) + self.kv

    def describe(self) -> str:
        weights = "weights of unknown size (not downloaded yet)" if self.weights is None else \
            f"{gib(self.weights)} of weights"
        return f"{self.label}: {weights} + {gib(self.kv)} of KV cache ({self.kv_source}) = {gib(self.total)}"


class DoesNotFit(ValueError):
    """The local models need more memory than there is; the message lists each model's need."""


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# -- available memory ---------------------------------------------------------------------------------------
def available_memory(device: str) -> int:
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            return int(override)
        except ValueError:
            raise DoesNotFit(f"{MEMORY_ENV}={override!r} is not a number of bytes") from None
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- a checkpoint's shape, without loading it ----------------------------------------------------------------
def checkpoint_shape(spec: str) -> Shape:
    from thinkgate.models.default_model import DEFAULT_MODEL_ALIASES, SIZE, default_model_path

    if spec.lower() in DEFAULT_MODEL_ALIASES:
        path = default_model_path()
        return gguf_shape(path) if path.exists() else Shape(None, file_bytes=SIZE)
    if spec.startswith("random:"):
        return _random_shape(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return gguf_shape(path) if path.suffix == ".gguf" else Shape(None, file_bytes=path.stat().st_size)
    if path.is_dir():
        return _hf_dir_shape(path)
    if spec.count("/") == 1:
        cached = _hub_cache(spec)
        if cached is not None:
            return _hf_dir_shape(cached)
    return Shape(None)


def _hub_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not downloaded (or no hub library): its size is unknown until it is
        return None


def _hf_dir_shape(path: Path) -> Shape:
    cfg = {}
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        cfg = {**cfg, **(cfg.get("text_config") or {})}
    files = sorted(path.glob("*.safetensors"))
    params = sum(_safetensors_params(f) for f in files) if files else None
    others = [f for pat in ("*.bin", "*.pt", "*.pth") for f in path.glob(pat)]
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    return Shape(params, cfg.get("num_hidden_layers"), cfg.get("num_key_value_heads", heads), head_dim,
                 file_bytes=sum(f.stat().st_size for f in others) or None)


def _safetensors_params(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def gguf_shape(path: Path) -> Shape:
    """Parameter count and attention shape from a GGUF file's header and tensor table (the vocabulary arrays
    are skipped, not decoded: milliseconds where the gguf package's reader takes seconds)."""
    with open(path, "rb") as f:
        data = f.read(64 << 20)  # the header and tensor table of any model fit; the weights are not read
    r = _GGUFHeader(data)
    arch = r.meta.get("general.architecture")
    v = lambda k, d=None: r.meta.get(f"{arch}.{k}", d)  # noqa: E731
    heads = v("attention.head_count")
    hidden = v("embedding_length")
    head_dim = v("attention.key_length") or (hidden // heads if heads and hidden else None)
    return Shape(r.params, v("block_count"), v("attention.head_count_kv", heads), head_dim)


class _GGUFHeader:
    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, data: bytes):
        if data[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        self.data, self.pos = data, 8
        n_tensors, n_kv = self._read("<QQ")
        self.meta: dict = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._read("<I")
            self.meta[key] = self._value(vtype)
        self.params = 0
        for _ in range(n_tensors):
            self._string()
            (n_dims,) = self._read("<I")
            dims = self._read(f"<{n_dims}Q")
            self._read("<IQ")  # type, offset
            self.params += math.prod(dims)

    def _read(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._read("<Q")
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8", "replace")

    def _value(self, vtype: int):
        if vtype in self._SCALARS:
            return self._read("<" + self._SCALARS[vtype])[0]
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._read("<IQ")
            if etype == 8:  # strings (the vocabulary): skipped
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", self.data, self.pos)
                    self.pos += 8 + n
                return None
            if etype in self._SCALARS:
                self.pos += struct.calcsize("<" + self._SCALARS[etype]) * count
                return None
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def _random_shape(spec: str) -> Shape:
    import torch

    from thinkgate.devtools.presets import PRESETS, hf_config
    from thinkgate.devtools.tokenizer_builder import build_tokenizer
    from thinkgate.models.config import ModelConfig
    from thinkgate.models.qwen import QwenForCausalLM

    parts = spec.split(":")
    preset = parts[1] if len(parts) > 1 else "tiny"
    arch = parts[2] if len(parts) > 2 else ("qwen3_moe" if "a3b" in preset else
                                            "qwen2" if preset.startswith("qwen2") else "qwen3")
    if preset not in PRESETS:
        return Shape(None)
    cfg = ModelConfig.from_hf(hf_config(arch, preset, build_tokenizer().get_vocab_size(), "bfloat16"))
    with torch.device("meta"):
        model = QwenForCausalLM(cfg, max_positions=1)
    return Shape(sum(p.numel() for p in model.parameters()), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)


# -- the plan --------------------------------------------------------------------------------------------------
def plan(entries: list[tuple[str, object]]) -> list[Need]:
    """Each (label, EngineConfig)'s need, in load order (defaults counted against what earlier models left)."""
    import torch

    from thinkgate.engine.kv_pool import (
        DEFAULT_FRACTION,
        bytes_per_token,
        cpu_kernels_expected,
        cpu_pool_size,
        resolve_kv_dtype,
    )
    from thinkgate.models.loader import is_gguf, resolve_device, resolve_dtype, resolve_weight_quant

    needs: list[Need] = []
    used: dict[str, int] = {}
    for label, cfg in entries:
        dev = resolve_device(cfg.device)
        device = dev.type
        dtype = resolve_dtype(cfg.dtype, dev)
        try:
            shape = checkpoint_shape(cfg.model)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            shape = Shape(None)  # unreadable: loading it will say why
        quant = resolve_weight_quant(cfg.weight_quant, dev, dtype, cfg.dtype, gguf=is_gguf(str(cfg.model)),
                                     cpu_kernels=cfg.cpu_kernels) if device == "cpu" else "none"
        if quant in ("gguf", "gguf-q8"):  # served from the file's own blocks: their bytes are about the file's
            weights = Path(cfg.model).expanduser().stat().st_size
        elif shape.params is not None:
            weights = int(shape.params * QUANT_BYTES.get(quant, dtype.itemsize))
        else:
            weights = shape.file_bytes
        free = max(0, available_memory(device) - used.get(device, 0) - (weights or 0))
        known = None not in (shape.layers, shape.kv_heads, shape.head_dim)
        if cfg.kv_cache_memory is not None:
            kv, source = cfg.kv_cache_memory, "kv_cache_memory"
        elif device == "cuda":
            kv, source = int(free * GPU_KV_FRACTION), "the default: 85% of the GPU memory left"
        elif known:  # the engine's own rule (engine/kv_pool.py), in the dtype it will pick
            kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, torch.float32, "cpu", cpu_kernels_expected(cfg.cpu_kernels),
                                        quant not in ("none", "gguf", "gguf-q8"), quant in ("gguf", "gguf-q8"))
            per_token = bytes_per_token(shape.layers, shape.kv_heads, shape.head_dim, kv_dtype)
            size = cpu_pool_size(None, cfg.max_model_len, cfg.max_num_seqs, per_token, free, cfg.block_size)
            kv, source = size.tokens * per_token, size.source
        else:
            kv, source = int(free * DEFAULT_FRACTION), f"the default: {CPU_KV_FRACTION_NOTE}"
        needs.append(Need(label, device, weights, kv, source))
        used[device] = used.get(device, 0) + needs[-1].total
    return needs


def check_fit(entries: list[tuple[str, object]]) -> list[Need]:
    """Raise DoesNotFit, naming each model's need, when the local models do not fit; else their needs."""
    needs = plan(entries)
    problems = []
    for device in sorted({n.device for n in needs}):
        mine = [n for n in needs if n.device == device]
        total, avail = sum(n.total for n in mine), available_memory(device)
        if total > avail:
            where = "GPU memory free" if device == "cuda" else "RAM available"
            hint = " (on a GPU the default KV cache takes 85% of what is left: set kv_cache_memory on each " \
                   "model)" if device == "cuda" and any(n.kv_source != "kv_cache_memory" for n in mine) else ""
            problems.append(f"the local models need {gib(total)} and there is {gib(avail)} of {where}{hint}:\n  "
                            + "\n  ".join(n.describe() for n in mine))
    if problems:
        raise DoesNotFit("\n".join(problems) + "\nlower kv_cache_memory, serve fewer local models, or move some to "
                         "an upstream")
    return needs
