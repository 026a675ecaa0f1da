"""Two networks at two timescales (Jaderberg et al. 2017, sec. 3.2): which gradient of B's loss
reaches A in each coupling, the tick targets, the preset under the smoke profile, bad input, and
resume. CPU only, no network, no real data (images come from the generated ``synthetic`` set)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from configs import make_cfg
from hydra import compose, initialize_config_dir
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from sgrun.checkpoint import Interrupted
from sgrun.cli import CONF_DIR
from sgrun.data.digits import DigitBlock, DigitCountTask, count_targets
from sgrun.dni import Placement, SynthesizerSpec
from sgrun.errors import ConfigError, SgrunError
from sgrun.models.hierarchical import HierarchicalRNN
from sgrun.tasks.two_timescale import count_loss, tick_targets
from sgrun.train import Session, run

B, T, TICKS, H = 5, 3, 4, 6
COUPLINGS = ("none", "dni", "bptt")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny LSTMs: a second thread only waits for the first (and the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def net(coupling, scale=1.0, mode="synthetic", speaking=False, seed=0):
    """A small model; A and B get the same weights for every coupling (they are built first)."""
    torch.manual_seed(seed)
    placement = Placement(("message",), SynthesizerSpec("linear"), scale=scale, mode=mode)
    model = HierarchicalRNN(10, T, T + 1, T * T + 1, hidden_a=H, hidden_b=H, coupling=coupling,
                            placement=placement)
    if speaking:  # a synthesizer that says something (a fresh one returns zero)
        for p in model.interface.synthesizer.parameters():
            nn.init.normal_(p, std=0.3)
    return model


def chunk(seed=1):
    """TICKS ticks of B streams from random (non-zero) states, every tick with a B target."""
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.one_hot(torch.randint(0, 10, (TICKS * T, B), generator=g), 10).float()
    y_b = torch.randint(0, T * T + 1, (TICKS, B), generator=g)
    state = (torch.randn(B, 2 * H, generator=g), torch.randn(B, 2 * H, generator=g))
    return x, y_b, state


def b_loss_and_a_grads(model):
    x, y_b, state = chunk()
    out = model(x, state)
    loss_b = count_loss(out.logits_b, y_b, torch.ones(TICKS, B))
    grads = torch.autograd.grad(loss_b, model.a_parameters(), retain_graph=True, allow_unused=True)
    return loss_b, out, grads


def is_zero(g):
    return g is None or bool(torch.all(g == 0))


# --------------------------------------------------------------------------- gradient paths


def test_none_coupling_gives_a_no_gradient_of_b():
    _, _, grads = b_loss_and_a_grads(net("none"))
    assert all(g is None for g in grads)


def test_bptt_coupling_gives_a_the_true_gradient_of_b():
    model = net("bptt")
    _, _, grads = b_loss_and_a_grads(model)
    # A's read-out is not on the message's path
    lstm_a = grads[:len(list(model.lstm_a.parameters()))]
    assert all(g is not None and g.abs().sum() > 0 for g in lstm_a)


def test_dni_with_a_zero_synthesizer_gives_a_nothing_of_b():
    """Jaderberg et al. 2017, sec. 3: a fresh synthesizer predicts zero, so A starts as with
    coupling=none."""
    _, _, grads = b_loss_and_a_grads(net("dni"))
    assert all(is_zero(g) for g in grads)


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_dni_gives_a_exactly_the_synthetic_gradient_pulled_back(scale):
    """The only path from B's loss into A is the synthesizer: A's gradient of L_B is the pull-back
    of scale * M(message) / rows through A's blocks, whatever B did with the message."""
    model = net("dni", scale=scale, speaking=True)
    _, out, grads = b_loss_and_a_grads(model)
    message = out.message  # [TICKS, B, H]
    rows = message.shape[0] * message.shape[1]
    with torch.no_grad():
        delta_hat = model.interface.synthesizer(message.flatten(0, 1)).view_as(message)
    want = torch.autograd.grad(message, model.a_parameters(), grad_outputs=scale * delta_hat / rows,
                               allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for g, w in zip(grads, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_dni_train_only_passes_the_true_gradient_like_bptt():
    _, _, bptt = b_loss_and_a_grads(net("bptt"))
    _, _, train_only = b_loss_and_a_grads(net("dni", mode="train_only", speaking=True))
    for a, b in zip(bptt, train_only, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_the_synthesizer_regresses_on_bs_true_gradient_at_the_message():
    """Its regression target is dL_B/d(message) in per-row units, i.e. what coupling=bptt would
    pass."""
    model = net("dni", speaking=True)
    loss_b, out, _ = b_loss_and_a_grads(model)
    loss_b.backward()
    true = net("bptt")
    x, y_b, state = chunk()
    t_out = true(x, state)
    t_loss = count_loss(t_out.logits_b, y_b, torch.ones(TICKS, B))
    target = torch.autograd.grad(t_loss, t_out.message)[0].flatten(0, 1) * TICKS * B  # [rows, H]
    with torch.no_grad():
        pred = model.interface.synthesizer(out.message.flatten(0, 1))
    torch.testing.assert_close(model.interface.record.sg_loss, (pred - target).pow(2).sum(1).mean())


def test_coupling_changes_only_what_reaches_a():
    """B's gradient and A's own gradient are the same in every coupling."""
    x, y_b, state = chunk()
    y_a = torch.randint(0, T + 1, (TICKS, B), generator=torch.Generator().manual_seed(2))
    grads = {}
    for coupling in COUPLINGS:
        model = net(coupling, speaking=coupling == "dni")
        out = model(x, state)
        ones = torch.ones(TICKS, B)
        g_b = torch.autograd.grad(count_loss(out.logits_b, y_b, ones), model.b_parameters())
        g_a = torch.autograd.grad(count_loss(out.logits_a, y_a, ones), model.a_parameters())
        grads[coupling] = (g_b, g_a)
    for coupling in ("dni", "bptt"):
        for mine, ref in zip(grads[coupling][0] + grads[coupling][1],
                             grads["none"][0] + grads["none"][1]):
            torch.testing.assert_close(mine, ref)


def test_a_is_truncated_at_every_tick():
    """No gradient crosses a block of T steps: the message of tick 2 does not depend on tick 1's
    inputs."""
    model = net("bptt")
    x, _, state = chunk()
    x = x.clone().requires_grad_(True)
    out = model(x, state)
    (g,) = torch.autograd.grad(out.message[1].sum(), x)
    assert torch.all(g[:T] == 0) and g[T:2 * T].abs().sum() > 0 and torch.all(g[2 * T:] == 0)


# --------------------------------------------------------------------------- targets at the ticks


def test_tick_targets_on_a_hand_made_stream():
    # blocks [3 1 4] [1 5 9] [2 6 5] [3 5 3]
    digits = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 3]).view(12, 1)
    y_a, y_b, mask_a, mask_b = count_targets(digits, 3)
    block = DigitBlock(nn.functional.one_hot(digits, 10).float(), y_a, y_b, mask_a, mask_b, digits)
    a, b, ma, mb = tick_targets(block, 3)
    assert a.flatten().tolist() == [2, 3, 1, 3]  # odd digits in each block
    assert ma.flatten().tolist() == [1, 1, 1, 1]
    assert b.flatten().tolist() == [0, 0, 1, 2]  # 3s in the last 9 digits, from the third tick on
    assert mb.flatten().tolist() == [0, 0, 1, 1]


def test_training_chunks_line_up_with_the_ticks():
    """Chunk after chunk, the rows the loop reads are the targets of the whole stream at its
    ticks."""
    task = DigitCountTask(2, T, seed=4)
    blocks = [task.next_block(2 * T) for _ in range(4)]  # 4 chunks of 2 ticks
    digits = torch.cat([b.digits for b in blocks])
    y_a, y_b, mask_a, mask_b = count_targets(digits, T)
    got = [torch.cat(parts) for parts in zip(*(tick_targets(b, T) for b in blocks))]
    ticks = slice(T - 1, None, T)
    for mine, want in zip(got, (y_a[ticks], y_b[ticks], mask_a[ticks], mask_b[ticks]),
                          strict=True):
        assert torch.equal(mine, want)
    # B: fewer than T*T digits seen
    assert got[3].flatten().tolist()[:2 * (T - 1)] == [0] * 2 * (T - 1)


# --------------------------------------------------------------------------- the preset


def tags_of(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_preset_is_the_coupling_sweep():
    cfg = make_cfg("experiment=two_timescale", "profile=cpu")
    assert (cfg.model.family == "hrnn" and cfg.name == "two_timescale"
            and cfg.dni.cuts == ["message"])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose("config", overrides=["experiment=two_timescale"], return_hydra_config=True)
    assert str(full.hydra.sweeper.params["model.coupling"]).split(",") == list(COUPLINGS)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_every_coupling_runs_under_smoke(coupling, tmp_path):
    cfg = make_cfg("experiment=two_timescale", "profile=smoke", f"model.coupling={coupling}")
    # generated images, no MNIST
    assert cfg.data.mode == "images" and cfg.data.images == "synthetic"
    metrics = run(cfg, tmp_path)
    assert metrics["steps"] == 4 and metrics["primary"] == metrics["error_b"]
    assert 0 <= metrics["error_a"] <= 100 and 0 <= metrics["error_b"] <= 100
    assert [h[0] for h in metrics["history"]] == [2, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["config"]["model"]["coupling"] == coupling
            and summary["metrics"]["error_b"] == metrics["error_b"])
    tags = tags_of(tmp_path)
    assert {"error/A", "error/B", "loss/A", "loss/B"} <= tags
    dni_tags = {"dni/message/sg_loss", "dni/message/cosine"}
    assert dni_tags <= tags if coupling == "dni" else not dni_tags & tags


@pytest.mark.parametrize("data", [["data=digits"], ["data.image_options={}"]])
def test_digit_classes_and_default_image_options_run_under_smoke(data, tmp_path):
    cfg = make_cfg("experiment=two_timescale", "profile=smoke", *data)
    assert cfg.data.mode == ("classes" if data == ["data=digits"] else "images")
    assert run(cfg, tmp_path)["steps"] == 4


def test_a_learns_to_count_odd_digits(tmp_path):
    """Real learning, small: chance is about 62 % error (always answering the most frequent
    count)."""
    cfg = make_cfg("experiment=two_timescale", "profile=smoke", "data=digits",
                   "train.steps=150", "train.eval_every=150", "train.log_every=150",
                   "model.hidden_a=32", "train.batch_size=16", "optim.lr=1e-2",
                   "data.eval_ticks=64", "data.eval_batch_size=16")
    metrics = run(cfg, tmp_path)
    assert metrics["baseline_a"] > 50 and metrics["error_a"] < 20


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, words", [
    ("model.T=0", ["model.T must be >= 1 (got 0)", "model.T=3"]),
    ("model.T=-2", ["model.T must be >= 1", "model.T=3"]),
    ("model.coupling=sometimes",
     ["model.coupling must be one of none, dni, bptt", "model.coupling=dni"]),
    ("model.truncation_b=0", ["model.truncation_b must be >= 1", "model.truncation_b=6"]),
    ("data.mode=pixels", ["data.mode must be one of classes, images", "data.mode=classes"]),
    ("dni=none", ["model.coupling=dni needs a synthesizer", "dni=message"]),
    ("dni.conditioned=true", ["no label to condition on", "dni=message"]),
    ("data=mnist", ["not data=mnist", "data=digits"]),
])
def test_bad_input_is_one_line(override, words, tmp_path):
    cfg = make_cfg("experiment=two_timescale", "profile=smoke", override)
    with pytest.raises(SgrunError) as err:
        run(cfg, tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "run" / "summary.json").exists()


