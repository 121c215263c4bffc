"""A regular (non-editable) install: a wheel built from this checkout, installed into a fresh virtual
environment, carries everything its C++ CPU kernels need, builds them from its own files, and runs on them.

The venv sees this environment's packages (torch and the rest) through --system-site-packages; the wheel goes
into the venv itself, which shadows the editable install of thinkgate. Every check runs in the venv's python,
from a folder outside the checkout, so the checkout's src/ is not importable there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thinkgate.layers import cpu_kernels

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "src" / "thinkgate" / "csrc"


def _run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """The venv's folder, with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what the build reads (the top-level files and src/): setuptools keeps build/lib in the
    # source tree between builds and packs whatever was left there, so a wheel built in the checkout could ship
    # files that a clean clone's wheel lacks.
    src = tmp / "project"
    src.mkdir()
    for f in ROOT.iterdir():
        if f.is_file():
            shutil.copy2(f, src / f.name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp / "dist", src], timeout=300)
    (wheel,) = (tmp / "dist").glob("thinkgate-*.whl")
    env = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env], timeout=120)
    # this environment's pip, run by the venv's python, installs into the venv; --ignore-installed because the
    # editable thinkgate of this environment is visible there and would count as already installed
    _run([env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
          wheel], timeout=300, cwd=tmp)
    return env


def _in_venv(env: Path, code: str, *args, timeout: float, cwd: Path, **extra_env) -> dict:
    """Run `code` with the venv's python; it prints one JSON object as its last line of stdout."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = _run([env / "bin" / "python", "-c", code, *args], timeout=timeout, cwd=cwd,
             env={**environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env})
    return json.loads(r.stdout.strip().splitlines()[-1])


WHERE = """
import json, re, sysconfig
from importlib.resources import files
from pathlib import Path

import thinkgate
from thinkgate.layers import cpu_kernels

csrc = Path(str(files("thinkgate") / "csrc"))
includes = {p.name: re.findall(r'#include\\s+"([^"]+)"', p.read_text()) for p in csrc.iterdir()}
print(json.dumps({"package": thinkgate.__file__, "site": sysconfig.get_paths()["purelib"], "csrc": str(csrc),
                  "includes": includes, "sources": [str(s) for s in cpu_kernels.SOURCES]}))
"""


def test_the_installed_package_has_the_kernels_sources_and_headers(venv, tmp_path):
    got = _in_venv(venv, WHERE, timeout=120, cwd=tmp_path)
    site = Path(got["site"]).resolve()
    package = Path(got["package"]).resolve()
    assert package.is_relative_to(site) and site.is_relative_to(venv.resolve()), got
    assert not package.is_relative_to(ROOT), f"thinkgate came from the checkout, not the wheel: {package}"
    installed = set(got["includes"])
    assert {"ops.h", "vec.h", "decoder.h"} <= installed, sorted(installed)
    wanted = {p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")}
    assert wanted <= installed, f"the wheel lacks {sorted(wanted - installed)}"
    for name, includes in got["includes"].items():
        assert set(includes) <= installed, f"{name} includes {sorted(set(includes) - installed)}, not installed"
    assert all(Path(s).resolve().is_relative_to(site) and Path(s).name in installed for s in got["sources"])


ENGINE = """
import json, sys
from pathlib import Path

from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.layers import cpu_fused, cpu_kernels
from thinkgate.sampling.params import SamplingParams

ckpt = sys.argv[1]
assert cpu_fused.available(), "the installed copy did not build its C++ kernels (see the warning above)"
so = Path(cpu_kernels.load().__file__)
greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
prompts = [[5, 6, 7, 8, 9], [10, 11]]

def engine(kernels):
    return LLMEngine.from_config(EngineConfig(model=ckpt, dtype="float32", device="cpu", kv_cache_memory=2**24,
                                              cpu_kernels=kernels))

eng = engine(True)
model = eng.runner.model
print(json.dumps({"so": str(so), "ninja": (so.parent / "build.ninja").read_text(),
                  "csrc": str(cpu_kernels.SOURCES[0].parent), "fused_ops": model.fused_ops is cpu_fused,
                  "attention": type(model.attn_backend).__name__, "ours": eng.generate(prompts, greedy),
                  "torch": engine(False).generate(prompts, greedy)}))
"""


@pytest.mark.skipif(not cpu_kernels.cpu_supports_vnni(),
                    reason="this CPU has no AVX-512 VNNI: thinkgate uses torch's kernels here")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="no C++ compiler here: the CPU kernels cannot be built")
def test_the_installed_engine_builds_and_runs_on_the_cpu_kernels(venv, checkpoints, tmp_path):
    """The installed copy compiles its own sources, into a fresh cache (so nothing built from the checkout is
    reused), and the engine decodes on them, with torch's greedy tokens."""
    cache = tmp_path / "cache"
    got = _in_venv(venv, ENGINE, checkpoints["qwen3"], timeout=900, cwd=tmp_path, THINKGATE_CACHE=str(cache),
                   THINKGATE_CPU_KERNELS="1")
    csrc = Path(got["csrc"])
    assert csrc.resolve().is_relative_to(venv.resolve()), csrc
    assert Path(got["so"]).resolve().is_relative_to(cache.resolve()), got["so"]
    assert str(csrc) in got["ninja"] and str(ROOT / "src") not in got["ninja"]
    assert got["fused_ops"] and got["attention"] == "CpuPagedAttention", got
    assert got["ours"] == got["torch"] and [len(t) for t in got["ours"]] == [6, 6]
