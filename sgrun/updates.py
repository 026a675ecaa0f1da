"""Stochastic layer updates (Jaderberg et al. 2017, sec. 3.3): after each forward pass every layer
group (a block with its synthesizer, or the head) is updated only with probability
``train.update_prob``.  The in-process engine (:func:`sgrun.train.fit`) and every pipeline stage
(:mod:`sgrun.pipeline.stage`) draw the coins here, from a generator seeded ``seed + 1``, so that
both skip the same updates."""

from __future__ import annotations

import torch
from torch import nn


def update_coins(count: int, prob: float, gen: torch.Generator) -> list[bool]:
    """Whether each of ``count`` layer groups updates this step; no draw at all when ``prob`` is 1,
    so that such a run stays identical to one without stochastic updates."""
    if prob >= 1.0:
        return [True] * count
    return [bool(torch.rand((), generator=gen) < prob) for _ in range(count)]


def drop_gradients(modules) -> None:
    """Drop the gradients of ``modules``, so that the optimizer leaves their parameters (and their
    Adam moments) alone this step."""
    for module in modules:
        for p in module.parameters():
            p.grad = None


def skip_updates(groups: list[list[nn.Module]], prob: float, gen: torch.Generator) -> int:
    """Draw the coins of ``groups`` and drop the gradients of those that do not update; returns the
    number of groups skipped."""
    coins = update_coins(len(groups), prob, gen)
    for group, update in zip(groups, coins):
        if not update:
            drop_gradients(group)
    return coins.count(False)
