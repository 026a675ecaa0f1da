"""The one return type of every image-classification dataset, and the arrays-to-tensors step.

Every loader returns an :class:`ImageData`, so a model or
training loop only ever sees float32 ``[N, C, H, W]`` inputs normalised per channel with the
training set's statistics, and int64 labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ImageData:
    """Train and test splits of an image-classification dataset, held in memory."""

    train_x: torch.Tensor  # float32 [N, C, H, W], normalised per channel (training-set stats)
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # float32 [M, C, H, W], normalised with the *training* statistics
    test_y: torch.Tensor  # int64 [M]
    num_classes: int
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"ImageData(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )


def as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor, sharing memory with a writable array (arrays parsed straight out of a
    file's bytes are read-only, and torch wants its own copy of those)."""
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()
    return torch.as_tensor(x)


def channel_stats(x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of ``x`` [N, C, H, W], as float64 [C]."""
    x = as_tensor(x)
    if x.dtype == torch.uint8:
        # Exact and fast for pixels: a 256-bin histogram per channel.
        hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256)
                            for c in range(x.shape[1])])
        hist = hist.to(torch.float64)
        values = torch.arange(256, dtype=torch.float64)
        count = hist.sum(dim=1)
        mean = (hist * values).sum(dim=1) / count
        var = (hist * values * values).sum(dim=1) / count - mean * mean
        return mean, var.clamp_min(0).sqrt()
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    sq = torch.zeros(x.shape[1], dtype=torch.float64)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    for chunk in x.split(4096):  # chunked: never a float64 copy of the whole dataset
        c = chunk.to(torch.float64)
        mean += c.sum(dim=(0, 2, 3))
        sq += (c * c).sum(dim=(0, 2, 3))
    mean /= count
    return mean, (sq / count - mean * mean).clamp_min(0).sqrt()


def normalise(x: np.ndarray | torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              scale: float = 1.0) -> torch.Tensor:
    """float32 ``(x / scale - mean) / std`` per channel; ``mean`` and ``std`` are on that scale."""
    out = as_tensor(x).to(torch.float32, copy=True)
    std = std.to(torch.float64).clamp_min(1e-8)
    # One multiply-add per element: x * (1 / (scale * std)) + (-mean / std).
    mul = (1.0 / (scale * std)).to(torch.float32).view(1, -1, 1, 1)
    add = (-mean.to(torch.float64) / std).to(torch.float32).view(1, -1, 1, 1)
    return out.mul_(mul).add_(add)


def from_arrays(
    name: str,
    train_x: np.ndarray | torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: np.ndarray | torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    num_classes: int,
    scale: float = 255.0,
) -> ImageData:
    """Build :class:`ImageData` from raw ``[N, C, H, W]`` arrays (e.g. uint8 pixels).

    Pixels are divided by ``scale`` and normalised per channel with the training set's mean and
    std (for MNIST: 0.1307 and 0.3081); the test split uses the same training statistics.
    """
    train_x, test_x = as_tensor(train_x), as_tensor(test_x)
    mean, std = channel_stats(train_x)
    mean, std = mean / scale, std / scale
    return ImageData(
        train_x=normalise(train_x, mean, std, scale),
        train_y=as_tensor(np.asarray(train_y)).to(torch.int64),
        test_x=normalise(test_x, mean, std, scale),
        test_y=as_tensor(np.asarray(test_y)).to(torch.int64),
        num_classes=num_classes,
        name=name,
    )
