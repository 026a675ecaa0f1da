"""Recurrent DNI (Jaderberg et al. 2017, sec. 3.1): gradient algebra of one truncated block, the
Table 1 presets under the smoke profile, and one-line errors for bad input.  CPU only, no network,
no real data."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import sgrun.tasks.sequence as sequence_task
from sgrun.build import build_sequence_stream
from sgrun.cli import CONF_DIR
from sgrun.data.copy_task import CopyTask
from sgrun.data.ptb import PTBStream
from sgrun.data.tasks import Block
from sgrun.dni import GradientSynthesizer, Placement, SynthesizerSpec
from sgrun.dni.recurrent import aux_target, block_loss, future_gradient_quality, truncated_step
from sgrun.errors import ConfigError, DataError, SgrunError
from sgrun.models.rnn import RecurrentNet
from sgrun.tasks.sequence import copy_step_loss, lm_step_loss, read_block
from sgrun.train import run

CONF = Path(CONF_DIR)
PRESETS = ("table1_copy", "table1_repeat_copy", "table1_ptb")
B, IN, OUT, H, K = 5, 4, 3, 6, 3


def net(scale=0.1, aux=False, dni=True, token_input=False, seed=0, input_size=IN, output_size=OUT):
    torch.manual_seed(seed)
    placement = Placement(("state",), SynthesizerSpec("linear"), scale=scale) if dni else None
    model = RecurrentNet(input_size, output_size, hidden=H, token_input=token_input,
                         placement=placement, aux=aux)
    # a synthesizer that says something (a fresh one returns zero)
    if model.synthesizer is not None:
        for p in model.synthesizer.parameters():
            nn.init.normal_(p, std=0.3)
    return model


def copy_block(k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, B, IN, generator=g)
    y = torch.randint(0, 2, (k, B, OUT), generator=g).float()
    mask = torch.randint(0, 2, (k, B), generator=g).float()
    return x, y, mask


def grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


# --------------------------------------------------------------------------- gradient algebra


def test_block_start_gradient_is_in_block_plus_scaled_injection():
    model = net(scale=0.1)
    x, y, mask = copy_block()
    state = torch.randn(B, 2 * H)
    step = truncated_step(model, x, y, mask, state, copy_step_loss)
    core = model.core_parameters()
    got_core = grads(core)
    got_synth = grads(model.synthesizer.parameters())

    # The two parts, each from its own backward pass.
    s0 = state.clone().requires_grad_(True)
    out = model(x, s0)
    loss = block_loss(copy_step_loss(out.logits, y), mask)
    sg_end = model.synthesizer(out.state).detach()  # per-stream units
    injected = 0.1 * sg_end / B
    g_in = torch.autograd.grad(loss, s0, retain_graph=True)[0]
    g_inj = torch.autograd.grad(out.state, s0, injected, retain_graph=True)[0]
    expected = B * (g_in + g_inj)
    assert torch.allclose(step.delta_start, expected, atol=1e-6)
    assert torch.allclose(step.loss, loss.detach())  # the reported loss is the real one
    assert g_inj.abs().sum() > 0 and g_in.abs().sum() > 0

    # The core gets the in-block gradient plus the injected one ...
    want_core = torch.autograd.grad(loss + (out.state * injected).sum(), core, allow_unused=True)
    for got, want in zip(got_core, want_core):
        assert torch.allclose(got, torch.zeros_like(got) if want is None else want, atol=1e-6)
    # ... and the synthesizer regresses its prediction at the block start on that arriving gradient.
    sg_loss = (model.synthesizer(state) - expected).pow(2).sum(1).mean()
    want_synth = torch.autograd.grad(sg_loss, list(model.synthesizer.parameters()))
    for got, want in zip(got_synth, want_synth):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(step.sg_loss, sg_loss.detach(), atol=1e-6)


def test_zero_initialised_synthesizer_starts_as_plain_truncation():
    torch.manual_seed(0)
    dni = RecurrentNet(IN, OUT, hidden=H,
                       placement=Placement(("state",), SynthesizerSpec("linear"), scale=0.1))
    bptt = RecurrentNet(IN, OUT, hidden=H)
    bptt.load_state_dict({k: v for k, v in dni.state_dict().items()
                          if not k.startswith("synthesizer")})
    x, y, mask = copy_block()
    state = torch.randn(B, 2 * H)
    truncated_step(dni, x, y, mask, state, copy_step_loss)
    truncated_step(bptt, x, y, mask, state, copy_step_loss)
    for a, b in zip(grads(dni.core_parameters()), grads(bptt.parameters())):
        assert torch.equal(a, b)


class OracleSynthesizer(GradientSynthesizer):
    """Returns the true future gradient (per stream) of every state it was told about, else zero."""

    def __init__(self, table: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.table = table
        self.unused = nn.Parameter(torch.zeros(()))  # so that its regression loss has a parameter

    def forward(self, h, context=None):
        for state, grad in self.table:
            if torch.equal(state, h.detach()):
                return grad + 0 * self.unused
        return torch.zeros_like(h) + 0 * self.unused


@pytest.mark.parametrize("task", ["copy", "lm"])
def test_oracle_synthesizer_makes_truncated_bptt_equal_full_bptt(task):
    blocks, vocab = 4, 7
    g = torch.Generator().manual_seed(3)
    if task == "copy":
        model = net(dni=False)
        xs = torch.randn(blocks * K, B, IN, generator=g)
        ys = torch.randint(0, 2, (blocks * K, B, OUT), generator=g).float()
        mask = torch.randint(0, 2, (blocks * K, B), generator=g).float()
        step_loss = copy_step_loss
    else:
        model = net(dni=False, token_input=True, input_size=vocab, output_size=vocab)
        xs = torch.randint(0, vocab, (blocks * K, B), generator=g)
        ys = torch.randint(0, vocab, (blocks * K, B), generator=g)
        mask = torch.ones(blocks * K, B)
        step_loss = lm_step_loss
    state0 = 0.5 * torch.randn(B, 2 * H, generator=g)

    # Full BPTT over the whole sequence: the objective is the sum of the block losses.
    state, ends, total = state0, [], 0.0
    for b in range(blocks):
        sl = slice(b * K, (b + 1) * K)
        out = model(xs[sl], state)
        total = total + block_loss(step_loss(out.logits, ys[sl]), mask[sl])
        state = out.state
        ends.append(state)
    params = list(model.parameters())
    full = torch.autograd.grad(total, params + ends, allow_unused=True)
    full_params = full[: len(params)]
    # no loss after the last block: its end state's future gradient is zero
    true_future = [torch.zeros_like(s) if g is None else g
                   for s, g in zip(ends, full[len(params):])]

    # Truncated BPTT, each block end given the true gradient of all later losses
    # (per stream, scale 1).
    table = [(s.detach(), B * gr) for s, gr in zip(ends, true_future)]
    model.synthesizer, model.scale, model.mode = OracleSynthesizer(table), 1.0, "synthetic"
    model.zero_grad()
    state = state0
    for b in range(blocks):
        sl = slice(b * K, (b + 1) * K)
        step = truncated_step(model, xs[sl], ys[sl], mask[sl], state, step_loss)
        if b > 0:  # what arrives at a block start is exactly the true future gradient of that state
            assert torch.allclose(step.delta_start, B * true_future[b - 1], atol=1e-5)
            assert float(step.sg_loss) < 1e-9
        state = step.state
    for p, want in zip(params, full_params):
        assert torch.allclose(p.grad, want, atol=1e-6), "truncated BPTT + oracle DNI != full BPTT"


def test_aux_loss_reaches_the_core_and_not_the_synthesizer_target():
    model = net(scale=0.0, aux=True)
    x, y, _ = copy_block()
    x_next = copy_block(seed=2)[0]
    no_targets = torch.zeros(K, B)  # no task loss: every core gradient comes from the aux loss
    state = torch.randn(B, 2 * H)
    step = truncated_step(model, x, y, no_targets, state, copy_step_loss, aux_weight=1.0,
                          x_next=x_next)
    assert float(step.aux_loss) > 0
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0"):
        assert getattr(model.lstm, name).grad.abs().sum() > 0, name
    assert model.aux_head.weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() == 0  # the read-out is not on the aux path
    # the aux gradient is no part of the synthesizer's target
    assert step.delta_start.abs().sum() == 0
    synth_grads = grads(model.synthesizer.parameters())

    model.zero_grad()  # with aux_weight 0 the same block leaves the core untouched ...
    truncated_step(model, x, y, no_targets, state, copy_step_loss, aux_weight=0.0, x_next=x_next)
    assert model.lstm.weight_hh_l0.grad.abs().sum() == 0
    # ... and the synthesizer as it was
    for a, b in zip(synth_grads, grads(model.synthesizer.parameters())):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="x_next"):
        truncated_step(model, x, y, no_targets, state, copy_step_loss, aux_weight=1.0)


def lstm_by_hand(model, x, state):
    """The LSTM equations step by step (gate order i, f, g, o), from ``state = [h, c]``: the end
    state."""
    lstm = model.lstm
    h, c = state[:, :H], state[:, H:]
    for x_t in x:
        gates = (x_t @ lstm.weight_ih_l0.T + lstm.bias_ih_l0
                 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return torch.cat([h, c], dim=1)


def test_aux_target_is_the_synthetic_gradient_at_the_end_of_the_next_block():
    model = net(aux=True)
    x, y, mask = copy_block()
    x_next = copy_block(seed=2)[0]
    state = torch.randn(B, 2 * H)
    weight = 0.5
    step = truncated_step(model, x, y, mask, state, copy_step_loss, aux_weight=weight,
                          x_next=x_next)
    with torch.no_grad():
        s_k = lstm_by_hand(model, x, state)  # this block's end
        # the next block's end, from s_k with the same weights
        s_2k = lstm_by_hand(model, x_next, s_k)
        assert torch.allclose(step.state, s_k, atol=1e-6)
        target = model.synthesizer(s_2k)  # M(s_2k): what the synthesizer gives k steps later
        err = model.aux_head(s_k) - target  # [B, 2H]
        want = err.pow(2).sum(1).mean()
        # the block-end prediction M(s_k) (the in-block target) is a different regression
        assert not torch.allclose(
            want, (model.aux_head(s_k) - model.synthesizer(s_k)).pow(2).sum(1).mean())
    assert torch.allclose(step.aux_loss, want, atol=1e-5)
    # The head's gradient of aux_weight * mean_i ||A s_k,i + b - t_i||^2 (it is on no other path).
    assert torch.allclose(model.aux_head.weight.grad, weight * 2 / B * err.T @ s_k, atol=1e-5)
    assert torch.allclose(model.aux_head.bias.grad, weight * 2 / B * err.sum(0), atol=1e-5)
    assert torch.allclose(aux_target(model, s_k, x_next), target, atol=1e-6)


def test_look_ahead_leaves_the_stream_as_it_was():
    """read_block with the look-ahead gives the same blocks, curriculum and task state as without,
    and its look-ahead is the next block's inputs (unless the curriculum advanced in between)."""
    g = torch.Generator().manual_seed(5)
    for make in (lambda: CopyTask(4, bits=3, seed=2, repeat=True, window=6),
                 lambda: PTBStream(torch.randint(0, 7, (200,), generator=g), 4, vocab_size=7)):
        ahead_task, plain = make(), make()
        if isinstance(ahead_task, PTBStream):
            plain._data = ahead_task._data  # the same text
        previous, checked, advanced = None, 0, 0
        for i in range(60):
            block, ahead = read_block(ahead_task, K, look_ahead=True)
            same, none = read_block(plain, K)
            assert none is None
            for a, b in zip((block.x, block.y, block.mask), (same.x, same.y, same.mask)):
                assert torch.equal(a, b)
            if previous is not None:
                assert torch.equal(previous, block.x)
                checked += 1
            previous = ahead
            if isinstance(ahead_task, CopyTask):
                errors = ((torch.rand(K, 4, generator=g) < (0.05 if i % 4 else 1.0)).float()
                          * 3 * block.mask)
                went_on = ahead_task.report(errors)
                assert plain.report(errors) == went_on
                advanced += went_on
                if went_on:
                    previous = None  # new episodes of the next block start at the new level
        assert ahead_task.state_dict() == plain.state_dict()
        assert checked > 30
        if isinstance(ahead_task, CopyTask):
            assert advanced >= 2 and ahead_task.level >= 2


