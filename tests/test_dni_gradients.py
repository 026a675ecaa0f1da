"""The gradient algebra of backward interfaces, checked against plain autograd on tiny nets."""

import copy

import pytest
import torch
from torch import nn

from sgrun.dni import (
    BackwardInterface,
    GradientSynthesizer,
    LinearSynthesizer,
    Placement,
    SynthesizerSpec,
    interfaces_of,
)
from sgrun.models.feedforward import CNN, FCN

B, D_IN, CLASSES = 8, 12, 5


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D_IN, generator=g), torch.randint(0, CLASSES, (B,), generator=g)


def fcn(kind="mlp", mode="synthetic", scale=1.0, conditioned=False, cuts=("all",), layers=3,
        seed=0):
    torch.manual_seed(seed)
    spec = SynthesizerSpec(kind=kind, hidden=16, layers=1)
    return FCN((D_IN,), CLASSES, layers=layers, hidden=10,
               placement=Placement(cuts=cuts, synthesizer=spec, conditioned=conditioned, mode=mode,
                                   scale=scale))


def randomize_synthesizers(model, std=0.3):
    torch.manual_seed(123)
    for i in interfaces_of(model):
        for p in i.synthesizer.parameters():
            nn.init.normal_(p, std=std)


def grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in module.named_parameters()}


def loss_of(model, x, y, conditioned=False):
    ctx = nn.functional.one_hot(y, CLASSES).float() if conditioned else None
    return nn.functional.cross_entropy(model(x, ctx), y)


def backprop_reference(model, x, y):
    """Gradients of plain backprop (every interface off) and the true dL/dh at each cut."""
    ref = copy.deepcopy(model)
    for i in interfaces_of(ref):
        i.mode = "off"
    cut_grads = {}

    def keep_grad(name):
        def hook(module, args, out):
            out.register_hook(lambda g: cut_grads.__setitem__(name, g))
        return hook

    hooks = [blk.register_forward_hook(keep_grad(n)) for n, blk in zip(ref.cut_names, ref.blocks)]
    ref.zero_grad()
    loss_of(ref, x, y).backward()
    for h in hooks:
        h.remove()
    return grads(ref), cut_grads


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_zero_initialised_synthesizer_gives_zero_lower_gradients(kind):
    model = fcn(kind)
    x, y = batch()
    loss_of(model, x, y).backward()
    for blk in model.blocks:  # every hidden block sits below an interface
        for p in blk.parameters():
            assert torch.count_nonzero(p.grad) == 0
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.head.parameters())


