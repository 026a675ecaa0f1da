"""Welch's t-test and the one-sample t-test, with Student's t distribution computed here.

The report decides a claim only when a difference is outside the seed spread (see ``rule`` in
``reference.yaml``). No statistics package is needed: the two-sided p-value of Student's t with
``df`` degrees of freedom is the regularized incomplete beta function
``I_{df / (df + t^2)}(df / 2, 1 / 2)``, evaluated by its continued fraction (modified Lentz).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

_TINY = 1e-300
_EPS = 1e-15


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b): 1 / (1 + d1 / (1 + d2 / (1 + ...))), modified Lentz."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    f = d
    for m in range(1, 10_000):
        # even term d_2m, then odd term d_2m+1
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            f *= c * d
        if abs(c * d - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0 (got {a}, {b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1 (got {x})")
    if x in (0.0, 1.0):
        return x
    log_front = (a * math.log(x) + b * math.log1p(-x)
                 - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
    # the fraction converges fast below the mean of the beta density; above it use the symmetry
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (df > 0, need not be whole)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0 (got {df})")
    if math.isinf(t):
        return 0.0
    return min(1.0, betainc(df / 2.0, 0.5, df / (df + t * t)))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    half = t_two_sided_p(t, df) / 2.0
    return 1.0 - half if t > 0 else half


@dataclass
class TTest:
    """A t-test of ``estimate`` (a difference of means, or a mean minus a value) against 0."""

    estimate: float
    t: float  # +-inf when no side has any spread and the estimate is not 0; nan when it is 0
    df: float | None  # None when there is no spread
    p: float  # two-sided

    @property
    def spread(self) -> bool:
        return self.df is not None


def _result(estimate: float, se2: float, df: float | None) -> TTest:
    if se2 <= 0.0 or df is None:
        # every seed gave the same value on both sides: any difference is outside the spread
        if estimate == 0.0:
            return TTest(estimate, math.nan, None, 1.0)
        return TTest(estimate, math.copysign(math.inf, estimate), None, 0.0)
    t = estimate / math.sqrt(se2)
    return TTest(estimate, t, df, t_two_sided_p(t, df))


def welch(a: Sequence[float], b: Sequence[float], offset: float = 0.0) -> TTest:
    """Welch's t-test of mean(a) - mean(b) - offset against 0 (unequal variances, 2+ values)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs 2 values per side (got {len(a)} and {len(b)})")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    estimate = statistics.fmean(a) - statistics.fmean(b) - offset
    se2 = va + vb
    # Welch-Satterthwaite degrees of freedom
    df = se2 * se2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1)) if se2 > 0 else None
    return _result(estimate, se2, df)


def one_sample(a: Sequence[float], value: float) -> TTest:
    """The one-sample t-test of mean(a) - value against 0 (2+ values)."""
    if len(a) < 2:
        raise ValueError(f"a one-sample t-test needs 2 values (got {len(a)})")
    se2 = statistics.variance(a) / len(a)
    return _result(statistics.fmean(a) - value, se2, len(a) - 1.0 if se2 > 0 else None)
