"""Token choice on the host: greedy, or sampled with temperature, top-k and top-p from a seeded generator.

Sampling happens on the host from the logits a backend returns, so backends with bit-identical logits (the
golden model and the RTL) give the same tokens for the same seed. The order of the filters is transformers':
temperature, then top-k, then top-p over what top-k kept.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Sampler"]


class Sampler:
    """Chooses a token from a logits vector.

    Parameters
    ----------
    temperature : float
        0 chooses greedily (the largest logit); above 0 samples from ``softmax(logits / temperature)``.
    top_k : int
        Keep only the *top_k* largest logits (ties broken towards the lower token id); 0 keeps all.
    top_p : float
        Keep the smallest set of most probable tokens whose probability reaches *top_p*, in (0, 1].
    seed : int, optional
        Seed of the generator (numpy's PCG64): the same seed and logits give the same tokens. None draws
        fresh entropy.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature {temperature!r} must be a finite number >= 0 (0 is greedy)")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top-k {top_k!r} must be an integer >= 0 (0 keeps every token)")
        if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top-p {top_p!r} must be in (0, 1]")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed {seed!r} must be an integer >= 0")
        self.temperature, self.top_k, self.top_p, self.seed = float(temperature), int(top_k), float(top_p), seed
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probabilities(self, logits) -> np.ndarray:
        """The distribution a token is drawn from: softmax(logits / T), truncated by top-k and top-p, renormalized."""
        x = np.asarray(logits, np.float64)
        if x.ndim != 1 or not x.size:
            raise ValueError(f"logits must be a non-empty vector, got shape {x.shape}")
        if self.greedy:
            p = np.zeros_like(x)
            p[int(np.argmax(x))] = 1.0
            return p
        order = np.argsort(-x, kind="stable")  # most probable first; equal logits in token order
        if self.top_k:
            order = order[: self.top_k]
        z = (x[order] - x[order[0]]) / self.temperature
        w = np.exp(z)
        w /= w.sum()
        if self.top_p < 1.0:
            before = np.cumsum(w) - w  # probability of the tokens ahead of each one
            keep = int(np.count_nonzero(before < self.top_p))
            order, w = order[:keep], w[:keep] / w[:keep].sum()
        p = np.zeros_like(x)
        p[order] = w
        return p

    def __call__(self, logits) -> int:
        """One token: the argmax when greedy, else one draw (one uniform number) from :meth:`probabilities`."""
        if self.greedy:
            return int(np.argmax(np.asarray(logits, np.float64)))
        p = self.probabilities(logits)
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(p) - 1))
