"""Where thinkgate keeps files between runs: one user cache folder, shared by the default model's download
(models/default_model.py) and the compiled C++ CPU kernels (layers/cpu_kernels.py).

THINKGATE_CACHE overrides it; otherwise it is `thinkgate` under XDG_CACHE_HOME (default ~/.cache).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("THINKGATE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "thinkgate")
    return Path(base)
