"""Each sampler transform against an independent numpy computation, plus statistics and seeds."""

import math

import numpy as np
import pytest
import torch

from thinkgate.errors import InvalidRequestError
from thinkgate.params import validate_chat
from thinkgate.protocol import ChatCompletionRequest
from thinkgate.sampling.params import SamplingParams
from thinkgate.sampling.sampler import (
    Sampler,
    SamplingRow,
    filter_min_p,
    filter_top_a,
    filter_top_k,
    filter_top_p,
)


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x[np.isfinite(x)])
    e = np.where(np.isfinite(x), np.exp(x - m), 0.0)
    return e / e.sum()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


CONFIDENT = [5.0, 2.0, 1.5, 1.0, 0.0, -1.0]  # p_max ~ 0.89
FLAT = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # p_max ~ 0.20


@pytest.mark.parametrize("logits", [CONFIDENT, FLAT])
def test_top_k_top_p_min_p_top_a_against_numpy(logits):
    t = torch.tensor([logits])
    p = np_softmax(logits)
    assert kept(filter_top_k(t, torch.tensor([3]))) == set(np.argsort(-p)[:3].tolist())
    # top_p: smallest prefix of the sorted tokens whose mass reaches 0.9
    order = np.argsort(-p)
    cum = np.cumsum(p[order])
    n = int(np.searchsorted(cum, 0.9) + 1)
    assert kept(filter_top_p(t, torch.tensor([0.9]))) == set(order[:n].tolist())
    assert kept(filter_min_p(t, torch.tensor([0.3]))) == {i for i in range(6) if p[i] >= 0.3 * p.max()}
    assert kept(filter_top_a(t, torch.tensor([0.3]))) == {i for i in range(6) if p[i] >= 0.3 * p.max() ** 2}


def test_top_a_and_min_p_differ_by_confidence():
    # Confident: top_a's threshold (0.2 * 0.89^2 = 0.16) is close to min_p's (0.2 * 0.89 = 0.18): same set.
    # Flat: top_a's threshold shrinks with p_max^2 (0.008) and keeps all; min_p (0.04) keeps all too, but at
    # a stronger setting they part: min_p=0.9 keeps 2 tokens, top_a=0.9 keeps all 6.
    conf, flat = torch.tensor([CONFIDENT]), torch.tensor([FLAT])
    assert kept(filter_top_a(conf, torch.tensor([0.2]))) == kept(filter_min_p(conf, torch.tensor([0.2]))) == {0}
    assert len(kept(filter_min_p(flat, torch.tensor([0.9])))) == 2
    assert len(kept(filter_top_a(flat, torch.tensor([0.9])))) == 6


def _row(**kw):
    prompt = kw.pop("prompt", [])
    out = kw.pop("out", [])
    return SamplingRow(SamplingParams(**kw).resolved(), prompt, out, None)


def test_penalties_against_numpy():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    s = Sampler(5, 5)
    # frequency/presence count generated tokens only; repetition counts prompt + generated
    row = _row(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.5, prompt=[3], out=[0, 0, 1])
    work = logits.clone()
    s._apply_penalties(work, [row])
    exp = np.array([2.0, -1.0, 0.5, -3.0, 1.0])
    counts = np.array([2, 1, 0, 0, 0])
    exp = exp - 0.5 * counts - 0.25 * (counts > 0)
    seen = np.array([1, 1, 0, 1, 0], bool)
    exp = np.where(seen, np.where(exp > 0, exp / 1.5, exp * 1.5), exp)
    np.testing.assert_allclose(work[0].numpy(), exp, rtol=1e-6)


def test_repetition_penalty_on_negative_logits_pushes_them_down():
    logits = torch.tensor([[-2.0, 3.0, 0.0]])
    s = Sampler(3, 3)
    s._apply_penalties(logits, [_row(repetition_penalty=2.0, prompt=[0, 1, 2])])
    assert logits[0].tolist() == [-4.0, 1.5, 0.0]


def test_temperature_then_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0]] * 2)
    s = Sampler(3, 3)
    res = s(logits, [_row(temperature=0), _row(temperature=0.01, seed=None)])
    assert res.token_ids == [1, 1]


