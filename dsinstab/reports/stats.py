"""Spread over seeds: the median and a distribution-free interval for it, shared by every report.

With a handful of seeds a normal interval would assume what three values cannot show; the order
statistics need no assumption: [x_(k), x_(n+1-k)] covers the median with probability
1 - 2·P(Binom(n, 1/2) < k), whatever the distribution.
"""

from __future__ import annotations

from math import comb

LEVEL = 0.95


def median_interval(
    values: list[float], level: float = LEVEL
) -> tuple[float | None, float | None, float | None, float]:
    """(median, low, high, coverage): the sample median and the order-statistic interval
    [x_(k), x_(n+1-k)] with the largest k whose coverage 1 - 2·P(Binom(n, 1/2) < k) is at least
    ``level`` (k = 1, the whole range, when none is)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return None, None, None, 0.0
    mid = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    k, coverage = 1, 1 - 2 * 0.5**n
    for j in range(1, n // 2 + 1):
        cov = 1 - 2 * sum(comb(n, i) for i in range(j)) * 0.5**n
        if cov >= level:
            k, coverage = j, cov
    return mid, xs[k - 1], xs[n - k], coverage


def spread(values: list[float]) -> str:
    """``median [low, high] (coverage)`` of ``values``, for a table cell; ``-`` for none."""
    med, lo, hi, cov = median_interval(values)
    if med is None:
        return "-"
    return f"{med:.4g} [{lo:.4g}, {hi:.4g}] ({cov:.0%})"