@pytest.mark.parametrize("preset", PRESETS)
def test_aux_run_reads_the_same_stream_and_looks_ahead_at_the_next_block(preset, tmp_path, tiny_ptb,
                                                                         monkeypatch):
    """A dni=every_k_aux run trains on exactly the stream a fresh task gives, and the look-ahead of
    every block is the next block's inputs (curriculum frozen, so the stream does not depend on the
    model)."""
    seen = []

    def recording(model, x, y, mask, state, step_loss, aux_weight=0.0, x_next=None):
        seen.append((x.clone(), y.clone(), mask.clone(), x_next.clone()))
        return truncated_step(model, x, y, mask, state, step_loss, aux_weight, x_next)

    monkeypatch.setattr(sequence_task, "truncated_step", recording)
    frozen = [] if preset == "table1_ptb" else ["data.options.threshold=1e-9"]
    cfg = compose_preset(preset, "profile=smoke", "dni=every_k_aux", "model.k=3", "train.steps=12",
                         *frozen, ptb=tiny_ptb if preset == "table1_ptb" else None)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["steps"] == len(seen) == 12
    fresh, _ = build_sequence_stream(cfg, int(cfg.train.batch_size))
    for i, (x, y, mask, x_next) in enumerate(seen):
        block = fresh.next_block(3)
        assert (torch.equal(x, block.x) and torch.equal(y, block.y)
                and torch.equal(mask, block.mask)), i
        if i + 1 < len(seen):
            assert torch.equal(x_next, seen[i + 1][0]), i


