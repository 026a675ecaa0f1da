"""CIFAR-10 from the official python batches in ``<data_dir>/cifar10/cifar-10-batches-py/``.

Where the batches come from, first that works: the folder itself; the official archive
``cifar-10-python.tar.gz`` placed in ``<data_dir>/cifar10/``; the official download of that
archive. No package registry carries CIFAR-10, so past that the error says what to put where.
Every batch is checked against its official md5 before it is unpickled.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

from sgrun.data import fetch
from sgrun.data.image_data import ImageData, from_arrays
from sgrun.errors import DataError

BATCHES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_SIZE = "163 MB"
URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
BATCH_FOLDER = "cifar-10-batches-py"
NUM_CLASSES = 10
PIXELS = 3 * 32 * 32  # one row of a batch's data: 1024 red, then 1024 green, then 1024 blue

FIX = fetch.FIX


def load_cifar10(data_dir: str | Path, download: bool = True,
                 checksums: dict[str, str] | None = None) -> ImageData:
    """Load CIFAR-10 (50000 train / 10000 test, 3x32x32) from ``data_dir/cifar10/``.

    Missing batches are extracted from a ``cifar-10-python.tar.gz`` in that folder, or (when
    ``download`` is true) from the official download. ``checksums`` ({file name: md5}, batch
    names or the archive name) overrides the official md5s. Raises
    :class:`~sgrun.errors.DataError` when batches are missing, corrupt or malformed.
    """
    root = fetch.dataset_folder(data_dir, "cifar10")
    folder = root / BATCH_FOLDER
    md5s = fetch.with_overrides("CIFAR-10", {**BATCHES, ARCHIVE: ARCHIVE_MD5}, checksums)

    missing = _missing(folder)
    if missing and (root / ARCHIVE).is_file():
        _extract_local(root / ARCHIVE, folder, missing, md5s)
        missing = _missing(folder)
    fetch_error = None
    if missing and download:
        fetch_error = _fetch(root, folder, missing, md5s)
        missing = _missing(folder)
    if missing:
        raise DataError(_missing_message(root, missing, download, fetch_error))

    train = [read_batch(folder / name, md5s[name]) for name in TRAIN_BATCHES]
    test_x, test_y = read_batch(folder / "test_batch", md5s["test_batch"])
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return from_arrays("cifar10", train_x, train_y, test_x, test_y, NUM_CLASSES)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a batch (a dict of numpy arrays, lists and bytes) and nothing else: a pickle
    naming any other callable is refused instead of run."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path, md5: str) -> tuple[np.ndarray, np.ndarray]:
    """One verified batch: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({fetch.one_line(e)}): {FIX}") from None
    fetch.check_md5(path, data, md5)
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 (whatever a damaged pickle raises, the file is corrupt)
        raise DataError(
            f"{path} is not a readable CIFAR-10 batch (corrupt or truncated pickle: "
            f"{type(e).__name__}: {fetch.one_line(e)}): {FIX}"
        ) from None

    def field(key: str):
        if isinstance(batch, dict):
            for k in (key.encode(), key):
                if k in batch:
                    return batch[k]
        raise DataError(f"{path} is not a CIFAR-10 batch (no {key!r} entry): {FIX}")

    x = np.asarray(field("data"))
    y = np.asarray(field("labels"))
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS:
        raise DataError(f"{path} has data of shape {x.shape} and type {x.dtype}, "
                        f"expected uint8 N x {PIXELS}: {FIX}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path} has {y.size} labels for {len(x)} images: {FIX}")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{path} has labels outside 0-9: {FIX}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _missing(folder: Path) -> list[str]:
    return [name for name in BATCHES if not fetch.present(folder / name)]


def _members(folder: Path, missing: list[str], md5s: dict[str, str]) -> dict:
    return {f"{BATCH_FOLDER}/{name}": (folder / name, md5s[name]) for name in missing}


def _extract_local(archive: Path, folder: Path, missing: list[str], md5s: dict[str, str]) -> None:
    actual = fetch.md5_file(archive)
    if actual != md5s[ARCHIVE]:
        raise DataError(
            f"{archive} fails its checksum (md5 {actual}, expected {md5s[ARCHIVE]}): "
            f"the archive is corrupt or truncated; delete it and download it again from {URL}"
        )
    try:
        fetch.extract_members(archive, _members(folder, missing, md5s))
    except fetch.FetchFailed as e:
        raise DataError(
            f"cannot extract CIFAR-10 from {archive} ({fetch.one_line(e)}): "
            f"delete it and download it again from {URL}"
        ) from None


def _fetch(root: Path, folder: Path, missing: list[str], md5s: dict[str, str]) -> str | None:
    """Download the official archive and extract the missing batches. Returns why it failed."""
    fetch.make_folder(root)  # a folder that cannot be made fails before anything is fetched
    try:
        fetch.download(URL, root / ARCHIVE, md5s[ARCHIVE],
                       message=f"fetching CIFAR-10 from {URL} into {root}")
        fetch.extract_members(root / ARCHIVE, _members(folder, missing, md5s))
    except fetch.FetchFailed as e:
        return str(e)
    return None


def _missing_message(root: Path, missing: list[str], download: bool, error: str | None) -> str:
    batches = ", ".join(missing)
    message = (
        f"CIFAR-10 not found in {root} (missing {BATCH_FOLDER}/{batches}): download {URL} "
        f"({ARCHIVE_SIZE}, md5 {ARCHIVE_MD5}) and put {ARCHIVE} in {root}/ (sgrun extracts it), "
        f"or put its extracted {BATCH_FOLDER}/ folder there"
    )
    if not download:
        return message + " (downloads are off: download=False)"
    if error:
        return message + f" (the download failed: {fetch.one_line(error)})"
    return message
