"""Where a feed-forward net is cut into pipeline stages: given boundaries or ones that balance the
stages' compute (multiply-adds, synthesizers included)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from sgrun.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """Stage ``s`` holds blocks ``ranges[s][0] .. ranges[s][1] - 1``;
    ``boundaries[s]`` is its top cut."""

    boundaries: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    locked: bool  # no interfaces at all: plain backprop across the stages

    @property
    def stages(self) -> int:
        return len(self.ranges)


def plan_split(model: nn.Module, runtime: DictConfig) -> Split:
    """Check ``runtime.stages`` / ``runtime.boundaries`` against the model's cuts and interfaces."""
    cuts = list(model.cut_names)
    stages = int(runtime.stages)
    if stages < 1:
        raise ConfigError(f"runtime.stages must be >= 1 (got {stages}): set runtime.stages=2")
    if stages > len(cuts) + 1:
        raise ConfigError(f"runtime.stages={stages} but this model has only {len(cuts)} cuts "
                          f"({', '.join(cuts)}), so at most {len(cuts) + 1} stages: lower "
                          "runtime.stages or use more model.layers")
    placed = list(model.interfaces)
    # locked: no interfaces (backprop), or interfaces that only learn (dni.mode=train_only)
    locked = not placed or all(model.interfaces[c].mode == "train_only" for c in placed)
    given = runtime.boundaries
    if given in (None, "auto"):
        boundaries = balanced_boundaries(model, stages)
    else:
        boundaries = [str(b) for b in given]
        unknown = [b for b in boundaries if b not in cuts]
        if unknown:
            raise ConfigError(f"runtime.boundaries: no cut named {', '.join(map(repr, unknown))}: "
                              f"valid cuts are {', '.join(cuts)}, "
                              f"e.g. runtime.boundaries=[{cuts[len(cuts) // 2]}]")
        if len(boundaries) != stages - 1 or len(set(boundaries)) != len(boundaries):
            raise ConfigError(f"runtime.boundaries needs {stages - 1} different cuts for "
                              f"runtime.stages={stages} (got {boundaries}): choose from "
                              f"{', '.join(cuts)} or set runtime.boundaries=auto")
        boundaries.sort(key=cuts.index)
    if not locked:
        missing = [b for b in boundaries if b not in placed]
        if missing:
            raise ConfigError(f"stage boundary {', '.join(missing)} has no interface (interfaces "
                              f"at {', '.join(placed)}): choose boundaries among them, or place "
                              "interfaces there (dni.cuts=[all])")
    edges = [0] + [cuts.index(b) + 1 for b in boundaries] + [len(cuts)]
    return Split(tuple(boundaries), tuple(zip(edges[:-1], edges[1:])), locked)


def balanced_boundaries(model: nn.Module, stages: int) -> list[str]:
    """Boundaries that balance the stages' compute: multiply-adds of each block and of the
    synthesizer above it, counted on one example, split so the largest stage is smallest."""
    costs = block_costs(model)
    n = len(costs)
    best: tuple[float, tuple[int, ...]] | None = None

    def search(start: int, left: int, chosen: tuple[int, ...]):
        nonlocal best
        if left == 1:
            parts = list(zip((0,) + chosen, chosen + (n,)))
            worst = max(sum(costs[a:b]) for a, b in parts)
            if best is None or worst < best[0]:
                best = (worst, chosen)
            return
        for end in range(start + 1, n - left + 2):
            search(end, left - 1, chosen + (end,))

    search(0, stages, ())
    return [model.cut_names[e - 1] for e in best[1]]