def test_cosine_of_an_oracle_is_one():
    model = net(scale=0.5)
    g = torch.Generator().manual_seed(7)
    horizon = 2 * K
    future = Block(x=torch.randn(horizon, B, IN, generator=g),
                   y=torch.randint(0, 2, (horizon, B, OUT), generator=g).float(),
                   mask=torch.ones(horizon, B))
    state = torch.randn(B, 2 * H, generator=g)
    s = state.clone().requires_grad_(True)
    out = model(future.x, s)
    per_step = copy_step_loss(out.logits, future.y)
    first, second = per_step[:K].mean(), per_step[K:].mean()
    true = B * torch.autograd.grad(first + second, s, retain_graph=True)[0]
    target = B * torch.autograd.grad(first + 0.5 * second, s)[0]
    model.synthesizer = OracleSynthesizer([(state, true)])
    q = future_gradient_quality(model, state, future, K, copy_step_loss)
    assert q["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert q["mse_true"] == pytest.approx(0.0, abs=1e-8)
    assert q["cosine_target"] < 1.0 - 1e-4
    model.synthesizer = OracleSynthesizer([(state, target)])
    assert (future_gradient_quality(model, state, future, K, copy_step_loss)["cosine_target"]
            == pytest.approx(1.0, abs=1e-5))


def test_model_rejects_bad_sizes_and_placements():
    with pytest.raises(ConfigError, match="model.hidden"):
        RecurrentNet(IN, OUT, hidden=0)
    with pytest.raises(ConfigError, match="no cut named 'h1'"):
        RecurrentNet(IN, OUT, hidden=H, placement=Placement(("h1",), SynthesizerSpec("linear")))
    with pytest.raises(ConfigError, match="every_k"):
        RecurrentNet(IN, OUT, hidden=H,
                     placement=Placement(("all",), SynthesizerSpec("linear"), conditioned=True))
    with pytest.raises(ConfigError, match="every_k_aux"):
        RecurrentNet(IN, OUT, hidden=H, aux=True)


# --------------------------------------------------------------------------- presets and runs


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "<unk>", "N"]


