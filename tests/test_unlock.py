"""Synthetic inputs (complete unlock) and stochastic layer updates."""

import copy

import pytest
import torch
from configs import make_cfg
from torch import nn

import sgrun.train as train
from sgrun.dni import Placement, SynthesizerSpec, interfaces_of
from sgrun.models.feedforward import FCN
from sgrun.train import run

B, D_IN, CLASSES = 8, 12, 5


def unlocked_fcn(seed=0, synthetic_input=True):
    torch.manual_seed(seed)
    spec = SynthesizerSpec(kind="mlp", hidden=16, layers=1)
    si = SynthesizerSpec(kind="mlp", hidden=16, layers=1) if synthetic_input else None
    model = FCN((D_IN,), CLASSES, layers=3, hidden=10,
                placement=Placement(("all",), spec, synthetic_input=si))
    torch.manual_seed(99)
    # non-zero synthesizers, so every gradient path carries something
    for i in interfaces_of(model):
        for p in i.synthesizer.parameters():
            nn.init.normal_(p, std=0.3)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D_IN, generator=g), torch.randint(0, CLASSES, (B,), generator=g)


def test_input_model_receives_exactly_the_l2_gradient():
    model = unlocked_fcn()
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    h = x
    for name, block in zip(model.cut_names, model.blocks):
        h_real = block(h).detach()
        iface = model.interfaces[name]
        ref = copy.deepcopy(iface.input_model)
        ref.zero_grad()
        (ref(x) - h_real).pow(2).flatten(1).sum(1).mean().backward()  # L_in written out
        for p, p_ref in zip(iface.input_model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7)
        h = iface.input_model(x).detach()  # the next block runs on the synthetic input


def test_nothing_reaches_lower_layers_through_the_synthetic_input():
    """The lower block's gradient is exactly scale * M(h) / B, as with a plain backward
    interface."""
    unlocked, plain = unlocked_fcn(), unlocked_fcn(synthetic_input=False)
    plain.load_state_dict(unlocked.state_dict(), strict=False)
    x, y = data()
    for m in (unlocked, plain):
        nn.functional.cross_entropy(m(x), y).backward()
    for p_u, p_p in zip(unlocked.blocks[0].parameters(), plain.blocks[0].parameters()):
        torch.testing.assert_close(p_u.grad, p_p.grad, rtol=1e-6, atol=1e-8)


def test_upper_layers_run_on_the_synthetic_input_in_training_and_real_activations_in_eval():
    model = unlocked_fcn()
    x, _ = data()
    model.eval()
    real = model(x)
    model.train()
    with torch.no_grad():
        synthetic_head_in = model.interfaces["h2"].input_model(x)
    model.eval()
    torch.testing.assert_close(real, model.head(model.blocks[1](model.blocks[0](x))))
    assert not torch.allclose(model.head(synthetic_head_in), real)


SMOKE = ["data=synthetic", "device=cpu", "train.steps=6", "train.log_every=3", "train.eval_every=3",
         "dni.synthesizer.hidden=16", "model.layers=4"]


@pytest.mark.parametrize("dni", ["every_layer", "cdni", "complete_unlock", "complete_unlock_cdni"])
def test_update_prob_zero_changes_no_parameter(tmp_path, dni):
    cfg = make_cfg(*SMOKE, f"dni={dni}", "train.update_prob=0.0")
    torch.manual_seed(cfg.seed)
    from sgrun.build import build_model, placement_of

    initial = build_model(cfg.model, in_shape=(1, 28, 28), num_classes=10,
                          placement=placement_of(cfg.dni))
    run(cfg, tmp_path)
    final = torch.load(tmp_path / "model.pt")
    for name, p in initial.named_parameters():
        assert torch.equal(final[name], p.detach()), name


@pytest.mark.parametrize("dni", ["every_layer", "complete_unlock_cdni"])
def test_update_prob_one_is_the_ordinary_run_bit_for_bit(tmp_path, monkeypatch, dni):
    run(make_cfg(*SMOKE, f"dni={dni}", "train.update_prob=1.0"), tmp_path / "p1")
    monkeypatch.setattr(train, "skip_updates", lambda *a: 0)  # the loop without stochastic updates
    run(make_cfg(*SMOKE, f"dni={dni}", "train.update_prob=1.0"), tmp_path / "plain")
    a, b = torch.load(tmp_path / "p1" / "model.pt"), torch.load(tmp_path / "plain" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_update_prob_draws_each_layer_group_independently():
    layers = [nn.Linear(2, 2) for _ in range(400)]
    for m in layers:
        m(torch.ones(1, 2)).sum().backward()
    train.skip_updates([[m] for m in layers], 0.2, torch.Generator().manual_seed(0))
    kept = sum(m.weight.grad is not None for m in layers)
    assert 50 <= kept <= 110  # Binomial(400, 0.2): mean 80, sd 8
    # a group moves as one
    assert all((m.weight.grad is None) == (m.bias.grad is None) for m in layers)
