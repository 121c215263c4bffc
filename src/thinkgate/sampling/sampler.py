"""Batched sampler: one tensor pass over a batch whose rows carry different parameters.

Order per row (spec): logit_bias -> grammar mask -> repetition/frequency/presence penalties ->
temperature -> top_k -> top_p -> min_p -> top_a -> sample. Each filter sees the distribution left by
the previous one. Greedy rows (temperature 0) take the argmax after the penalties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkgate.sampling.params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    params: SamplingParams  # resolved
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None  # per-request generator when the request has a seed
    banned_ids: list[int] | None = None  # e.g. EOS while min_tokens is not reached
    allowed_mask: torch.Tensor | None = None  # bool [V] from a grammar; None = unconstrained


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # chosen token's logprob under the raw distribution
    top_logprobs: list[list[tuple[int, float]]] | None


class Sampler:
    def __init__(self, vocab_size: int, valid_vocab: int):
        self.vocab_size = vocab_size
        self.valid_vocab = valid_vocab  # rows past the tokenizer's vocabulary are padding: never sampled

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        """logits: [B, V] float32 (raw, unprocessed)."""
        raw = logits
        logits = logits.clone()
        if self.valid_vocab < logits.shape[1]:
            logits[:, self.valid_vocab:] = NEG_INF
        self._apply_bias_and_bans(logits, rows)
        self._apply_penalties(logits, rows)
        tokens = self._sample(logits, rows)
        return self._logprobs(raw, tokens, rows)

    # -- transforms -------------------------------------------------------------------------------
    def _apply_bias_and_bans(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        r_idx, c_idx, vals = [], [], []
        for i, row in enumerate(rows):
            for tok, bias in row.params.logit_bias.items():
                r_idx.append(i)
                c_idx.append(tok)
                vals.append(bias)
        if r_idx:
            logits.index_put_((torch.tensor(r_idx), torch.tensor(c_idx)), torch.tensor(vals, dtype=logits.dtype),
                              accumulate=True)
        for i, row in enumerate(rows):
            if row.allowed_mask is not None:
                allowed = row.allowed_mask[: logits.shape[1]].to(logits.device, non_blocking=True)
                if allowed.shape[0] < logits.shape[1]:  # padded vocabulary rows are never allowed
                    logits[i, allowed.shape[0]:] = NEG_INF
                logits[i, : allowed.shape[0]].masked_fill_(~allowed, NEG_INF)
            if row.banned_ids:
                logits[i, row.banned_ids] = NEG_INF

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        b, v = logits.shape
        dev = logits.device
        freq = torch.tensor([r.params.frequency_penalty for r in rows], device=dev)
        pres = torch.tensor([r.params.presence_penalty for r in rows], device=dev)
        rep = torch.tensor([r.params.repetition_penalty for r in rows], device=dev)
        if bool((freq != 0).any() or (pres != 0).any()):
            counts = _counts([r.output_ids for r in rows], b, v, dev)  # generated tokens only
            logits -= freq[:, None] * counts + pres[:, None] * (counts > 0).to(logits.dtype)
        if bool((rep != 1).any()):
            seen = _counts([r.prompt_ids + r.output_ids for r in rows], b, v, dev) > 0
            penalised = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
            logits.copy_(torch.where(seen, penalised, logits))

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=logits.dtype)
        greedy = temp == 0
        greedy_tokens = logits.argmax(dim=-1)
        if bool(greedy.all()):
            return greedy_tokens
        logits = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
        logits = filter_top_k(logits, torch.tensor([r.params.top_k for r in rows], device=dev))
        logits = filter_top_p(logits, torch.tensor([r.params.top_p for r in rows], device=dev, dtype=logits.dtype))
        logits = filter_min_p(logits, torch.tensor([r.params.min_p for r in rows], device=dev, dtype=logits.dtype))
        logits = filter_top_a(logits, torch.tensor([r.params.top_a for r in rows], device=dev, dtype=logits.dtype))
        probs = torch.softmax(logits, dim=-1)
        # Exponential race (Gumbel-max in disguise): argmax(p / E), E ~ Exp(1), samples from p. Seeded
        # rows draw E from their own generator so the batch they share doesn't change their tokens.
        noise = torch.empty_like(probs).exponential_()
        for i, row in enumerate(rows):
            if row.generator is not None and not greedy[i]:
                noise[i] = torch.empty(probs.shape[1], device=dev).exponential_(generator=row.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, greedy_tokens, sampled)

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        ids = tokens.tolist()
        if not any(r.params.logprobs for r in rows):
            return SampleResult(ids, None, None)
        lp = torch.log_softmax(raw[:, : self.valid_vocab], dim=-1)
        chosen = lp.gather(1, tokens[:, None]).squeeze(1).tolist()
        k = max(r.params.top_logprobs for r in rows)
        tops: list[list[tuple[int, float]]] = [[] for _ in rows]
        if k > 0:
            vals, idx = lp.topk(k, dim=-1)
            for i, r in enumerate(rows):
                n = r.params.top_logprobs
                tops[i] = list(zip(idx[i, :n].tolist(), vals[i, :n].tolist(), strict=True))
        return SampleResult(ids, chosen, tops)


def _counts(seqs: list[list[int]], b: int, v: int, dev) -> torch.Tensor:
    counts = torch.zeros(b, v, device=dev)
    for i, s in enumerate(seqs):
        if s:
            t = torch.tensor(s, device=dev)
            counts[i].index_add_(0, t[t < v], torch.ones(int((t < v).sum()), device=dev))
    return counts


def filter_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row (k <= 0 means off)."""
    v = logits.shape[1]
    k = torch.where(k <= 0, torch.full_like(k, v), k.clamp(max=v))
    if bool((k >= v).all()):
        return logits
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def filter_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p (always at least one)."""
    if bool((p >= 1).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max."""
    if bool((min_p <= 0).all()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    pmax = probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < min_p[:, None] * pmax, NEG_INF)


def filter_top_a(logits: torch.Tensor, top_a: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < top_a * p_max^2."""
    if bool((top_a <= 0).all()):
        return logits
    probs = torch.softmax(logits, dim=-1)
    pmax = probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < top_a[:, None] * pmax * pmax, NEG_INF)
