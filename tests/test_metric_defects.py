"""Defects that would leave every number a run reports wrong while training still runs: each test
here builds a small case in which the right metric and the wrong one differ, and checks that the
right one is what sgrun reports.

* cDNI: the synthesizer sees the label, and the label a training step passes is the batch's;
* SG quality: ``dni/<cut>/cosine`` compares the synthetic gradient with the true backprop gradient;
* test error is measured in eval mode, and training resumes in train mode;
* PTB: ``bpc_test`` is measured on the test split, ``bpc/valid`` on the validation split;
* two timescales: the held-out digit stream shows test images only.

Tiny tensors on the CPU, data files written in the real formats (IDX, ``ptb.*.txt``), no network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import sgrun
from configs import make_cfg
from torch import nn

from sgrun.build import build_digit_streams
from sgrun.data.images import load_images
from sgrun.dni import (
    BackwardInterface,
    Placement,
    SynthesizerSpec,
    build_synthesizer,
    gradient_quality,
    interfaces_of,
)
from sgrun.models.feedforward import FCN
from sgrun.tasks import Classification, Sequence, TwoTimescale
from sgrun.tasks.classification import classification_error
from sgrun.tasks.sequence import evaluate_bpc
from sgrun.tasks.two_timescale import count_loss

CPU = torch.device("cpu")
CLASSES = 10


pytestmark = pytest.mark.usefixtures("no_network")  # conftest.py: any fetch fails the test


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def randomize(module: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Random weights everywhere (synthesizers start with a zero last layer: a zero output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def classification_task(*overrides: str) -> Classification:
    """A Classification task on 8x8 synthetic images: an FCN with two cuts (h1, h2)."""
    cfg = make_cfg("data=synthetic", "device=cpu", "profile=smoke", "data.options.num_train=64",
                   "data.options.num_test=48", "data.options.shape=[1,8,8]", "model.hidden=16",
                   "train.batch_size=16", *overrides)
    torch.manual_seed(0)
    return Classification(cfg, CPU)


def reference_quality(model: FCN, x: torch.Tensor, y: torch.Tensor,
                      ctx: torch.Tensor | None) -> dict[str, dict[str, float]]:
    """Cosine and squared error between each synthesizer's prediction and the true per-example
    gradient ``B dL/dh`` of plain backprop, computed by hand on a copy of ``model``."""
    ref = copy.deepcopy(model).train()
    acts = {}
    h = x
    for name, block in zip(ref.cut_names, ref.blocks):
        h = block(h)
        h.retain_grad()
        acts[name] = h
        # the interfaces are skipped: the true gradient is that of the net without them
    nn.functional.cross_entropy(ref.head(h), y).backward()
    out = {}
    for name, iface in ref.interfaces.items():
        with torch.no_grad():
            pred = iface.synthesizer(acts[name], ctx).flatten(1)
        true = (acts[name].grad * len(x)).flatten(1)
        cos = (pred * true).sum(1) / (pred.norm(dim=1) * true.norm(dim=1))
        out[name] = {"cosine": float(cos.mean()), "mse": float((pred - true).pow(2).sum(1).mean())}
    return out


# --------------------------------------------------------------------------- a. cDNI and the label


@pytest.mark.parametrize("kind, shape", [("linear", (6,)), ("mlp", (6,)), ("conv", (3, 4, 4))])
def test_conditioned_synthesizer_output_depends_on_the_label(kind, shape):
    """Catches a cDNI synthesizer that ignores its one-hot context (e.g. drops it or zeroes it
    before concatenating it with ``h``): the prediction for the same ``h`` must change with the
    label, example by example."""
    spec = SynthesizerSpec(kind=kind, hidden=8, layers=1, kernel=3)
    synth = build_synthesizer(spec, shape, context_dim=CLASSES)
    randomize(synth)
    synth.eval()  # BatchNorm on running statistics: each example's output is its own
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, *shape, generator=gen)
    y = torch.arange(5)
    with torch.no_grad():
        out = synth(h, nn.functional.one_hot(y, CLASSES).float())
        other = synth(h, nn.functional.one_hot((y + 3) % CLASSES, CLASSES).float())
    assert out.shape == h.shape
    per_example = (out - other).flatten(1).abs().amax(1)
    assert bool((per_example > 1e-3).all()), per_example
    if kind == "linear":  # delta_hat = W [h, c] + b exactly
        layer = synth.out
        z = torch.cat([h, nn.functional.one_hot(y, CLASSES).float()], dim=1)
        torch.testing.assert_close(out, z @ layer.weight.T + layer.bias)


def test_cdni_training_step_passes_the_batch_labels(monkeypatch):
    """Catches a cDNI training step whose synthesizers are given anything but the one-hot labels
    of the batch being trained (no context, zeros, a constant label, another batch's labels)."""
    task = classification_task("dni=cdni")
    assert task.conditioned and [i.name for i in task.interfaces] == ["h1", "h2"]
    seen: dict[str, list[torch.Tensor | None]] = {"h1": [], "h2": []}
    for iface in task.interfaces:
        real = iface.synthesizer.forward

        def spy(h, context=None, _real=real, _name=iface.name):
            seen[_name].append(None if context is None else context.detach().clone())
            return _real(h, context)

        monkeypatch.setattr(iface.synthesizer, "forward", spy)
    for _ in range(2):
        x, y = batch = task.next_batch()
        assert len(set(y.tolist())) > 1  # a constant label would not be told apart
        task.model.zero_grad()
        task.train_step(batch)
        expected = nn.functional.one_hot(y, CLASSES).float()
        for name, contexts in seen.items():
            assert len(contexts) == 1, name  # one synthesizer call per interface and step
            assert contexts[0] is not None, name
            torch.testing.assert_close(contexts.pop(), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- b. SG quality


@pytest.mark.parametrize("kind, conditioned", [("linear", False), ("mlp", False), ("linear", True)])
def test_gradient_quality_compares_with_the_true_gradient(kind, conditioned):
    """Catches a cosine (or squared error) that compares the synthetic gradient with itself, or
    with anything but the true backprop gradient: with random synthesizers the two differ, the
    cosine is well below 1 and equals the one computed by hand."""
    torch.manual_seed(0)
    spec = SynthesizerSpec(kind=kind, hidden=12, layers=1)
    model = FCN((7,), 4, layers=3, hidden=9,
                placement=Placement(cuts=("all",), synthesizer=spec, conditioned=conditioned))
    for iface in interfaces_of(model):
        randomize(iface.synthesizer)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 7, generator=gen), torch.randint(0, 4, (6,), generator=gen)
    ctx = nn.functional.one_hot(y, 4).float() if conditioned else None
    expected = reference_quality(model, x, y, ctx)
    got = gradient_quality(model, lambda: nn.functional.cross_entropy(model(x, ctx), y))
    assert set(got) == {"h1", "h2"}
    for cut, q in got.items():
        assert q["cosine"] < 0.9, (cut, q)
        assert q["cosine"] == pytest.approx(expected[cut]["cosine"], abs=1e-5)
        assert q["mse"] == pytest.approx(expected[cut]["mse"], rel=1e-4)


def test_gradient_quality_is_one_where_the_synthesizer_is_exact():
    """The other side of the cosine test: a synthesizer that predicts the true per-example
    gradient exactly gets cosine 1 and squared error 0 (so a cosine against a wrong reference,
    e.g. the injected ``delta_hat / B`` or the raw ``dL/dh``, shows up as an error here)."""
    torch.manual_seed(0)
    w = torch.randn(3, 5)
    x = torch.randn(4, 5)
    y = torch.randint(0, 3, (4,))

    class Exact(nn.Module):  # knows the loss: B dL/dh of cross_entropy(h @ w.T, y) at h
        def forward(self, h, context=None):
            p = torch.softmax(h.detach() @ w.T, dim=1)
            return (p - nn.functional.one_hot(y, 3).float()) @ w

    iface = BackwardInterface(Exact(), name="h")
    quality = gradient_quality(iface, lambda: nn.functional.cross_entropy(
        iface(x.clone().requires_grad_(True)) @ w.T, y))
    assert quality["h"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert quality["h"]["mse"] == pytest.approx(0.0, abs=1e-10)


def test_classification_diagnostics_report_the_cosine_to_the_true_gradient():
    """Catches ``dni/<cut>/cosine`` of the classification task compared with the synthetic
    gradient itself (cosine 1), with the wrong quantity under the tag, or without the label the
    cDNI synthesizers need: it must equal the cosine to plain backprop's gradient, by hand."""
    task = classification_task("dni=cdni")
    for iface in task.interfaces:
        randomize(iface.synthesizer)
    x, y = batch = task.next_batch()
    expected = reference_quality(task.model, x, y, nn.functional.one_hot(y, CLASSES).float())
    got = task.diagnostics(batch)
    assert set(got) == {f"dni/{c}/{k}" for c in ("h1", "h2") for k in ("cosine", "mse_true")}
    for cut in ("h1", "h2"):
        assert got[f"dni/{cut}/cosine"] < 0.9
        assert got[f"dni/{cut}/cosine"] == pytest.approx(expected[cut]["cosine"], abs=1e-5)
        assert got[f"dni/{cut}/mse_true"] == pytest.approx(expected[cut]["mse"], rel=1e-4)


def test_two_timescale_diagnostics_report_the_cosine_to_bs_gradient(tmp_path):
    """Catches ``dni/message/cosine`` compared with the synthetic gradient itself: it must be the
    cosine to the gradient of B's loss at A's messages (what ``coupling=bptt`` passes), by hand."""
    task = two_timescale_task(tmp_path, "digits")
    randomize(task.model.interface.synthesizer)
    batch = task.next_batch()
    x, y_a, y_b, mask_a, mask_b = batch
    ref = copy.deepcopy(task.model)
    ref.coupling = "bptt"
    out = ref(x, task.state)
    (grad,) = torch.autograd.grad(count_loss(out.logits_b, y_b, mask_b), out.message)
    true = grad.flatten(0, 1) * (grad.shape[0] * grad.shape[1])
    with torch.no_grad():
        pred = ref.interface.synthesizer(out.message.flatten(0, 1))
    assert bool((true.norm(dim=1) > 0).all())  # B's loss reaches every message of the chunk
    cos = ((pred * true).sum(1) / (pred.norm(dim=1) * true.norm(dim=1))).mean()
    got = task.diagnostics(batch)
    assert got["dni/message/cosine"] < 0.9
    assert got["dni/message/cosine"] == pytest.approx(float(cos), abs=1e-5)
    mse = float((pred - true).pow(2).sum(1).mean())
    assert got["dni/message/mse_true"] == pytest.approx(mse, rel=1e-4)


# --------------------------------------------------------------------------- c. eval mode


class Noisy(nn.Module):
    """BatchNorm and dropout: train-mode outputs differ from eval-mode ones."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Dropout(0.5), nn.Linear(16, 3))
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.net(x)


@pytest.mark.parametrize("was_training", [True, False])
def test_classification_error_is_measured_in_eval_mode(was_training):
    """Catches test error measured in train mode (batch statistics, dropout on), and a model not
    put back in the mode it was in (the engine trains on after each evaluation)."""
    torch.manual_seed(0)
    model = Noisy()
    with torch.no_grad():
        model.net[2].running_mean.fill_(2.0)  # eval mode differs from train mode by far
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    model.eval()
    with torch.no_grad():
        expected = 100.0 * float((model(x).argmax(1) != y).float().mean())
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))  # dropout on: the train mode is told apart
    model.modes.clear()
    model.train(was_training)
    err = classification_error(model, x, y, CPU, batch=16)
    assert model.modes == [False, False, False]  # three batches, each in eval mode
    assert err == pytest.approx(expected)
    assert model.training is was_training
    assert all(m.training is was_training for m in model.modules())


def test_classification_evaluate_uses_eval_mode_and_returns_to_training(monkeypatch):
    """Catches the classification task's test error measured in train mode, and a model left in
    eval mode after an evaluation (its interfaces would stop training, BatchNorm would freeze)."""
    task = classification_task("dni=cdni")
    model = task.model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0.0, 2.0)  # running statistics far from the batch's
    ref = copy.deepcopy(model)
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    with torch.no_grad():
        expected = 100.0 * float((ref.eval()(task.test_x).argmax(1) != task.test_y).float().mean())
        in_train = 100.0 * float((ref.train()(task.test_x).argmax(1) != task.test_y).float().mean())
    assert expected != in_train  # the two modes give different test errors here
    model.train()
    out = task.evaluate(5)
    assert modes and not any(modes)
    assert out["error/test"] == pytest.approx(expected)
    assert task.history[-1] == (5, out["error/test"])
    assert model.training and all(m.training for m in model.modules())


# --------------------------------------------------------------------------- d. PTB test BPC


PTB_TEXT = {
    # every symbol is in train; valid is all "a", test has no "a" at all
    "train": " a b c d \n d c b a \n a a b b \n c c d d \n" * 3,
    "valid": " a a a a a a a a \n" * 4,
    "test": " b c d b c d c b \n" * 4,
}


def write_ptb(root: Path) -> dict[str, str]:
    folder = root / "ptb"
    folder.mkdir(parents=True)
    for split, text in PTB_TEXT.items():
        (folder / f"ptb.{split}.txt").write_bytes(text.encode())
    return {split: md5(text.encode()) for split, text in PTB_TEXT.items()}


def test_ptb_test_bpc_is_measured_on_the_test_split(tmp_path):
    """Catches "test" BPC computed on the validation split (and validation BPC computed on the
    test split): with a model that favours ``a``, valid (all ``a``) and test (no ``a``) give BPCs
    far apart, and each metric must be :func:`evaluate_bpc` of its own split."""
    sums = write_ptb(tmp_path)
    cfg = make_cfg("model=rnn", "data=ptb", "dni=none", "device=cpu", "profile=smoke",
                   f"data_dir={tmp_path}", "data.download=false", "model.hidden=8",
                   "train.batch_size=2", "data.eval_batch_size=2", "data.eval_block=5")
    cfg.data.checksums = sums
    torch.manual_seed(0)
    task = Sequence(cfg, CPU)
    chars = task.chars
    a = chars.vocab.index("a")
    with torch.no_grad():
        task.model.head.bias[a] += 6.0

    def bpc(ids):
        return evaluate_bpc(task.model, ids, 2, 5, CPU)

    valid, test = bpc(chars.valid), bpc(chars.test)
    assert test > valid + 2.0  # the splits are told apart
    out = task.evaluate(1)
    assert out["bpc/valid"] == pytest.approx(valid)
    metrics = task.final_metrics(1)
    assert metrics["bpc_test"] == pytest.approx(test)
    assert metrics["primary"] == pytest.approx(test)
    assert metrics["bpc_valid_best"] == pytest.approx(valid)


# --------------------------------------------------------------------------- e. held-out digits


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(f">I{array.ndim}I", 0x800 | array.ndim, *array.shape) + array.tobytes()


def write_mnist(root: Path, n_train: int = 20, n_test: int = 12) -> dict[str, str]:
    """Fake MNIST in IDX files: training images are dark (pixels < 100), test images bright
    (pixels >= 156), so that no test image equals a training one."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 100, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(156, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder = root / "mnist"
    folder.mkdir(parents=True)
    sums = {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        (folder / name).write_bytes(raw)
        sums[name] = md5(raw)
    return sums


def digits_cfg(root: Path, data: str = "digits_mnist", *overrides: str):
    cfg = make_cfg("model=hrnn", f"data={data}", "device=cpu", "profile=smoke",
                   f"data_dir={root}", "data.download=false", "model.hidden_a=8",
                   "model.hidden_b=8", "model.truncation_b=4", "train.batch_size=4",
                   "data.eval_batch_size=5", "data.eval_ticks=4", *overrides)
    if cfg.data.mode == "images":
        cfg.data.image_options = {"checksums": write_mnist(root)}
    return cfg


def two_timescale_task(root: Path, data: str = "digits_mnist") -> TwoTimescale:
    torch.manual_seed(0)
    return TwoTimescale(digits_cfg(root, data), CPU)


def rows_in(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """For every row of ``x`` ``[..., D]``: its index in ``images`` ``[N, D]`` (-1 if none)."""
    flat = x.reshape(-1, x.shape[-1])
    same = (flat[:, None, :] == images[None, :, :]).all(-1)  # [rows, N]
    return torch.where(same.any(1), same.float().argmax(1), torch.full((len(flat),), -1))


def test_held_out_digit_stream_draws_from_the_test_images_only(tmp_path):
    """Catches a two-timescale held-out stream that shows training images (or a training stream
    that shows test images): every image of each stream must be one of its own split's, with that
    image's label as the digit."""
    cfg = digits_cfg(tmp_path)
    data = load_images("mnist", tmp_path, download=False, **cfg.data.image_options)
    train_x, test_x = data.train_x.flatten(1), data.test_x.flatten(1)
    train, held_out = build_digit_streams(cfg, 4, 3)
    for stream, own, other, labels in ((train, train_x, test_x, data.train_y),
                                       (held_out(), test_x, train_x, data.test_y)):
        block = stream.next_block(60)
        idx = rows_in(block.x, own)
        assert bool((idx >= 0).all()) and bool((rows_in(block.x, other) < 0).all())
        assert torch.equal(labels[idx], block.digits.flatten())
        assert len(set(idx.tolist())) > len(own) // 2  # drawn over the split, not one image


def test_two_timescale_evaluate_reads_the_test_images(tmp_path, monkeypatch):
    """Catches the two-timescale task evaluating on training images: every input its evaluation
    feeds the model is a test image (and its training steps read training images only)."""
    cfg = digits_cfg(tmp_path)
    torch.manual_seed(0)
    task = TwoTimescale(cfg, CPU)
    data = load_images("mnist", tmp_path, download=False, **cfg.data.image_options)
    train_x, test_x = data.train_x.flatten(1), data.test_x.flatten(1)
    inputs: list[torch.Tensor] = []
    task.model.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone()))
    out = task.evaluate(1)
    assert set(out) == {"error/A", "error/B"} and all(math.isfinite(v) for v in out.values())
    assert inputs and all(bool((rows_in(x, test_x) >= 0).all()) for x in inputs)
    inputs.clear()
    task.train_step(task.next_batch())
    assert inputs and all(bool((rows_in(x, train_x) >= 0).all()) for x in inputs)


@pytest.mark.slow
def test_pipeline_test_error_is_measured_on_the_same_images_as_in_process(tmp_path):
    """Catches the pipeline runtime measuring its test error on other images than the in-process
    run of the same config (``data.test_limit`` ignored): a one-stage pipeline is the in-process
    run, so its test errors must be the same, on the first 5 test images (multiples of 20 %)."""
    common = ["data=synthetic", "device=cpu", "profile=paper", "train.steps=4",
              "train.eval_every=2", "train.log_every=2", "train.batch_size=16",
              "checkpoint.every=0", "dni=every_layer", "model.hidden=16",
              "data.options.num_train=64", "data.options.num_test=64",
              "data.options.shape=[1,8,8]", "data.test_limit=5", "runtime.threads=1"]
    histories = []
    for name, extra in (("in", []), ("pipe", ["runtime=pipeline", "runtime.stages=1"])):
        done = sgrun(*common, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path,
                     env={"OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        summary = (tmp_path / name / "summary.json").read_text()
        histories.append(json.loads(summary)["metrics"]["history"])
    assert histories[0] == histories[1]
    assert all(err % 20.0 == 0 for _, err in histories[0])
