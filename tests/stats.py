"""Frequency checks with a stated false-alarm rate, for the samplers' statistical tests.

The bound is Chernoff's for a binomial count ``X ~ B(n, p)``: ``P(X >= n q) <= exp(-n KL(q || p))`` for ``q > p``
and likewise below ``p``, where ``KL`` is the Kullback-Leibler divergence of two Bernoulli laws. It holds for every
``n`` and ``p`` (no normal approximation), needs no scipy, and is split over the cells of a check by the union bound,
so a correct sampler fails a check with probability at most ``alpha``. The tests also fix their seeds, so a run is
deterministic; ``alpha`` says how unlucky a seed would have to be for a correct sampler to fail.
"""

from __future__ import annotations

import math

import numpy as np

#: False-alarm rate of one frequency check (all its cells together).
ALPHA = 1e-6


def _kl(q: float, p: float) -> float:
    """KL divergence of Bernoulli(q) from Bernoulli(p), ``0 < p < 1``."""
    out = 0.0
    if q > 0:
        out += q * math.log(q / p)
    if q < 1:
        out += (1 - q) * math.log((1 - q) / (1 - p))
    return out


def chernoff_interval(p: float, n: int, alpha: float) -> tuple[float, float]:
    """``(lo, hi)`` such that the frequency of a ``B(n, p)`` count falls outside ``[lo, hi]`` with probability at
    most ``alpha`` (each side gets ``alpha / 2``)."""
    if p <= 0 or p >= 1:
        return p, p
    level = math.log(2 / alpha) / n

    def solve(inside: float, outside: float) -> float:
        """The point between ``inside`` (KL below the level) and ``outside`` where the KL reaches the level."""
        if _kl(outside, p) <= level:
            return outside
        for _ in range(100):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if _kl(mid, p) <= level else (inside, mid)
        return inside

    return solve(p, 0.0), solve(p, 1.0)


def assert_counts_follow(counts, probabilities, alpha: float = ALPHA, rounding: float = 0.0) -> None:
    """Every cell's frequency inside its Chernoff interval; false-alarm rate ``alpha`` for all cells together.

    Args:
        counts: observed counts per cell (their sum is the number of draws).
        probabilities: expected probability per cell (a cell of probability 0 must have count 0).
        alpha: false-alarm rate of the whole check (split evenly over the cells).
        rounding: extra slack on each side, for frequencies read back from printed, rounded values.
    """
    counts = np.asarray(counts, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n = int(round(counts.sum()))
    assert counts.shape == probabilities.shape and n > 0
    frequencies = counts / n
    bounds = [chernoff_interval(float(p), n, alpha / len(counts)) for p in probabilities]
    outside = [
        (index, round(f, 4), round(float(p), 4), (round(lo, 4), round(hi, 4)))
        for index, (f, p, (lo, hi)) in enumerate(zip(frequencies, probabilities, bounds))
        if not lo - rounding - 1e-12 <= f <= hi + rounding + 1e-12
    ]
    assert not outside, f"(cell, frequency, expected, interval) outside at alpha={alpha}: {outside}"
