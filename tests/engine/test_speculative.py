"""N-gram speculative decoding: greedy output identical to decoding without it, sampled tokens distributed as
without it (chi-square against the model's own distribution), and the KV pool's bookkeeping intact."""

from __future__ import annotations

import math
import random

import pytest
import torch

from thinkgate.engine.speculative import NgramProposer, find_ngram_draft
from thinkgate.sampling.acceptance import accept_greedy, accept_sampled
from thinkgate.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def _pair(engine_factory, arch="qwen3", **opts):
    return engine_factory(arch, **opts), engine_factory(arch, speculative="ngram", **opts)


def _assert_pool_clean(eng):
    eng.block_manager.check_integrity([])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def _repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        unit = [rng.randrange(5, 900) for _ in range(rng.randrange(6, 14))]
        out.append(unit * 4 + unit[: rng.randrange(1, 5)])
    return out


def test_ngram_lookup_takes_the_latest_longest_match():
    assert find_ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]
    # The 3-gram (5, 1, 2) is not earlier; the 2-gram (1, 2) is, and wins over the later 1-gram match of 2.
    assert find_ngram_draft([1, 2, 4, 2, 6, 5, 1, 2], 2) == [4, 2]
    assert find_ngram_draft([4, 5, 6], 4) == []
    assert find_ngram_draft([1, 2, 1], 0) == []
    assert find_ngram_draft([1, 2, 1], 5) == [2, 1]  # a draft may run into the suffix itself


def test_drafting_backs_off_after_misses_and_resets_on_a_hit():
    p = NgramProposer(max_draft=4)
    toks = [1, 2, 3, 1, 2, 3, 4, 5, 1, 2]
    assert p.propose("r", toks, 10) == [3, 4]  # a sequence starts with START_DRAFT tokens
    p.record("r", 2, 0)
    assert p.propose("r", toks, 10) == []  # cooling down for 2 steps
    assert p.propose("r", toks, 10) == []
    assert p.propose("r", toks, 10) == [3]  # after a miss: one token
    p.record("r", 1, 0)
    assert sum(1 for _ in range(4) if not p.propose("r", toks, 10)) == 4  # 4 steps after the second miss
    assert p.propose("r", toks, 10) == [3]
    p.record("r", 1, 1)  # all accepted: no cooldown, twice the length
    assert p.propose("r", toks, 10) == [3, 4]
    p.record("r", 2, 2)
    assert p.propose("r", toks, 10) == [3, 4, 5, 1]
    p.record("r", 4, 4)
    assert p.propose("r", toks, 10) == [3, 4, 5, 1]  # at most max_draft
    p.record("r", 4, 1)  # a partial hit: one past what was accepted
    assert p.propose("r", toks, 10) == [3, 4]
    assert p.propose("r", toks, 1) == [3]  # and never past the room left
    assert p.acceptance_rate == pytest.approx(8 / 14)


def test_acceptance_rules():
    assert accept_greedy([5, 6, 7], [5, 6]) == [5, 6, 7]  # all accepted, bonus
    assert accept_greedy([5, 9, 7], [5, 6]) == [5, 9]  # the first disagreement is corrected
    # A point-mass p accepts its token and rejects any other without randomness.
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert accept_sampled(p, [1], None) == [1, 2]
    assert accept_sampled(p, [0], None) == [1]


def test_sampled_acceptance_keeps_the_distribution():
    """The first emitted token of accept_sampled is distributed as p, whatever the draft."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = torch.stack([p, p])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[accept_sampled(probs, [1], g)[0]] += 1
    assert _chi2_pvalue(counts, p * n) > 1e-3


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "qwen3_moe"])
def test_greedy_identical_on_repetitive_prompts(engine_factory, arch):
    base, spec = _pair(engine_factory, arch)
    prompts = _repetitive_prompts(4, seed=1)
    want = [base.generate([p], GREEDY)[0] for p in prompts]
    got = [spec.generate([p], GREEDY)[0] for p in prompts]
    assert got == want
    assert spec.proposer.proposed > 0 and spec.proposer.accepted > 0
    _assert_pool_clean(spec)


def test_greedy_identical_batched_with_random_prompts_and_penalties(engine_factory):
    """Draft and non-draft sequences in one step; random prompts; penalties (each draft position's row sees
    the drafts before it); min_tokens and a stop token; block size 4 so drafts cross block boundaries."""
    base, spec = _pair(engine_factory, block_size=4)
    rng = random.Random(3)
    prompts = _repetitive_prompts(3, seed=2) + [[rng.randrange(5, 900) for _ in range(rng.randrange(3, 40))]
                                                for _ in range(5)]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=40, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, frequency_penalty=0.5, presence_penalty=0.3,
                             min_tokens=10, ignore_eos=True)] * 3
    params = params[: len(prompts)]
    assert spec.generate(prompts, params) == base.generate(prompts, params)
    assert spec.proposer.accepted > 0
    _assert_pool_clean(spec)
    _assert_pool_clean(base)


def test_per_request_switch_and_unspeculated_features(engine_factory):
    _, spec = _pair(engine_factory)
    prompt = _repetitive_prompts(1, seed=4)[0]
    spec.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative=False))
    spec.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True))
    assert spec.proposer.proposed == 0
    spec.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert spec.proposer.proposed > 0
    _assert_pool_clean(spec)


def test_stop_inside_accepted_drafts_ends_where_plain_decoding_does(engine_factory):
    base, spec = _pair(engine_factory)
    prompt = _repetitive_prompts(1, seed=5)[0]
    free = base.generate([prompt], GREEDY)[0]
    stop_tok = free[len(free) // 2]
    p = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, stop_token_ids=[stop_tok])
    assert spec.generate([prompt], p) == base.generate([prompt], p)
    for mt in (1, 2, 3, 7):
        p = SamplingParams(temperature=0, max_tokens=mt, ignore_eos=True)
        assert spec.generate([prompt], p) == base.generate([prompt], p)
    _assert_pool_clean(spec)


def _chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square test, bins with an expected count under 5 pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    stat = float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _topk_dist(eng, prompt: list[int], k: int, temperature: float) -> dict[int, float]:
    """The request's processed distribution at the next position (top-k of the raw logprobs, tempered)."""
    out = []
    eng.add_request("dist", prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=True, top_logprobs=k))
    while eng.has_unfinished():
        out += [o for o in eng.step() if o.logprobs]
    top = out[0].logprobs[0][2]
    w = torch.softmax(torch.tensor([lp for _, lp in top]) / temperature, dim=0)
    return {t: float(x) for (t, _), x in zip(top, w, strict=True)}