def write_tiny_ptb(root: Path) -> dict[str, str]:
    """PTB-format word files (a leading space, words separated by spaces, one sentence a line)."""
    rng = random.Random(0)
    sums = {}
    (root / "ptb").mkdir(parents=True)
    for split, lines in (("train", 120), ("valid", 25), ("test", 25)):
        text = "".join(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + " \n"
                       for _ in range(lines))
        if split == "train":
            # every symbol in train
            text = " " + " ".join(sorted(set("".join(WORDS)))) + " \n" + text
        (root / "ptb" / f"ptb.{split}.txt").write_text(text)
        sums[split] = hashlib.md5(text.encode()).hexdigest()
    return sums


@pytest.fixture(scope="module")
def tiny_ptb(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, write_tiny_ptb(root)


def compose_preset(preset, *overrides, ptb=None, hydra_config=False):
    extra = []
    if ptb is not None:
        root, sums = ptb
        extra = [f"data_dir={root}", "data.download=false",
                 "data.checksums={" + ",".join(f"{k}:{v}" for k, v in sums.items()) + "}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={preset}", *extra, *overrides],
                       return_hydra_config=hydra_config)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_the_table1_sweep(preset):
    paper = compose_preset(preset, "profile=paper", hydra_config=True).hydra.sweeper.params
    assert [int(v) for v in str(paper["model.k"]).split(",")] == [2, 3, 4, 5, 8]
    cfg = compose_preset(preset, "profile=cpu", hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert [int(v) for v in str(params["model.k"]).split(",")] == [3, 5]  # the cpu profile's k
    assert str(params["dni"]).split(",") == ["none", "every_k", "every_k_aux"]
    assert cfg.model.family == "rnn" and cfg.name == preset
    # the preset's own cpu budget, as it runs: copy tasks to a plateau, with a 60k-step cap for
    # Copy and 200k for Repeat Copy (whose DNI + Aux runs at k = 5 were still advancing at 60k)
    steps = {"table1_ptb": 3000, "table1_repeat_copy": 200000}.get(preset, 60000)
    assert cfg.train.steps == steps and cfg.optim.lr == 3e-3
    if preset != "table1_ptb":
        assert cfg.train.plateau_samples == 150000 and cfg.data.options.bits == 4
    assert cfg.optim.decay_at == []  # sec. 3.1: no learning-rate decay


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dni", ["none", "every_k", "every_k_aux"])
def test_preset_runs_under_smoke(preset, dni, tmp_path, tiny_ptb):
    cfg = compose_preset(preset, "profile=smoke", f"dni={dni}", "model.k=2",
                         ptb=tiny_ptb if preset == "table1_ptb" else None)
    assert cfg.dni.name == {"none": "bptt", "every_k": "dni", "every_k_aux": "dni_aux"}[dni]
    metrics = run(cfg, tmp_path / "run")
    assert metrics["steps"] >= 1 and "primary" in metrics
    if preset == "table1_ptb":
        assert metrics["primary"] == metrics["bpc_test"] and 0 < metrics["bpc_test"] < 10
        assert metrics["bpc_valid_best"] == min(bpc for _, _, bpc in metrics["history"])
    else:
        assert metrics["primary"] == -metrics["largest_n"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["primary"] == metrics["primary"]
    assert any((tmp_path / "run" / "tb").iterdir())


def test_copy_curriculum_advances_with_dni(tmp_path):
    """Real learning, small: DNI solves N = 1 of Copy (3-step episodes) within the smoke budget
    x 100."""
    cfg = compose_preset("table1_copy", "profile=smoke", "dni=every_k", "model.k=3",
                         "train.steps=400", "model.hidden=32", "train.batch_size=16",
                         "optim.lr=1e-2", "train.sg_quality=false")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["largest_n"] >= 1


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, fix", [
    ("model.k=0", "model.k=3"),
    ("model.hidden=0", "model.hidden=256"),
    ("data.options.bits=0", "data.options.bits=8"),
    ("dni.aux_weight=-1", "dni.aux_weight=1.0"),
    ("data=mnist", "data=copy"),
    ("+data.options.colour=red", "conf/data/copy.yaml"),
])
def test_bad_input_is_one_line(override, fix, tmp_path):
    cfg = compose_preset("table1_copy", "profile=smoke", override)
    with pytest.raises(SgrunError) as err:
        run(cfg, tmp_path / "run")
    assert fix in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_missing_and_corrupt_ptb(tmp_path, tiny_ptb):
    cfg = compose_preset("table1_ptb", "profile=smoke", f"data_dir={tmp_path / 'empty'}",
                         "data.download=false")
    with pytest.raises(DataError) as err:
        run(cfg, tmp_path / "a")
    assert "ptb.train.txt" in str(err.value) and "\n" not in str(err.value)
    root, sums = tiny_ptb
    bad = dict(sums, valid="0" * 32)
    cfg = compose_preset("table1_ptb", "profile=smoke", ptb=(root, bad))
    with pytest.raises(DataError) as err:
        run(cfg, tmp_path / "b")
    assert "ptb.valid.txt" in str(err.value) and "\n" not in str(err.value)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sgrun", "experiment=table1_copy", "profile=smoke",
                           "model.k=0", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (len(lines) == 1
            and lines[0].startswith("sgrun: error: model.k must be >= 1")), proc.stderr


