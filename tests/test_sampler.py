"""The sampler's token choice: the right distribution, top-k / top-p / temperature, reproducible seeds."""

from __future__ import annotations

import math

import torch

from train_service.sampler import SamplingOptions, _choose


def draw(logits: list[float], n: int = 20000, **params) -> torch.Tensor:
    rows = torch.tensor([logits] * n)
    return _choose(rows, SamplingOptions(max_tokens=1, **params), torch.Generator().manual_seed(0))


def frequencies(picks: torch.Tensor, size: int) -> list[float]:
    return (torch.bincount(picks, minlength=size).float() / len(picks)).tolist()


def test_draws_follow_the_softmax_and_never_pick_impossible_tokens():
    probs = [0.5, 0.3, 0.2, 0.0, 0.0]
    logits = [math.log(p) if p else float("-inf") for p in probs]
    freq = frequencies(draw(logits), 5)
    for f, p in zip(freq, probs):
        assert abs(f - p) < 0.015
    assert freq[3] == freq[4] == 0.0


def test_temperature_top_k_top_p():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0]
    assert set(draw(logits, 2000, top_k=2).tolist()) == {0, 1}
    # softmax(logits) = [0.56, 0.21, 0.13, 0.08, 0.03]: the smallest set reaching 0.7 is {0, 1}
    assert set(draw(logits, 2000, top_p=0.7).tolist()) == {0, 1}
    assert set(draw(logits, 50, temperature=0.0).tolist()) == {0}
    hot, cold = frequencies(draw(logits, temperature=2.0), 5), frequencies(draw(logits, temperature=0.5), 5)
    assert cold[0] > 0.8 > hot[0]


def test_same_seed_same_draws():
    logits = torch.randn(4, 1000)
    params = SamplingOptions(max_tokens=1)
    a = _choose(logits, params, torch.Generator().manual_seed(5))
    b = _choose(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
