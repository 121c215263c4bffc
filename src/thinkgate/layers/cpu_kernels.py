"""Our C++ CPU kernels (src/thinkgate/csrc), compiled on first use with torch's extension builder.

They need an x86 CPU with AVX-512 VNNI and a C++ compiler; where either is missing `load()` returns None
and callers keep torch's own kernels. The build (~30 s) is cached under thinkgate's cache directory, keyed
by the source and the torch version, so it happens once per machine. THINKGATE_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

from thinkgate.paths import cache_dir

log = logging.getLogger("thinkgate.kernels")

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = [_CSRC / name for name in (
    "q4_linear.cpp", "decode_ops.cpp", "paged_attention.cpp", "decoder.cpp", "bindings.cpp")]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp"]
# The GGUF block kernels (--weight-quant gguf): AVX2 on x86 (every x86 server CPU of the last decade), plain
# C++ elsewhere, so they run where the AVX-512 module above cannot.
GGML_SOURCES = [_CSRC / "ggml_linear.cpp", _CSRC / "ggml_gemm16.cpp", _CSRC / "ggml_decoder.cpp",
                _CSRC / "sampling.cpp", _CSRC / "ggml_bindings.cpp"]

_lock = threading.Lock()
_module = None
_tried = False
_ggml_module = None
_ggml_tried = False


def _x86_has(*flags: str) -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in text for f in flags)


def cpu_supports_vnni() -> bool:
    return _x86_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def cpu_supports_avx2() -> bool:
    return _x86_has("avx2", "fma", "f16c")


def ggml_flags() -> list[str]:
    return ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"] if cpu_supports_avx2() else ["-O3", "-fopenmp"]


def _build_dir(name: str = "thinkgate_cpu_kernels", flags: list[str] = FLAGS) -> Path:
    digest = hashlib.sha256()
    for src in sorted(_CSRC.iterdir()):  # the sources and the headers they include
        digest.update(src.name.encode() + src.read_bytes())
    digest.update(name.encode() + " ".join(flags).encode())
    # The build files name the sources by path: two checkouts sharing a folder would rebuild it in turn.
    digest.update(str(_CSRC).encode())
    key = f"{name}-torch{torch.__version__}-{digest.hexdigest()[:12]}".replace("+", "_")
    return cache_dir() / "kernels" / key


def load():
    """The compiled module, or None where these kernels cannot run here."""
    global _module, _tried
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("THINKGATE_CPU_KERNELS", "1") == "0" or not cpu_supports_vnni():
            return None
        try:
            _module = _build(_build_dir())
        except Exception as exc:  # no compiler, no headers: torch's kernels still work, only slower
            log.warning("thinkgate's CPU kernels could not be built (%s); using torch's ops", exc)
            _module = None
        return _module


def load_ggml():
    """The GGUF block kernels' module (csrc/ggml_linear.cpp), or None without a compiler or with
    THINKGATE_CPU_KERNELS=0."""
    global _ggml_module, _ggml_tried
    with _lock:
        if _ggml_tried:
            return _ggml_module
        _ggml_tried = True
        if os.environ.get("THINKGATE_CPU_KERNELS", "1") == "0":
            return None
        flags = ggml_flags()
        try:
            _ggml_module = _build(_build_dir("thinkgate_ggml_kernels", flags), "thinkgate_ggml_kernels",
                                  GGML_SOURCES, flags)
        except Exception as exc:
            log.warning("thinkgate's GGUF block kernels could not be built (%s)", exc)
            _ggml_module = None
        return _ggml_module


def loaded_ggml():
    """The GGUF block kernels' module if load_ggml has already loaded it, else None (never builds: a caller on a
    hot path, such as the sampler, must not start a minute-long compile)."""
    return _ggml_module


def _build(out: Path, name: str = "thinkgate_cpu_kernels", sources: list[Path] = SOURCES,
           flags: list[str] = FLAGS):
    """Compile (or just load) the module in `out`, one process at a time.

    torch's builder guards its folder with a `lock` file that a killed build leaves behind, after which
    every later start would wait on it forever. An OS file lock, which dies with its holder, serialises
    our builds instead, and whoever holds it clears such a leftover."""
    import fcntl

    from torch.utils.cpp_extension import load as build

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "thinkgate.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (out / "lock").unlink(missing_ok=True)
        if not (out / f"{name}.so").exists():
            log.info("compiling thinkgate's CPU kernels into %s (once per machine, ~30-60 s)", out)
        return build(name=name, sources=[str(s) for s in sources], extra_cflags=flags,
                     extra_ldflags=["-fopenmp"], build_directory=str(out), verbose=False)
