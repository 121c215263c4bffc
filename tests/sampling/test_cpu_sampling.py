"""The sampler's CPU kernels (csrc/sampling.cpp) against torch, and the sampler taking them."""

import pytest
import torch

from thinkgate.layers import cpu_kernels
from thinkgate.sampling import sampler as sampler_mod
from thinkgate.sampling.params import SamplingParams
from thinkgate.sampling.sampler import Sampler, SamplingRow

ops = cpu_kernels.load_ggml()
pytestmark = pytest.mark.skipif(ops is None, reason="the GGUF kernels' module needs a C++ compiler")


def _torch(x: torch.Tensor, n: int) -> torch.Tensor:
    return x[:, :n].argmax(dim=-1)


@pytest.mark.parametrize("v", [1, 7, 8, 9, 64, 1001, 151936])
def test_matches_torch_on_random_rows_of_any_length(v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(5, v, generator=g)
    for n in {1, v // 2 or 1, v}:
        assert torch.equal(ops.greedy_argmax(x, n), _torch(x, n)), (v, n)


def test_ties_give_the_first_position_and_padding_is_never_chosen():
    x = torch.full((3, 100), -5.0)
    x[0, [10, 40, 95]] = 2.0  # a tie: the first wins
    x[1, [3, 97]] = 7.0       # the larger one sits in the padding past n_valid = 90
    x[1, 50] = 1.0
    x[2] = float("-inf")      # nothing but -inf: position 0, as torch
    got = ops.greedy_argmax(x, 90)
    assert got.tolist() == [10, 3, 0] == _torch(x, 90).tolist()


def test_a_nan_wins_as_in_torch():
    x = torch.randn(2, 300)
    x[0, 123] = float("nan")
    x[0, 200] = float("nan")
    x[1, 299] = float("nan")  # in the scalar tail
    assert ops.greedy_argmax(x, 300).tolist() == [123, 299] == _torch(x, 300).tolist()


def test_strided_rows_and_bad_input():
    x = torch.randn(4, 130)[:, :100]  # rows 130 apart
    assert torch.equal(ops.greedy_argmax(x, 100), _torch(x, 100))
    with pytest.raises(RuntimeError, match="n_valid"):
        ops.greedy_argmax(x, 101)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.greedy_argmax(x.double(), 10)


def test_the_sampler_takes_it_for_greedy_rows(monkeypatch):
    calls = []
    real = ops.greedy_argmax

    class Spy:
        def greedy_argmax(self, x, n):
            calls.append(n)
            return real(x, n)

    monkeypatch.setattr(cpu_kernels, "loaded_ggml", lambda: Spy())
    s = Sampler(vocab_size=64, valid_vocab=50)
    logits = torch.randn(3, 64)
    logits[:, 55] = 100.0  # padding past the vocabulary: never sampled
    rows = [SamplingRow(SamplingParams(temperature=0).resolved(), [1], [], None) for _ in range(3)]
    got = s.sample_ids(logits, rows)
    assert calls == [50] and torch.equal(got, logits[:, :50].argmax(dim=-1))
    assert sampler_mod.greedy_ids(logits.double(), 50).tolist() == got.tolist()  # other dtypes: torch's


def _inverse_cdf(x: torch.Tensor, n: int, u: float) -> int:
    p = torch.softmax(x[:n].double(), dim=0)
    return int(torch.searchsorted(p.cumsum(0), torch.tensor([u * float(p.sum())], dtype=torch.float64)))


def test_the_softmax_draw_is_the_inverse_cdf_of_the_softmax():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1003, generator=g) * 2
    x[:, 5] = float("-inf")
    us = (1.0 - torch.rand(400, 3, dtype=torch.float64, generator=g))
    for row_u in us:
        got = ops.sample_softmax(x, 1000, row_u).tolist()
        for r in range(3):
            want = _inverse_cdf(x[r], 1000, float(row_u[r]))
            if got[r] != want:  # only where u falls on a boundary, to rounding
                p = torch.softmax(x[r, :1000].double(), dim=0).cumsum(0)
                assert abs(float(p[min(got[r], want)]) - float(row_u[r])) < 1e-6, (r, got[r], want)


def test_the_softmax_draw_follows_the_distribution_and_never_draws_a_banned_or_padded_token():
    x = torch.full((1, 40), float("-inf"))
    x[0, [2, 9, 17, 33]] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x[0, 38] = 50.0  # past n_valid = 36: never drawn
    n = 20000
    u = 1.0 - torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    draws = torch.cat([ops.sample_softmax(x, 36, u[i:i + 1]) for i in range(n)])
    assert set(draws.unique().tolist()) <= {2, 9, 17, 33}
    obs = torch.bincount(draws, minlength=40)[[2, 9, 17, 33]].double()
    ex = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) * n
    assert float(((obs - ex) ** 2 / ex).sum()) < 16.3  # chi-square, 3 degrees of freedom, 0.999 quantile


def test_the_softmax_draw_edge_rows_and_bad_input():
    x = torch.randn(3, 20)
    x[0, 7] = float("nan")
    x[1] = float("-inf")
    x[2, 11] = 1e30  # all mass on one token
    assert ops.sample_softmax(x, 20, torch.full((3,), 0.5, dtype=torch.float64)).tolist() == [7, 0, 11]
    with pytest.raises(RuntimeError, match="u must be"):
        ops.sample_softmax(x, 20, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float64"):
        ops.sample_softmax(x, 20, torch.full((3,), 0.5))


def test_the_sampler_draws_unfiltered_rows_in_cpp_and_filtered_ones_in_torch(monkeypatch):
    calls = []
    real = ops

    class Spy:
        def greedy_argmax(self, x, n):
            return real.greedy_argmax(x, n)

        def sample_softmax(self, x, n, u):
            calls.append(x.shape[0])
            return real.sample_softmax(x, n, u)

    monkeypatch.setattr(cpu_kernels, "loaded_ggml", lambda: Spy())
    s = Sampler(vocab_size=64, valid_vocab=50)
    logits = torch.randn(4, 64)
    rows = [SamplingRow(SamplingParams(temperature=1.0).resolved(), [1], [], None),
            SamplingRow(SamplingParams(temperature=0.5, seed=3).resolved(), [1], [], torch.Generator().manual_seed(3)),
            SamplingRow(SamplingParams(temperature=1.0, min_p=0.1).resolved(), [1], [], None),
            SamplingRow(SamplingParams(temperature=0).resolved(), [1], [], None)]
    got = s.sample_ids(logits, rows).tolist()
    assert calls == [2]  # the two unfiltered rows; the min_p row in torch; the greedy row by argmax
    assert all(0 <= t < 50 for t in got) and got[3] == int(logits[3, :50].argmax())
    # a seeded row draws the same token in the C++ path as in torch's (one uniform from its generator)
    seeded = SamplingParams(temperature=0.8, seed=4).resolved()
    a = s.sample_ids(logits[:1], [SamplingRow(seeded, [1], [], torch.Generator().manual_seed(4))]).tolist()
    monkeypatch.setattr(cpu_kernels, "loaded_ggml", lambda: None)
    b = s.sample_ids(logits[:1], [SamplingRow(seeded, [1], [], torch.Generator().manual_seed(4))]).tolist()
    assert a == b
