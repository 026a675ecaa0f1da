"""Feed-forward networks of the paper's sec. 3.3: FCNs and CNNs with interfaces between layers.

"Layers" counts the output layer (Jaderberg et al. 2017, sec. 3.3): a 3-layer FCN has two hidden
layers and two cuts, ``h1`` and ``h2``, one after each hidden layer.  Which cuts get a backward
interface is a :class:`~sgrun.dni.Placement` passed in by the caller.
"""

from __future__ import annotations

import torch
from torch import nn

from sgrun.dni import Placement, build_interfaces
from sgrun.errors import ConfigError


class FeedForward(nn.Module):
    """A stack of hidden blocks with a cut after each, then an output layer.

    ``forward(x, context=None)``: ``context`` is the one-hot label, needed only by conditioned
    (cDNI) interfaces in training mode.
    """

    def __init__(self, blocks: list[nn.Module], head: nn.Module, shapes: list[tuple[int, ...]],
                 placement: Placement | None, context_dim: int, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.cut_names = [f"h{i + 1}" for i in range(len(blocks))]
        self.cut_shapes = dict(zip(self.cut_names, shapes))
        self.interfaces = build_interfaces(placement, self.cut_shapes, context_dim,
                                           in_shape=tuple(in_shape))
        self.unlocked = placement is not None and placement.synthetic_input is not None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = x
        for name, block in zip(self.cut_names, self.blocks):
            h = block(h)
            if name in self.interfaces:
                # complete unlock: the interface also needs x, to predict this cut's input from it
                h = (self.interfaces[name](h, context, x) if self.unlocked
                     else self.interfaces[name](h, context))
        return self.head(h)

    def layer_groups(self) -> list[list[nn.Module]]:
        """Modules updated together: each hidden block with the interface above it, then the
        head."""
        groups = [[b] + ([self.interfaces[n]] if n in self.interfaces else [])
                  for n, b in zip(self.cut_names, self.blocks)]
        return groups + [[self.head]]


def _check_layers(layers: int, kind: str, allowed: range) -> None:
    if layers not in allowed:
        raise ConfigError(
            f"{kind} needs model.layers in {allowed.start}..{allowed.stop - 1} (got {layers}): "
            f"set model.layers={allowed.start}"
        )


class FCN(FeedForward):
    """Fully connected net: ``layers - 1`` hidden blocks Linear(hidden) -> BatchNorm -> ReLU, then
    Linear.

    Jaderberg et al. 2017, sec. 3.3: 256 hidden units, softmax output over 10 classes.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, layers: int = 3,
                 hidden: int = 256, placement: Placement | None = None) -> None:
        _check_layers(layers, "an FCN", range(2, 65))
        in_dim = int(torch.Size(in_shape).numel())
        blocks: list[nn.Module] = []
        for i in range(layers - 1):
            first = [nn.Flatten()] if i == 0 else []
            blocks.append(nn.Sequential(*first, nn.Linear(in_dim if i == 0 else hidden, hidden),
                                        nn.BatchNorm1d(hidden), nn.ReLU()))
        shapes = [(hidden,)] * (layers - 1)
        head = nn.Sequential(nn.Flatten(), nn.Linear(hidden if layers > 1 else in_dim, num_classes))
        super().__init__(blocks, head, shapes, placement, num_classes, in_shape)


class CNN(FeedForward):
    """Convolutional net of the paper's supplementary C.1.

    Each hidden block: conv ``channels`` filters ``kernel`` x ``kernel`` with resolution-preserving
    padding -> BatchNorm -> ReLU -> 3x3 pooling with stride 2 (max after the first block, average
    after the others); then a Linear output layer on the flattened features.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, layers: int = 3,
                 channels: int = 128, kernel: int = 5, placement: Placement | None = None) -> None:
        _check_layers(layers, "a CNN", range(2, 9))
        c, hgt, wid = in_shape
        blocks: list[nn.Module] = []
        shapes: list[tuple[int, ...]] = []
        for i in range(layers - 1):
            pool = (nn.MaxPool2d(3, stride=2, padding=1) if i == 0
                    else nn.AvgPool2d(3, stride=2, padding=1))
            blocks.append(nn.Sequential(nn.Conv2d(c if i == 0 else channels, channels, kernel,
                                                  padding=kernel // 2),
                                        nn.BatchNorm2d(channels), nn.ReLU(), pool))
            hgt, wid = (hgt + 1) // 2, (wid + 1) // 2
            shapes.append((channels, hgt, wid))
        head = nn.Sequential(nn.Flatten(), nn.Linear(channels * hgt * wid, num_classes))
        super().__init__(blocks, head, shapes, placement, num_classes, in_shape)
