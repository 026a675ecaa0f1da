"""Image-classification datasets: one entry point.

``load_images("mnist", "data")`` returns an :class:`~sgrun.data.image_data.ImageData` whatever the
dataset (float32 ``[N, C, H, W]`` inputs normalised per channel with the training set's statistics,
int64 labels).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from sgrun.data.cifar10 import load_cifar10
from sgrun.data.image_data import ImageData
from sgrun.data.mnist import load_mnist
from sgrun.data.synthetic import make_synthetic
from sgrun.errors import ConfigError, DataError

__all__ = ["DATASETS", "ImageData", "load_images"]


def _registry() -> dict[str, tuple[Callable[..., ImageData], list[str]]]:
    """{name: (loader, the keyword options it accepts)}."""
    def synthetic(data_dir: str | Path, download: bool = True, **kwargs) -> ImageData:
        # Generated in memory: nothing is read from or written to data_dir.
        if "shape" in kwargs:
            kwargs["shape"] = tuple(kwargs["shape"])  # a YAML list
        return make_synthetic(**kwargs)

    def options(fn: Callable) -> list[str]:
        return [p for p in inspect.signature(fn).parameters if p not in ("data_dir", "download")]

    return {
        "mnist": (load_mnist, options(load_mnist)),
        "cifar10": (load_cifar10, options(load_cifar10)),
        "synthetic": (synthetic, options(make_synthetic)),
    }


DATASETS = ("mnist", "cifar10", "synthetic")


def load_images(name: str, data_dir: str | Path, download: bool = True, **kwargs) -> ImageData:
    """Load the image dataset ``name`` (one of :data:`DATASETS`) from ``data_dir/<name>/``.

    Missing files are fetched when ``download`` is true (see each loader for where from);
    ``kwargs`` go to the loader, e.g. ``num_train=``/``seed=`` for "synthetic" or a
    ``checksums=`` override for "mnist"/"cifar10". Raises :class:`~sgrun.errors.DataError` for an
    unknown name or a missing, truncated or corrupt dataset, and
    :class:`~sgrun.errors.ConfigError` for an option the dataset does not have.
    """
    loaders = _registry()
    if name not in loaders:
        raise DataError(f"unknown image dataset {name!r}: choose one of {', '.join(DATASETS)}")
    loader, valid = loaders[name]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}: "
            f"valid options are {', '.join(valid) or 'none'}"
        )
    return loader(data_dir, download=download, **kwargs)
