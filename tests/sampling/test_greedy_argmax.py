"""The CPU greedy argmax (csrc/greedy.cpp) against torch.argmax, and the sampler taking it."""

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
