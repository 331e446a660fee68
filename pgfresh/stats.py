"""Interval estimates shared by the stages that measure: the training gate and the arena.

`wilson(k, n)`: the 95% Wilson score interval of a proportion, right at k = 0 and k = n and on
the small samples a gate or a class of questions often has (the normal approximation is not).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval [lo, hi] of k successes in n trials (None for n = 0)."""
    if not n:
        return None
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # At k = 0 or k = n one bound is exactly 0 or 1 (floating point would leave 1e-16 off).
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]
