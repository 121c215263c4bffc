"""Synthetic prompts with a fixed seed (random-length word soup, optionally sharing a long prefix)."""

from __future__ import annotations

import random

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact system program question home water room mother area money "
          "story month lot right study book job word business issue side kind head house service friend father power "
          "hour game line end member law car city community name president team minute idea kid body information "
          "back parent face others level office door health art war history party result change morning reason "
          "research girl guy moment air teacher force education").split()


def synthetic_prompts(n: int, input_len: int, seed: int = 0, shared_prefix_len: int = 0,
                      jitter: float = 0.0) -> list[str]:
    """`n` prompts of about `input_len` words each (±jitter), the first `shared_prefix_len` words shared."""
    rng = random.Random(seed)
    prefix = " ".join(rng.choice(_WORDS) for _ in range(shared_prefix_len))
    out = []
    for _ in range(n):
        length = max(1, int(input_len * (1 + rng.uniform(-jitter, jitter))) - shared_prefix_len)
        body = " ".join(rng.choice(_WORDS) for _ in range(length))
        out.append((prefix + " " + body).strip() if prefix else body)
    return out
