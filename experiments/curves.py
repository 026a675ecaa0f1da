"""Training curves from the runs' TensorBoard scalars, averaged over seeds."""

from __future__ import annotations

import fnmatch

import numpy as np
from rundirs import Run

Curve = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, mean, std (std is 0 with one seed)


def tags_of(run: Run, tag: str) -> list[str]:
    """The run's tags that ``tag`` names: "a|b" is the first present, "error/*" every match."""
    if "*" in tag:
        return sorted(t for t in run.scalars if fnmatch.fnmatch(t, tag))
    return next(([t] for t in tag.split("|") if t in run.scalars), [])


def samples_per_step(run: Run) -> float | None:
    """Samples seen per logged step: ``samples_seen`` / the last step of the run.

    Dividing by the last logged step (rather than assuming the step counts updates) gives the right
    factor whether the events are logged per update (factor = samples per update) or per sample
    (factor = 1).
    """
    samples = run.get("metrics.samples_seen")
    last = run.last_step
    if not isinstance(samples, (int, float)) or not last:
        return None
    return float(samples) / last


def mean_curve(runs: list[Run], tag: str, x: str = "steps") -> Curve | None:
    """Mean and std over ``runs`` (seeds of one cell) of the scalar ``tag`` at the steps they share.

    ``x="samples"`` turns steps into samples seen; a run that cannot say how many samples it saw is
    left out rather than drawn on the wrong axis.
    """
    series, factors = [], []
    for run in runs:
        names = tags_of(run, tag)
        if not names:
            continue
        factor = 1.0
        if x == "samples":
            factor = samples_per_step(run)
            if factor is None:
                continue
        series.append(dict(run.scalars[names[0]]))
        factors.append(factor)
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:  # seeds logged at different steps: keep the first seed's curve
        series, factors = series[:1], factors[:1]
        steps = sorted(series[0])
    values = np.array([[s[step] for step in steps] for s in series])
    # the sample std over seeds, as in the tables
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
    return np.array(steps, dtype=float) * float(np.mean(factors)), values.mean(axis=0), std


def best_first(curve: Curve, lower: bool) -> tuple[float, float]:
    """The curve's best value and the first x at which it is reached."""
    xs, ys, _ = curve
    i = int(np.argmin(ys) if lower else np.argmax(ys))
    return float(ys[i]), float(xs[i])
