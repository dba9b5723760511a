"""Live approval statistics: intervals for one version, and the decisions between two.

Pure Python (no torch, no database): the server shows these numbers, the worker acts on them.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion; None without observations.

    Wilson (1927); preferred over the Wald interval because it stays inside [0, 1] and keeps its
    coverage at small n and extreme proportions (Brown, Cai & DasGupta 2001).
    """
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
