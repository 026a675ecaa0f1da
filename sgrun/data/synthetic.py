"""A generated image-classification task, for tests and smoke runs: no files, no downloads.

Each class has one random prototype image; a sample is its class prototype plus Gaussian pixel
noise. The prototypes are smooth (random low-resolution patterns, upsampled), like real images,
and faint next to the noise: no single pixel tells the class apart, so a model has to learn to
pool evidence over many pixels before it beats chance, yet a small network gets far below chance
error within a few hundred steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sgrun.data.image_data import ImageData, channel_stats, normalise
from sgrun.errors import ConfigError

# Distance between two class prototypes, in units of the pixel noise, independent of the image
# size: with noise=1.0 a nearest-prototype classifier that knew the prototypes would be right
# about 98% of the time, but a model must estimate them from noisy samples first.
SEPARATION = 6.0


def make_synthetic(
    num_train: int = 2048,
    num_test: int = 512,
    shape: tuple[int, int, int] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
    noise: float = 1.0,
) -> ImageData:
    """A learnable ``num_classes``-way task of ``shape`` images, the same for the same ``seed``.

    ``noise`` scales the Gaussian pixel noise relative to the default difficulty: higher is
    harder. Inputs are normalised per channel with the training set's statistics, like the real
    datasets.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"synthetic shape must be (C, H, W) of positive sizes, got {shape}")
    if num_train < 1 or num_test < 1 or num_classes < 2 or noise < 0:
        raise ConfigError(
            "synthetic data needs num_train >= 1, num_test >= 1, num_classes >= 2 and noise >= 0 "
            f"(got {num_train}, {num_test}, {num_classes}, {noise})"
        )
    c, h, w = shape
    gen = torch.Generator().manual_seed(seed)

    # Smooth prototypes: a coarse random grid upsampled to full size, then scaled so that any two
    # prototypes are SEPARATION noise standard deviations apart whatever the number of pixels.
    coarse = torch.randn(num_classes, c, max(1, h // 4), max(1, w // 4), generator=gen)
    protos = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    protos -= protos.mean(dim=(1, 2, 3), keepdim=True)
    protos *= SEPARATION / math.sqrt(2.0) / protos.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_classes, (n,), generator=gen)
        x = protos[y] + noise * torch.randn(n, c, h, w, generator=gen)
        return x, y

    train_x, train_y = sample(num_train)
    test_x, test_y = sample(num_test)
    mean, std = channel_stats(train_x)
    return ImageData(
        train_x=normalise(train_x, mean, std),
        train_y=train_y,
        test_x=normalise(test_x, mean, std),
        test_y=test_y,
        num_classes=num_classes,
        name="synthetic",
    )
