"""Accepting speculative drafts so that the output is what sampling without them would give.

A draft token is a point mass q(t) = 1 (n-gram drafts are deterministic), so the speculative-sampling rule
(accept t with probability min(1, p(t) / q(t)), on rejection draw from max(0, p - q) renormalised) becomes:
accept t with probability p(t); on rejection draw from p with t removed, renormalised. Each position's p is
the request's own processed distribution (penalties, temperature, top-k/p ... as the sampler applies them)
given the tokens before it, drafts included. The emitted token at each position is then distributed as p
(P(t) = p(t); P(s != t) = (1 - p(t)) p(s) / (1 - p(t))). After every draft is accepted one more token is drawn
from the last position's p (the bonus). Greedy rows compare with the argmax: identical tokens by construction.
"""

from __future__ import annotations

import torch


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """`targets[j]`: the argmax after the pending token and drafts[:j] (len(drafts) + 1 of them). Returns the
    accepted drafts followed by the first target that differs (or the bonus target)."""
    out = []
    for t, d in zip(targets, drafts, strict=False):
        if t != d:
            return [*out, t]
        out.append(d)
    return [*out, targets[len(drafts)]]


def accept_sampled(probs: torch.Tensor, drafts: list[int], generator: torch.Generator | None) -> list[int]:
    """probs: [len(drafts) + 1, V], each row the processed distribution at that position."""
    out = []
    for j, d in enumerate(drafts):
        pt = float(probs[j, d])
        if pt >= 1.0 or (pt > 0.0 and float(torch.rand((), generator=generator, device=probs.device)) < pt):
            out.append(d)
            continue
        residual = probs[j].clone()
        residual[d] = 0.0
        out.append(_draw(residual, generator))
        return out
    out.append(_draw(probs[len(drafts)], generator))
    return out


def _draw(p: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p.float(), 1, generator=generator))
