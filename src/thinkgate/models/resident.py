"""What the serving process holds: its resident memory, the bytes of a loaded model's weights, and giving
back to the OS what loading freed.

Loading a GGUF dequantizes each tensor to floats before the CPU kernels' forms are built from it; those
floats are freed, but glibc keeps freed heap pages mapped (below its mmap threshold, which grows up to 32 MiB
after each large free) and the resident size would keep counting them. malloc_trim hands them back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

import torch
from torch import nn


def resident_bytes() -> int:
    """This process's resident set (VmRSS), or 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_freed_memory() -> None:
    """Collect garbage (the GGUF reader's memory map goes with it), then return freed heap pages to the OS."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)
        except (OSError, AttributeError):  # musl and others have no malloc_trim: nothing to hand back
            pass


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_weight_bytes(module: nn.Module, seen: set[int] | None = None) -> int:
    """Bytes of every weight form `module` and its children hold: parameters, buffers, tensors kept as plain
    attributes (a kept dense copy, a bias in fp32) and fbgemm's packed weights (which torch does not expose as
    tensors; their modules report `packed_bytes`). A storage shared by two modules is counted once."""
    seen = set() if seen is None else seen
    total = 0
    for m in module.modules():
        tensors = list(m._parameters.values()) + list(m._buffers.values())
        tensors += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes()
        total += getattr(m, "packed_bytes", 0)
    return total


def memory_report(model: nn.Module, kv_bytes: int) -> str:
    """One log line: the process's resident memory split into the model's weights, the KV pool and the rest
    (the Python and torch runtime, the tokenizer, rotary tables, allocator slack)."""
    release_freed_memory()
    rss, weights = resident_bytes(), module_weight_bytes(model)
    mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
    return (f"resident memory after loading: {mib(rss)} = weights {mib(weights)} + KV pool {mib(kv_bytes)} + "
            f"the rest {mib(rss - weights - kv_bytes)} (runtime, tokenizer, buffers)")