def _model_logits(engine):
    from thinkgate.engine.scheduler import ScheduledBatch

    prompt = engine.tokenizer.encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    captured = {}
    orig = engine.runner.sampler.__call__

    class Spy:
        def __call__(self, logits, rows):
            captured["logits"] = logits.clone()
            return orig(logits, rows)

    engine.runner.sampler = Spy()
    try:
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    finally:
        engine.runner.sampler = Sampler(engine.loaded.config.vocab_size, engine.tokenizer.vocab_size)
    assert ScheduledBatch
    return prompt, captured["logits"]


def test_chi_square_on_tiny_model_distribution(engine_factory):
    eng = engine_factory("qwen3")
    _, logits = _model_logits(eng)
    logits = logits * 40  # sharpen the random model's near-uniform distribution into a few likely tokens
    k = 8
    top_vals, top_ids = logits[0].topk(k)
    expected_p = np_softmax(top_vals.numpy())
    torch.manual_seed(1234)
    n = 2000
    rows = [_row(temperature=1.0, top_k=k) for _ in range(n)]
    res = Sampler(logits.shape[1], logits.shape[1])(logits.expand(n, -1).contiguous(), rows)
    counts = np.array([res.token_ids.count(i) for i in top_ids.tolist()])
    assert counts.sum() == n  # nothing outside top_k
    exp = expected_p * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    chi2 = float(((obs - ex) ** 2 / ex).sum())
    dof = len(obs) - 1
    # Wilson-Hilferty approximation of the chi-square 0.999 quantile.
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit, obs, ex)


def test_top_k1_min_p1_and_confident_top_a1_equal_greedy(engine_factory):
    eng = engine_factory("qwen3")
    prompt, logits = _model_logits(eng)
    greedy = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    for kw in ({"top_k": 1}, {"min_p": 1.0}):
        out = eng.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, **kw))[0]
        assert out == greedy, kw
    # top_a=1 keeps tokens with p >= p_max^2: greedy exactly when p_max^2 exceeds every other p, i.e. on a
    # confident distribution (on a flat one it keeps many tokens, by its definition).
    conf = torch.tensor([CONFIDENT] * 50)
    torch.manual_seed(0)
    res = Sampler(6, 6)(conf, [_row(temperature=1.0, top_a=1.0) for _ in range(50)])
    assert set(res.token_ids) == {0}


def test_seed_is_batch_invariant(engine_factory):
    eng = engine_factory("qwen3")
    prompt = eng.tokenizer.encode("Once upon a time")
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=16, ignore_eos=True)
    alone = eng.generate([prompt], p)[0]
    others = [SamplingParams(temperature=t, top_k=k, seed=s, max_tokens=10 + s, ignore_eos=True,
                             presence_penalty=0.5 * (s % 2)) for t, k, s in
              [(0.7, 5, 1), (1.3, 0, 2), (0.0, 0, 3), (1.0, 50, 4), (0.9, 0, 5), (1.5, 3, 6), (0.5, 0, 7), (1.0, 0, 8)]]
    prompts = [eng.tokenizer.encode(f"other prompt number {i}") for i in range(8)]
    batch = eng.generate(prompts[:4] + [prompt] + prompts[4:], others[:4] + [p] + others[4:])
    assert batch[4] == alone
    assert eng.generate([prompt], p)[0] == alone
    p2 = SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=16, ignore_eos=True)
    assert eng.generate([prompt], p2)[0] != alone


def test_logit_bias_forces_and_bans(engine_factory):
    eng = engine_factory("qwen3")
    prompt = eng.tokenizer.encode("hello")
    forced = eng.tokenizer.token_id("<think>")
    out = eng.generate([prompt], SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True,
                                                logit_bias={forced: 100}))[0]
    assert out == [forced] * 4
    greedy = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0][0]
    banned = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=1, logit_bias={greedy: -100}))[0][0]
    assert banned != greedy
    # The API checks ids against the vocabulary (a 400 naming logit_bias); the engine asserts it too.
    with pytest.raises(ValueError, match="outside the vocabulary") as e:
        eng.add_request("bad", prompt, SamplingParams(logit_bias={eng.tokenizer.vocab_size + 5: 1.0}))
    assert not isinstance(e.value, InvalidRequestError)


def _run(eng, prompt, params):
    eng.add_request("stop-test", prompt, params)
    text, last = "", None
    while eng.has_unfinished():
        for o in eng.step():
            text += o.text
            last = o
    return text, last


