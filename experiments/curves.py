"""Training curves from the runs' TensorBoard scalars, averaged over seeds."""

from __future__ import annotations

import fnmatch
import warnings

import numpy as np
from rundirs import Run

Curve = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, mean, std over seeds (0 with one seed)


def tags_of(run: Run, tag: str) -> list[str]:
    """The run's tags that ``tag`` names: "a|b" is the first present, "error/*" every match."""
    if "*" in tag:
        return sorted(t for t in run.scalars if fnmatch.fnmatch(t, tag))
    return next(([t] for t in tag.split("|") if t in run.scalars), [])


def mean_curve(runs: list[Run], tag: str, steps: bool = False) -> Curve | None:
    """Mean and sample std over ``runs`` (the seeds of one cell) of the scalar ``tag``.

    The x axis is the event's step as the run logged it (training steps, or samples seen for the
    ``by_samples/`` tags). Seeds are compared at the x values they share; with ``steps=True`` the
    curve is a staircase (a curriculum level), known between its points, so seeds that changed level
    at different x are compared at every x, each holding its last level.
    """
    series = [dict(run.scalars[names[0]]) for run in runs if (names := tags_of(run, tag))]
    if not series:
        return None
    if steps:
        xs = sorted(set().union(*series))
        values = np.array([_hold(s, xs) for s in series])
    else:
        xs = sorted(set.intersection(*(set(s) for s in series)))
        if not xs:  # seeds logged at different x: show the first seed rather than nothing
            series = series[:1]
            xs = sorted(series[0])
        values = np.array([[s[x] for x in xs] for s in series])
    with warnings.catch_warnings():
        # a staircase x where only one seed has a value yet
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        # the sample std over seeds, as in the tables
        std = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros(len(xs))
    return np.array(xs, dtype=float), mean, np.nan_to_num(std)


def _hold(series: dict[int, float], xs: list[int]) -> list[float]:
    """The series' last value at or before each x (NaN before its first point)."""
    out, last = [], float("nan")
    for x in xs:
        last = series.get(x, last)
        out.append(last)
    return out


def best_first(curve: Curve, lower: bool) -> tuple[float, float]:
    """The curve's best value and the first x at which it is reached."""
    xs, ys, _ = curve
    i = int(np.nanargmin(ys) if lower else np.nanargmax(ys))
    return float(ys[i]), float(xs[i])