def test_sampled_tokens_keep_their_distribution(engine_factory):
    """Seeded samples of the 2nd output token, which a drafted step emits (accepted draft or the draw after a
    rejection), against its exact marginal sum_a p(a) p(. | a) from the model."""
    base, spec = _pair(engine_factory, max_num_seqs=256)
    k, temp = 5, 0.8
    # The tiny model's own greedy loop as context: its drafts are tokens the model rates (some get accepted).
    start = _repetitive_prompts(1, seed=6)[0]
    prompt = start + base.generate([start], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    first = _topk_dist(base, prompt, k, temp)
    marginal: dict[int, float] = {}
    for a, pa in first.items():
        for b, pb in _topk_dist(base, prompt + [a], k, temp).items():
            marginal[b] = marginal.get(b, 0.0) + pa * pb
    n = 1000
    params = [SamplingParams(temperature=temp, top_k=k, max_tokens=3, seed=i, ignore_eos=True) for i in range(n)]
    outs = spec.generate([prompt] * n, params)
    assert 0 < spec.proposer.accepted < spec.proposer.proposed  # both the accept and the reject path ran
    ids = sorted(marginal)
    observed = torch.tensor([sum(1 for o in outs if o[1] == t) for t in ids], dtype=torch.float64)
    assert observed.sum() == n  # nothing outside the top-k support
    expected = torch.tensor([marginal[t] * n for t in ids], dtype=torch.float64)
    assert _chi2_pvalue(observed, expected) > 1e-3
    assert not math.isnan(_chi2_pvalue(observed, expected))
    _assert_pool_clean(spec)


def test_request_switch_is_validated():
    from pydantic import ValidationError

    from thinkgate.params import validate_chat
    from thinkgate.protocol import ChatCompletionRequest

    def chat(**extra):
        return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **extra)

    assert validate_chat(chat()).speculative is True
    assert validate_chat(chat(speculative=False)).speculative is False
    # A declared field (so /openapi.json shows it): a non-boolean is refused while the request is parsed,
    # which the server turns into a 400 naming it (the e2e test below).
    with pytest.raises(ValidationError) as e:
        chat(speculative="no")
    assert e.value.errors()[0]["loc"] == ("speculative",)


def test_served_with_speculation(checkpoints):
    """`thinkgate serve --speculative ngram`: greedy answers equal with the request's switch on and off, and a
    switch that is not a boolean is a 400 naming it."""
    import openai

    from tests.conftest import ServerProcess

    s = ServerProcess(str(checkpoints["qwen3"]), extra=["--kv-cache-memory", str(32 * 2**20), "--speculative", "ngram"])
    try:
        client = s.client()
        text = "alpha beta gamma delta " * 12
        answers = []
        for extra in ({}, {"speculative": False}, {"speculative": True}):
            r = client.chat.completions.create(model=s.model_id, messages=[{"role": "user", "content": text}],
                                               temperature=0, max_tokens=40, extra_body=extra)
            assert r.usage.completion_tokens == 40
            answers.append(r.choices[0].message.model_dump())  # the tiny thinker's text may all be reasoning
        assert answers[0] == answers[1] == answers[2]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=s.model_id, messages=[{"role": "user", "content": "x"}],
                                           extra_body={"speculative": "yes"})
        assert e.value.body["param"] == "speculative"
    finally:
        s.stop()


def test_verify_attention_is_each_positions_decode_attention():
    """The verify step's attention (the reference backend): query i of the pending token and its drafts sees its
    first L - t + i + 1 keys and gets, bit for bit, what a one-token decode step at that position computes, so a
    step with drafts cannot move a greedy near-tie (with one masked call over all queries it could: its sums run
    in another order; the default model's prose answer changed at token 18 with int4 weights)."""
    from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention

    torch.manual_seed(0)
    page, hq, hkv, d, length, t = 16, 4, 2, 32, 45, 6
    nblk = -(-length // page)
    kc = torch.randn(nblk + 2, page, hkv, d)
    vc = torch.randn_like(kc)
    table = [2, 0, 1][:nblk]  # blocks out of order, as the block manager hands them out
    q = torch.randn(t, hq, d)
    attn = TorchPagedAttention(scale=d ** -0.5)
    cpu = torch.device("cpu")
    meta = AttentionMetadata.build([t], [length], [table], page, cpu, verify=True)
    assert meta.kind == "verify"
    out = attn.forward(q, kc, vc, meta)
    chunk = attn.forward(q, kc, vc, AttentionMetadata.build([t], [length], [table], page, cpu))
    assert torch.allclose(out, chunk, atol=1e-5)  # the same attention ...
    for i in range(t):  # ... computed as decode computes it
        one = AttentionMetadata.build([1], [length - t + i + 1], [table], page, cpu)
        assert torch.equal(out[i:i + 1], attn.forward(q[i:i + 1], kc, vc, one))
