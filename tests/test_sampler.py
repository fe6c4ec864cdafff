"""coordinator.generate.Sampler: the distribution it draws from, the nucleus it keeps, its seeding."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from coordinator.generate import Sampler

LOGITS = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, -30.0])


def test_draws_follow_the_softmax() -> None:
    """20k draws at temperature 0.8: every token's frequency within 5 standard errors of its probability."""
    n, temp = 20_000, 0.8
    sampler = Sampler(temp, 1.0, seed=1)
    counts = Counter(sampler(LOGITS) for _ in range(n))
    probs = torch.softmax(LOGITS.double() / temp, dim=-1)
    for token, p in enumerate(probs.tolist()):
        stderr = (p * (1 - p) / n) ** 0.5
        assert abs(counts[token] / n - p) <= 5 * stderr + 1e-9, (token, counts[token] / n, p)


@pytest.mark.parametrize(("top_p", "kept"), [(0.5, {2}), (0.7, {1, 2}), (0.8, {1, 2, 4}), (1.0, set(range(6)))])
def test_nucleus_keeps_the_smallest_prefix_reaching_top_p(top_p: float, kept: set[int]) -> None:
    """probs 0.563 / 0.207 / 0.126 / 0.076 / 0.028 (tokens 2, 1, 4, 0, 3): top_p 0.7 keeps 2 and 1 (the mass
    before token 4 is 0.77)."""
    sampler = Sampler(1.0, top_p, seed=3)
    assert {sampler(LOGITS) for _ in range(1000)} == kept - {5}  # token 5 (p ~ 1e-14) is never drawn


def test_nucleus_beyond_the_first_topk() -> None:
    """A flat distribution over 1000 tokens: top_p 0.9 needs 900 of them, more than the first top-k looks at."""
    sampler = Sampler(1.0, 0.9, seed=0)
    probs = torch.full((1000,), 1e-3, dtype=torch.float64)
    kept = sampler._nucleus(probs)
    assert int((kept > 0).sum()) == 900 > Sampler.NUCLEUS_FIRST


def test_seeded_and_degenerate_cases() -> None:
    logits = torch.randn(32000, generator=torch.Generator().manual_seed(0))
    draws = [Sampler(1.0, 0.95, seed=7)(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # a fresh sampler with the same seed draws the same token
    seq_a, seq_b = Sampler(1.0, 1.0, seed=9), Sampler(1.0, 1.0, seed=9)
    assert [seq_a(logits) for _ in range(20)] == [seq_b(logits) for _ in range(20)]
    assert Sampler(1e-320, 1.0, seed=1)(logits) == int(logits.argmax())  # a tiny temperature is argmax, no nan
    assert Sampler(0.0, 1.0, seed=1)(logits) == int(logits.argmax())
    one_hot = torch.full((8,), -float("inf"))
    one_hot[5] = 0.0
    assert {Sampler(1.0, 1.0, seed=s)(one_hot) for s in range(20)} == {5}
