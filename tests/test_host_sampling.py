"""The host's token sampler: its distribution is softmax(logits / T) truncated by top-k and top-p, its draws follow
that distribution (chi-square over many draws), and a seed fixes the tokens."""

import math

import numpy as np
import pytest
from kvoverlay.host.sampling import Sampler

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, -0.2, -1.0, 0.9, 2.1, -3.0, 0.0])
DRAWS = 20_000


def softmax(x, t):
    z = np.exp((x - x.max()) / t)
    return z / z.sum()


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper 0.1% point of chi-square with *df* degrees of freedom (Wilson-Hilferty; z is the normal 0.1% point)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts, p):
    keep = p > 0
    expected = DRAWS * p[keep]
    return float(np.sum((counts[keep] - expected) ** 2 / expected)), int(keep.sum()) - 1


def draw_counts(sampler, logits=LOGITS):
    return np.bincount([sampler(logits) for _ in range(DRAWS)], minlength=len(logits))


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_draws_follow_softmax_over_temperature(t):
    counts = draw_counts(Sampler(temperature=t, seed=11))
    stat, df = chi2(counts, softmax(LOGITS, t))
    assert stat < chi2_critical(df), (stat, counts)
    # the same test rejects the untempered distribution: it has the power to fail
    wrong, _ = chi2(counts, softmax(LOGITS, 1.0 if t != 1.0 else 0.5))
    assert wrong > chi2_critical(df)


def test_top_k_keeps_the_k_largest_renormalized():
    s = Sampler(temperature=0.8, top_k=3, seed=1)
    p = s.probabilities(LOGITS)
    top = np.argsort(-LOGITS)[:3]
    want = np.zeros_like(p)
    want[top] = softmax(LOGITS[top], 0.8)
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=0)
    counts = draw_counts(s)
    assert set(np.flatnonzero(counts)) <= set(top)
    stat, df = chi2(counts, p)
    assert stat < chi2_critical(df)


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.8, 0.95, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    s = Sampler(temperature=1.3, top_p=top_p, seed=2)
    p = s.probabilities(LOGITS)
    full = softmax(LOGITS, 1.3)
    kept = np.flatnonzero(p)
    order = np.argsort(-full)
    assert set(kept) == set(order[: len(kept)]), "top-p keeps the most probable tokens"
    mass = full[kept].sum()
    assert mass >= top_p - 1e-12
    assert mass - full[kept].min() < top_p, "one token fewer would not reach top_p"
    np.testing.assert_allclose(p[kept], full[kept] / mass, rtol=1e-12)
    counts = draw_counts(s)
    assert set(np.flatnonzero(counts)) <= set(kept)
    if len(kept) > 1:
        stat, df = chi2(counts, p)
        assert stat < chi2_critical(df)


def test_top_k_then_top_p():
    s = Sampler(temperature=1.0, top_k=4, top_p=0.6)
    p = s.probabilities(LOGITS)
    top4 = np.argsort(-LOGITS)[:4]
    q = softmax(LOGITS[top4], 1.0)  # sorted most probable first
    keep = int(np.count_nonzero(np.cumsum(q) - q < 0.6))
    want = np.zeros_like(p)
    want[top4[:keep]] = q[:keep] / q[:keep].sum()
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=0)


def test_greedy_is_argmax_and_draws_nothing():
    s = Sampler(seed=5)
    state = s.rng.bit_generator.state
    assert s.greedy and s(LOGITS) == int(np.argmax(LOGITS))
    assert s.rng.bit_generator.state == state


def test_seed_fixes_the_tokens():
    draws = [[s(LOGITS) for _ in range(50)] for s in (Sampler(0.9, 0, 0.9, 7), Sampler(0.9, 0, 0.9, 7))]
    assert draws[0] == draws[1]
    assert draws[0] != [Sampler(0.9, 0, 0.9, 8)(LOGITS) for _ in range(50)]


@pytest.mark.parametrize("kwargs,needle", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -1}, "top-k"), ({"top_k": 1.5}, "top-k"), ({"top_p": 0.0}, "top-p"), ({"top_p": 1.01}, "top-p"),
    ({"seed": -3}, "seed"),
])
def test_bad_parameters(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Sampler(**kwargs)