def test_bench_prints_the_table(capsys):
    from sgrun import bench_rnn

    threads = torch.get_num_threads()
    try:
        bench_rnn.main(["--steps", "2", "--warmup", "1", "--hidden", "8", "--batch", "4",
                        "--k", "5", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "BPTT" in out and "DNI" in out and "DNI/BPTT" in out



def test_plateau_rule_stops_a_copy_run_whose_curriculum_stopped(tmp_path):
    """train.plateau_samples: a run stops once its curriculum has not advanced for that many
    episodes, before the step cap, and says so in its metrics."""
    cfg = compose_preset("table1_copy", "profile=smoke", "dni=every_k", "model.k=3",
                         "train.steps=400", "train.plateau_samples=40", "train.sg_quality=false")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["plateau_reached"] is True
    assert metrics["steps"] < 400
    assert metrics["samples_seen"] - metrics["samples_at_largest"] >= 40
    capped = run(compose_preset("table1_copy", "profile=smoke", "dni=every_k", "model.k=3",
                                "train.steps=20", "train.sg_quality=false"), tmp_path / "capped")
    assert capped["steps"] == 20 and capped["plateau_reached"] is False


def test_plateau_rule_is_refused_for_ptb(tiny_ptb):
    cfg = compose_preset("table1_ptb", "profile=smoke", "+train.plateau_samples=5", ptb=tiny_ptb)
    with pytest.raises(ConfigError, match="plateau_samples.*patience"):
        sequence_task.Sequence(cfg, torch.device("cpu"))