def test_model_rejects_bad_arguments():
    with pytest.raises(ConfigError, match=r"T must be an integer >= 1 \(got 0\)"):
        HierarchicalRNN(10, 0, 1, 1)
    with pytest.raises(ConfigError, match="coupling must be one of none, dni, bptt"):
        HierarchicalRNN(10, 3, 4, 10, coupling="both")
    with pytest.raises(ValueError, match="whole blocks"):
        net("none")(torch.zeros(T + 1, B, 10), net("none").initial_state(B))


# --------------------------------------------------------------------------- resume


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    cfg = make_cfg("experiment=two_timescale", "profile=smoke", "data=digits", "model.coupling=dni",
                   "train.steps=6", "checkpoint.every=2")
    whole = run(cfg, tmp_path / "whole")

    real_step_done = Session.step_done

    def sigterm_at_step_3(self, step, total, loop_state):
        if step == 3:
            self.ckpt.stop_signal = signal.SIGTERM  # as the handler would: save, then stop
        real_step_done(self, step, total, loop_state)

    monkeypatch.setattr(Session, "step_done", sigterm_at_step_3)
    with pytest.raises(Interrupted, match="step 3/6"):
        run(cfg, tmp_path / "cut")
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run(cfg, tmp_path / "cut")
    drop = lambda m: {k: v for k, v in m.items()
                      if k not in ("minutes", "seconds") and not k.endswith("_per_sec")}
    assert drop(resumed) == drop(whole)
    a, b = torch.load(tmp_path / "whole" / "model.pt"), torch.load(tmp_path / "cut" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