def block_costs(model: nn.Module) -> list[float]:
    """Multiply-adds per example of each block together with the gradient synthesizer of the cut
    above it and the input synthesizer of the cut below it (complete unlock)."""
    model = copy.deepcopy(model)  # the counting forward must not touch the BatchNorm statistics
    counts: dict[nn.Module, float] = {}

    def hook(module, inputs, output):
        w = module.weight
        per_out = w[0].numel()  # in_features, or in_channels * kh * kw
        counts[module] = counts.get(module, 0.0) + per_out * output[0].numel()

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    shape = getattr(model, "in_shape", None)
    try:
        with torch.enable_grad():  # interfaces run their synthesizers only when gradients are on
            was = model.training
            model.train()
            device = next(model.parameters()).device
            x = torch.zeros(2, *shape, device=device)
            ctx = torch.zeros(2, model.context_dim, device=device) if model.context_dim else None
            model(x, ctx)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    def cost(module: nn.Module | None) -> float:
        return 0.0 if module is None else sum(counts.get(m, 0.0) for m in module.modules())

    costs = [cost(block) for block in model.blocks]
    costs[-1] += cost(model.head)
    for i, name in enumerate(model.cut_names):
        if name in model.interfaces:
            iface = model.interfaces[name]
            costs[i] += cost(iface.synthesizer)  # M(h) runs below the cut, I(x) above it
            costs[min(i + 1, len(costs) - 1)] += cost(getattr(iface, "input_model", None))
    return costs


SCHEDULES = ("dni", "gpipe", "1f1b")
TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}


def max_inflight(runtime: DictConfig) -> int:
    """``runtime.max_inflight`` as a number: ``auto`` is 2 for the DNI pipeline; GPipe and 1F1B
    keep one batch in flight (its micro-batches) and flush before the next."""
    value = runtime.get("max_inflight", "auto")
    if value in (None, "auto"):
        return 2 if runtime.get("schedule", "dni") == "dni" else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"runtime.max_inflight must be >= 1 or auto (got {value!r}): "
                          "set runtime.max_inflight=2")
    return value


def check_schedule(cfg: DictConfig, split: Split) -> None:
    """``runtime.schedule`` and ``runtime.microbatches``: a value the pipeline cannot honour is one
    line naming the fix."""
    rt = cfg.runtime
    schedule = rt.get("schedule", "dni")
    micro = rt.get("microbatches", 1)
    if schedule not in SCHEDULES:
        raise ConfigError(f"runtime.schedule must be dni, gpipe or 1f1b (got {schedule!r}): "
                          "set runtime.schedule=gpipe")
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ConfigError(f"runtime.microbatches must be an integer >= 1 (got {micro!r}): "
                          "set runtime.microbatches=4")
    inflight = max_inflight(rt)
    if schedule == "dni":
        if micro != 1:
            raise ConfigError(f"runtime.microbatches={micro} needs runtime.schedule=gpipe or "
                              "1f1b (the DNI pipeline steps on whole batches): set "
                              "runtime.microbatches=1")
        return
    if not split.locked or cfg.dni.cuts:
        raise ConfigError(f"runtime.schedule={schedule} trains by backprop alone, without "
                          "synthesizers: use dni=none, or runtime.schedule=dni for the DNI "
                          "pipeline")
    if inflight != 1:
        raise ConfigError(f"runtime.max_inflight={rt.max_inflight} applies to "
                          f"runtime.schedule=dni; {schedule} keeps one batch in flight "
                          "(runtime.microbatches): set runtime.max_inflight=auto")
    batch = int(cfg.train.batch_size)
    if batch % micro:
        fit = max(d for d in range(1, min(micro, batch) + 1) if batch % d == 0)
        raise ConfigError(f"runtime.microbatches={micro} does not divide "
                          f"train.batch_size={batch}: choose a divisor, e.g. "
                          f"runtime.microbatches={fit}")
    if schedule == "1f1b" and micro < split.stages:
        fit = next((d for d in range(split.stages, batch + 1) if batch % d == 0), split.stages)
        raise ConfigError(f"runtime.schedule=1f1b needs runtime.microbatches >= runtime.stages "
                          f"(got {micro} for {split.stages} stages): set "
                          f"runtime.microbatches={fit}, or runtime.schedule=gpipe")
