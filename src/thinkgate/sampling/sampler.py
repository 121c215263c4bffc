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
NUCLEUS_CANDIDATES = 1024  # tokens looked at first for top_p without top_k (falls back to a full sort)


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
        tokens = self.sample_ids(logits, rows)
        return self._logprobs(logits, tokens, rows)

    def sample_ids(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The sampled token ids as a tensor on the logits' device, without waiting for them where the
        rows allow (plain greedy rows: one argmax, queued). No logprobs."""
        if all(_plain_greedy(r) for r in rows):
            return greedy_ids(logits, self.valid_vocab)
        logits = logits.clone()
        if self.valid_vocab < logits.shape[1]:
            logits[:, self.valid_vocab:] = NEG_INF
        self._apply_bias_and_bans(logits, rows)
        self._apply_penalties(logits, rows)
        return self._sample(logits, rows)

    def targets(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int] | None, torch.Tensor | None]:
        """The distribution each row samples from, for verifying speculative drafts: all rows greedy ->
        (the argmax ids, None); else (None, probabilities [B, V]) with greedy rows one-hot. The same
        transforms, in the same order, as `sample_ids` (rows are one request's consecutive positions)."""
        if all(_plain_greedy(r) for r in rows):
            return greedy_ids(logits, self.valid_vocab).tolist(), None
        logits = logits.clone()
        if self.valid_vocab < logits.shape[1]:
            logits[:, self.valid_vocab:] = NEG_INF
        self._apply_bias_and_bans(logits, rows)
        self._apply_penalties(logits, rows)
        if all(r.params.temperature == 0 for r in rows):
            return logits.argmax(dim=-1).tolist(), None
        dev, dt = logits.device, logits.dtype
        temp = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=dt)
        greedy = temp == 0
        scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
        scaled = filter_top_k(scaled, torch.tensor([r.params.top_k for r in rows], device=dev))
        probs = torch.softmax(self._filters(scaled, rows), dim=-1)
        if bool(greedy.any()):
            onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
            probs = torch.where(greedy[:, None], onehot, probs)
        return None, probs

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
        """Only tokens already seen are touched, so the cost follows the history, not the vocabulary."""
        dev = logits.device
        v = logits.shape[1]
        freq = [r.params.frequency_penalty for r in rows]
        pres = [r.params.presence_penalty for r in rows]
        rep = [r.params.repetition_penalty for r in rows]
        active = [i for i in range(len(rows)) if freq[i] or pres[i]]
        if active:  # frequency/presence count generated tokens only
            r_idx, t_idx, counts = _seen(logits, [rows[i].output_ids for i in active], active, v)
            f = torch.tensor(freq, device=dev, dtype=logits.dtype)[r_idx]
            pr = torch.tensor(pres, device=dev, dtype=logits.dtype)[r_idx]
            logits.index_put_((r_idx, t_idx), -(f * counts + pr), accumulate=True)
        active = [i for i in range(len(rows)) if rep[i] != 1]
        if active:  # repetition counts prompt and generated tokens (CTRL rule)
            r_idx, t_idx, _ = _seen(logits, [rows[i].prompt_ids + rows[i].output_ids for i in active], active, v)
            x = logits[r_idx, t_idx]
            r = torch.tensor(rep, device=dev, dtype=logits.dtype)[r_idx]
            logits[r_idx, t_idx] = torch.where(x > 0, x / r, x * r)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        dev = logits.device
        tokens = greedy_ids(logits, logits.shape[1])
        if all(r.params.temperature == 0 for r in rows):  # decided on the host: no device round trip
            return tokens
        temp = torch.tensor([r.params.temperature for r in rows], device=dev, dtype=logits.dtype)
        greedy = temp == 0
        logits = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
        vocab = logits.shape[1]
        topk_rows = [i for i, r in enumerate(rows) if not greedy[i] and 0 < r.params.top_k < vocab]
        full_rows = [i for i, r in enumerate(rows) if not greedy[i] and not 0 < r.params.top_k < vocab]
        if topk_rows:
            idx = torch.tensor(topk_rows, device=dev)
            tokens[idx] = self._sample_top_k(logits[idx], [rows[i] for i in topk_rows])
        if full_rows:
            idx = torch.tensor(full_rows, device=dev)
            tokens[idx] = self._sample_full(logits[idx], [rows[i] for i in full_rows])
        return tokens

    def _sample_top_k(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Rows with a top_k: after top_k only the k best tokens can survive, so the later filters and the
        draw run over those candidates instead of the whole vocabulary (same result, far less work)."""
        dev = logits.device
        k = torch.tensor([r.params.top_k for r in rows], device=dev)
        vals, cand = logits.topk(int(k.max()), dim=-1)  # [B, K], sorted best first
        pos = torch.arange(vals.shape[1], device=dev)
        vals = vals.masked_fill(pos[None, :] >= k[:, None], NEG_INF)
        vals = self._filters(vals, rows)
        return cand.gather(1, self._draw(torch.softmax(vals, dim=-1), rows)[:, None]).squeeze(1)

    def _sample_full(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        dev = logits.device
        b, vocab = logits.shape
        tokens = torch.empty(b, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        top_p = torch.tensor([r.params.top_p for r in rows], device=dev, dtype=logits.dtype)
        nucleus = [i for i in range(b) if rows[i].params.top_p < 1]
        if nucleus and NUCLEUS_CANDIDATES < vocab:
            # The nucleus is a prefix of the sorted distribution: when the best C tokens already hold top_p
            # of the mass, sorting the rest of the vocabulary cannot change the result.
            idx = torch.tensor(nucleus, device=dev)
            sub, p = logits[idx], top_p[idx]
            vals, cand = sub.topk(NUCLEUS_CANDIDATES, dim=-1)
            probs = torch.softmax(sub, dim=-1).gather(1, cand)  # normalised over the whole vocabulary
            before = probs.cumsum(dim=-1) - probs
            drop = before >= p[:, None]
            drop[:, 0] = False
            vals = vals.masked_fill(drop, NEG_INF)
            sub_rows = [rows[i] for i in nucleus]
            dt = vals.dtype
            vals = filter_min_p(vals, torch.tensor([r.params.min_p for r in sub_rows], device=dev, dtype=dt))
            vals = filter_top_a(vals, torch.tensor([r.params.top_a for r in sub_rows], device=dev, dtype=dt))
            picked = self._draw(torch.softmax(vals, dim=-1), sub_rows)
            fits = probs.sum(dim=-1) >= p
            tokens[idx[fits]] = cand.gather(1, picked[:, None]).squeeze(1)[fits]
            done[idx[fits]] = True
        rest = [i for i in range(b) if not done[i]]
        ops = _cpu_ops(logits)
        # Rows whose distribution no filter cuts: the softmax and the draw in one C++ call (the same distribution, one
        # uniform per row as _draw takes).
        fast = [i for i in rest if ops is not None and not _filtered(rows[i])]
        rest = [i for i in rest if ops is None or _filtered(rows[i])]
        if fast:
            idx = torch.tensor(fast, device=dev)
            tokens[idx] = ops.sample_softmax(logits[idx].contiguous(), vocab,
                                             self._uniforms([rows[i] for i in fast], dev))
        if rest:
            idx = torch.tensor(rest, device=dev)
            sub_rows = [rows[i] for i in rest]
            sub = self._filters(logits[idx], sub_rows)
            tokens[idx] = self._draw(torch.softmax(sub, dim=-1), sub_rows)
        return tokens

    @staticmethod
    def _filters(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        dev, dt = logits.device, logits.dtype
        logits = filter_top_p(logits, torch.tensor([r.params.top_p for r in rows], device=dev, dtype=dt))
        logits = filter_min_p(logits, torch.tensor([r.params.min_p for r in rows], device=dev, dtype=dt))
        return filter_top_a(logits, torch.tensor([r.params.top_a for r in rows], device=dev, dtype=dt))

    @staticmethod
    def _draw(probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Inverse-CDF sampling: one uniform u in (0, 1] per row, and the first token whose cumulative mass (summed in
        float64) reaches u x the row's total: each token with probability p, a token of mass 0 never.

        Why not an exponential race (argmax p / E): it draws one exponential per candidate, and torch's CPU
        exponential_ costs ~25 ns a value: 3.7 ms for a row of 151,936 (twice that for a seeded row), more than a
        decode step's sampling should, where this takes ~0.2 ms. A seeded row draws its one value from its own
        generator, so neither the batch it shares nor the other rows' settings change its tokens."""
        cdf = probs.to(torch.float64).cumsum(dim=-1)
        idx = torch.searchsorted(cdf, Sampler._uniforms(rows, probs.device)[:, None] * cdf[:, -1:])
        return idx.squeeze(1).clamp_(max=probs.shape[1] - 1)

    @staticmethod
    def _uniforms(rows: list[SamplingRow], dev: torch.device) -> torch.Tensor:
        """One uniform in (0, 1] per row (float64), a seeded row's from its own generator: never 0, so an inverse-CDF
        draw never lands before the first token with mass."""
        u = torch.rand(len(rows), device=dev, dtype=torch.float64)
        for i, row in enumerate(rows):
            if row.generator is not None:
                u[i] = torch.rand(1, device=dev, dtype=torch.float64, generator=row.generator)[0]
        return 1.0 - u

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


def _cpu_ops(logits: torch.Tensor):
    """The GGUF kernels' module for fp32 CPU logits with contiguous rows, when a model has loaded it, else None."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1:
        from thinkgate.layers.cpu_kernels import loaded_ggml

        return loaded_ggml()
    return None


def _filtered(row: SamplingRow) -> bool:
    """Whether a row's top_p / min_p / top_a cut its distribution (top_k rows never reach the full-vocabulary draw)."""
    p = row.params
    return p.top_p < 1 or p.min_p > 0 or p.top_a > 0


def greedy_ids(logits: torch.Tensor, n_valid: int) -> torch.Tensor:
    """Each row's argmax over its first n_valid logits (torch.argmax's answer: the first largest, or the first NaN).
    CPU logits go through the GGUF kernels' module when a model has loaded it: torch's argmax took 0.3 ms a row of
    151,936 values there (~1.3 % of a decode step; csrc/sampling.cpp)."""
    ops = _cpu_ops(logits)
    if ops is not None:
        return ops.greedy_argmax(logits, n_valid)
    return logits[:, :n_valid].argmax(dim=-1)


def _plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (p.temperature == 0 and not p.logprobs and not p.logit_bias and row.allowed_mask is None
            and not row.banned_ids and not p.frequency_penalty and not p.presence_penalty
            and p.repetition_penalty == 1)


def _seen(logits: torch.Tensor, seqs: list[list[int]], row_ids: list[int], v: int):
    """(row, token, count) for every distinct token in each sequence, as flat tensors."""
    keys = [r * v + t for r, seq in zip(row_ids, seqs, strict=True) for t in seq if 0 <= t < v]
    if not keys:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return empty, empty, empty.to(logits.dtype)
    uniq, counts = torch.tensor(keys, device=logits.device).unique(return_counts=True)
    return uniq // v, uniq % v, counts.to(logits.dtype)


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