def test_stop_string_across_token_boundary(engine_factory):
    eng = engine_factory("qwen3")
    prompt = eng.tokenizer.encode("story:")
    ids = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    full, _ = _run(eng, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    # Pick a stop string that straddles the boundary between two generated tokens.
    pieces = [eng.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    for i in range(3, len(ids)):
        a, b = pieces[i], pieces[i + 1]
        if len(a) >= 2 and len(b) - len(a) >= 2 and b.startswith(a):
            stop = a[-2:] + b[len(a):len(a) + 2]
            if "\ufffd" not in stop and stop.strip() == stop:
                break
    else:
        pytest.fail("no token boundary with printable text on both sides")
    assert stop in full
    text, last = _run(eng, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))
    assert text == full[: full.index(stop)]
    assert last.finish_reason.value == "stop_sequence" and last.stop_reason == stop
    # Four stop strings at once: the earliest match wins.
    stops = ["zzzz-never", full[10:13], full[5:8], "qqqq-never"]
    text, last = _run(eng, prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stops))
    first = min(full.find(s) for s in stops if s in full)
    assert text == full[:first]


def test_generation_config_defaults_apply(engine_factory):
    eng = engine_factory("qwen3")
    assert eng.loaded.generation_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    seq = eng.make_sequence("d", [1, 2, 3], SamplingParams(top_k=5))
    assert (seq.params.temperature, seq.params.top_p, seq.params.top_k) == (0.6, 0.95, 5)


@pytest.mark.parametrize("kw,param", [
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"top_a": -0.1}, "top_a"), ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"n": 9}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logit_bias": {1: 101}}, "logit_bias"), ({"temperature": float("nan")}, "temperature"),
])
def test_invalid_params_name_the_parameter(kw, param):
    kw = {k: ({str(t): v for t, v in val.items()} if k == "logit_bias" else val) for k, val in kw.items()}
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **kw)
    with pytest.raises(InvalidRequestError) as e:
        validate_chat(req)
    assert e.value.param == param and param in e.value.message


@pytest.mark.parametrize("scale", [8.0, 0.01])  # peaked: nucleus inside the candidates; flat: full-sort fallback
def test_top_p_samples_stay_in_the_numpy_nucleus(scale):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 5000, generator=g) * scale
    p = np_softmax(logits[0].numpy())
    order = np.argsort(-p)
    n = int(np.searchsorted(np.cumsum(p[order]), 0.8) + 1)
    nucleus = set(order[:n].tolist())
    rows = [_row(temperature=1.0, top_p=0.8) for _ in range(400)]
    torch.manual_seed(5)
    res = Sampler(5000, 5000)(logits.expand(400, -1).contiguous(), rows)
    assert set(res.token_ids) <= nucleus
    assert len(set(res.token_ids)) > 1


def test_top_k_path_matches_filter_semantics():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3000, generator=g) * 3
    rows = [_row(temperature=0.8, top_k=7, top_p=0.7, min_p=0.1) for _ in range(300)]
    expect = filter_min_p(filter_top_p(filter_top_k(logits / 0.8, torch.tensor([7])), torch.tensor([0.7])),
                          torch.tensor([0.1]))
    torch.manual_seed(6)
    res = Sampler(3000, 3000)(logits.expand(300, -1).contiguous(), rows)
    assert set(res.token_ids) <= kept(expect)


def test_the_draw_follows_the_distribution_never_picks_zero_mass_and_a_seed_repeats():
    # the inverse-CDF draw itself (Sampler._draw), on a full-width row with most of its mass zero
    probs = torch.zeros(2, 1000)
    probs[:, [0, 3, 500, 999]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs[1] *= 7.0  # an unnormalised row draws the same way
    torch.manual_seed(11)
    n = 20000
    draws = torch.stack([Sampler._draw(probs, [_row(temperature=1.0)] * 2) for _ in range(n)])
    assert set(draws.unique().tolist()) <= {0, 3, 500, 999}
    for r in range(2):
        obs = torch.bincount(draws[:, r], minlength=1000)[[0, 3, 500, 999]].double()
        ex = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) * n
        chi2 = float(((obs - ex) ** 2 / ex).sum())
        assert chi2 < 16.3, (chi2, obs)  # chi-square, 3 degrees of freedom, 0.999 quantile
    seeded = [SamplingRow(SamplingParams(temperature=1.0, seed=5).resolved(), [1], [], torch.Generator().manual_seed(5))
              for _ in range(2)]
    first = [int(Sampler._draw(probs[:1], [seeded[0]])) for _ in range(50)]
    again = [int(Sampler._draw(probs[:1], [seeded[1]])) for _ in range(50)]
    assert first == again and len(set(first)) > 1