class Oracle(GradientSynthesizer):
    """Returns a fixed per-example gradient: the true one, computed beforehand."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, h, context=None):
        return self.value + 0 * self.dummy


def test_oracle_synthesizer_reproduces_backprop():
    model = fcn("mlp")
    x, y = batch()
    ref_grads, cut_grads = backprop_reference(model, x, y)
    for i in interfaces_of(model):
        i.synthesizer = Oracle(cut_grads[i.name] * B)  # per-example units
    loss_of(model, x, y).backward()
    got = grads(model)
    for n, g in ref_grads.items():
        if n.startswith("interfaces."):
            continue
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("conditioned", [False, True])
def test_train_only_leaves_model_gradients_bit_identical(conditioned):
    model = fcn("mlp", mode="train_only", conditioned=conditioned)
    randomize_synthesizers(model)  # non-zero synthesizers: a leak into lower layers would show
    x, y = batch()
    ref_grads, _ = backprop_reference(model, x, y)
    loss_of(model, x, y, conditioned).backward()
    got = grads(model)
    for n, g in ref_grads.items():
        if not n.startswith("interfaces."):
            assert torch.equal(got[n], g), n
    # while the synthesizers did learn
    assert all(torch.count_nonzero(p.grad) > 0
               for i in interfaces_of(model) for p in i.synthesizer.parameters())


def explicit_sg_loss(synth, h, target, context=None):
    """L_sg = mean_i ||M(h_i) - target_i||^2 written out by hand."""
    return (synth(h, context) - target).pow(2).flatten(1).sum(1).mean()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_synthesizer_gradient_equals_autograd_on_l2(kind):
    model = fcn(kind, cuts=("h2",))
    randomize_synthesizers(model)
    x, y = batch()
    _, cut_grads = backprop_reference(model, x, y)
    iface = model.interfaces["h2"]
    h2 = model.blocks[1](model.blocks[0](x)).detach()
    synth_ref = copy.deepcopy(iface.synthesizer)
    explicit_sg_loss(synth_ref, h2, cut_grads["h2"] * B).backward()
    model.zero_grad()
    loss_of(model, x, y).backward()
    for (n, p), p_ref in zip(iface.synthesizer.named_parameters(), synth_ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(iface.record.sg_loss,
                               explicit_sg_loss(synth_ref, h2, cut_grads["h2"] * B).detach())


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_stacked_interfaces_bootstrap_through_one_layer(scale):
    """Lower target = (dh2/dh1)^T (scale * upper synthetic gradient), in per-example units."""
    model = fcn("mlp", scale=scale)
    randomize_synthesizers(model)
    x, y = batch()
    lower, upper = model.interfaces["h1"], model.interfaces["h2"]
    synth_lower = copy.deepcopy(lower.synthesizer)
    # explicit: the pull-back of the upper synthetic gradient through block 2
    h1 = model.blocks[0](x).detach().requires_grad_(True)
    h2 = model.blocks[1](h1)
    with torch.no_grad():
        delta2 = copy.deepcopy(upper.synthesizer)(h2.detach())
    (pulled,) = torch.autograd.grad(h2, h1, grad_outputs=scale * delta2 / B)
    explicit_sg_loss(synth_lower, h1.detach(), pulled * B).backward()

    loss_of(model, x, y).backward()
    for p, p_ref in zip(lower.synthesizer.parameters(), synth_lower.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7)
    # and the lower block receives exactly scale * delta1 / B
    h1b = model.blocks[0](x)
    with torch.no_grad():
        delta1 = lower.synthesizer(h1b.detach())
    ref_block = copy.deepcopy(model.blocks[0])
    ref_block(x).backward(scale * delta1 / B)
    for p, p_ref in zip(model.blocks[0].parameters(), ref_block.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7)


def test_synthesizer_input_is_detached():
    synth = LinearSynthesizer((4,))
    nn.init.normal_(synth.out.weight)
    h = torch.randn(3, 4, requires_grad=True)
    synth(h).sum().backward()
    assert h.grad is None


def test_eval_mode_and_off_are_identity():
    model = fcn("mlp")
    randomize_synthesizers(model)
    x, _ = batch()
    model.eval()
    out_eval = model(x)
    ref = copy.deepcopy(model)
    for i in interfaces_of(ref):
        i.mode = "off"
    torch.testing.assert_close(out_eval, ref(x))


def test_conditioned_synthesizer_needs_context():
    model = fcn("linear", conditioned=True)
    x, y = batch()
    with pytest.raises(ValueError, match="context"):
        model(x)
    loss_of(model, x, y, conditioned=True).backward()


def test_cnn_conv_synthesizer_shapes_and_zero_start():
    torch.manual_seed(0)
    spec = SynthesizerSpec(kind="conv", hidden=4, layers=1, kernel=3)
    model = CNN((1, 12, 12), CLASSES, layers=3, channels=6, kernel=3,
                placement=Placement(("all",), spec))
    x = torch.randn(4, 1, 12, 12)
    y = torch.randint(0, CLASSES, (4,))
    assert model.cut_shapes == {"h1": (6, 6, 6), "h2": (6, 3, 3)}
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.blocks.parameters())


def test_placement_rejects_unknown_cut():
    with pytest.raises(ValueError, match="valid cuts are h1, h2"):
        fcn(cuts=("h7",))


def test_interface_rejects_unknown_mode():
    with pytest.raises(ValueError, match="synthetic, train_only, off"):
        BackwardInterface(LinearSynthesizer((3,)), mode="sometimes")
