"""Synthetic inputs: the forward unlock, and with a synthetic gradient the complete unlock.

Jaderberg et al. 2017, sec. 2 / 3.3: a synthetic-input model ``I`` predicts a module's input from
the data input ``x`` alone, the synthetic input ``h_hat = I(x)``, trained by L2 regression towards
the real activation ``h``:  ``L_in = mean_i ||h_hat_i - h_i||^2`` (``h`` detached).  The module
above the cut then runs on ``h_hat`` without waiting for the modules below: the forward unlock.
With a gradient synthesizer ``M(h)`` at the same cut the module below also updates without
waiting for the modules above (the backward unlock); both together are the complete unlock.

* :class:`ForwardInterface` (forward unlock alone, autograd function :class:`SyntheticInput`):
  the modules above run on ``h_hat``; the gradient they send back w.r.t. ``h_hat`` is handed to the
  module below as its gradient w.r.t. ``h`` (exact backprop once ``I(x) = h``), so the module below
  still waits for the backward pass: only the forward pass is unlocked.
* :class:`UnlockedInterface` (complete unlock, autograd function :class:`SyntheticInputCut`): the
  modules above run on ``h_hat``; the gradient they send back is the regression target of ``M``
  (per-example units, as in :mod:`sgrun.dni.interface`) and reaches neither ``I`` nor the modules
  below; the module below receives ``scale * M(h) / B`` at once.

In both, ``I`` receives exactly the gradient of ``L_in``, and one ordinary ``loss.backward()``
trains everything.  In ``eval()`` mode (under ``torch.no_grad()``, with ``mode="off"``) both are the
identity: the network is evaluated on its real activations.
"""

from __future__ import annotations

import torch
from torch import nn

from sgrun.dni.interface import BackwardInterface, _mark_done, _UseChecks
from sgrun.dni.synthesizers import GradientSynthesizer
from sgrun.dni.units import injected, per_example, regression_grad, regression_loss
from sgrun.errors import ConfigError

FORWARD_MODES = ("synthetic", "off")


class InputSynthesizer(nn.Module):
    """The synthetic-input model ``I``: ``h_hat = I(x)``, predicted from the data input ``x``.

    An MLP on the flattened ``x`` (``layers`` Linear -> BatchNorm -> ReLU blocks of ``hidden``
    units, then a Linear), reshaped to ``out_shape`` (Jaderberg et al. 2017, sec. 3.3).
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], hidden: int = 1024,
                 layers: int = 2) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        width = int(torch.Size(in_shape).numel())
        blocks: list[nn.Module] = [nn.Flatten()]
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        blocks.append(nn.Linear(width, int(torch.Size(self.out_shape).numel())))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], *self.out_shape)


class _InputRecord:
    """The last losses of a synthetic-input interface (detached): ``sg_loss`` (complete unlock
    only) and ``input_loss``, the synthetic-input loss ``L_in``."""

    __slots__ = ("sg_loss", "input_loss")

    def __init__(self) -> None:
        self.sg_loss: torch.Tensor | None = None
        self.input_loss: torch.Tensor | None = None


class SyntheticInput(torch.autograd.Function):
    """Forward unlock: ``forward(h, h_hat, record) -> h_hat``.

    Backward: the gradient from above passes to ``h`` unchanged (the module below still learns
    from the true gradient, taken at the synthetic input), and ``h_hat`` receives the gradient of
    ``L_in = mean_i ||h_hat_i - h_i||^2`` only.
    """

    @staticmethod
    def forward(ctx, h, h_hat, record: _InputRecord | None):
        ctx.save_for_backward(h, h_hat)
        ctx.record = record
        return h_hat.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        h, h_hat = ctx.saved_tensors
        in_diff = h_hat - h  # target of I: the real activation
        if ctx.record is not None:
            ctx.record.input_loss = regression_loss(in_diff.detach())
        _mark_done(ctx)
        return grad_out, regression_grad(in_diff), None


class SyntheticInputCut(torch.autograd.Function):
    """Complete unlock: ``forward(h, h_hat, delta_hat, scale, record) -> h_hat``.

    Backward (see the module docstring): ``h`` receives ``scale * delta_hat / B``, ``h_hat`` the
    gradient of ``L_in`` and ``delta_hat`` the gradient of the synthesizer loss
    ``L_sg = mean_i ||delta_hat_i - B dL/dh_hat_i||^2``.
    """

    @staticmethod
    def forward(ctx, h, h_hat, delta_hat, scale: float, record: _InputRecord | None):
        ctx.save_for_backward(h, h_hat, delta_hat)
        ctx.scale, ctx.record = scale, record
        return h_hat.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        h, h_hat, delta_hat = ctx.saved_tensors
        n = grad_out.shape[0]
        # target of M: the gradient the modules above sent back
        sg_diff = delta_hat - per_example(grad_out)
        in_diff = h_hat - h  # target of I: the real activation
        if ctx.record is not None:
            ctx.record.sg_loss = regression_loss(sg_diff.detach())
            ctx.record.input_loss = regression_loss(in_diff.detach())
        _mark_done(ctx)
        grad_h = injected(delta_hat.detach(), ctx.scale, n)
        return grad_h, regression_grad(in_diff), regression_grad(sg_diff), None, None


class ForwardInterface(_UseChecks, nn.Module):
    """A decoupled neural interface for the forward pass (forward unlock) at one cut.

    ``forward(h, x)``: in training the modules above run on the synthetic input ``h_hat = I(x)``
    instead of ``h`` (Jaderberg et al. 2017, sec. 2 / 3.3), ``I`` regresses on ``h``, and the
    gradient the modules above send back w.r.t. ``h_hat`` reaches the module below as its gradient
    w.r.t. ``h``: no synthetic gradient, the backward pass stays locked.  For the complete unlock
    (synthetic input and synthetic gradient) use :class:`UnlockedInterface`.

    Args:
        input_model: ``I``, e.g. an :class:`InputSynthesizer`; maps ``x`` to a tensor of ``h``'s
            shape.
        mode: ``synthetic`` or ``off`` (identity, ``I`` unused).
        name: the cut's name, used in logs.

    Attributes: ``record.input_loss``, the last synthetic-input loss ``L_in`` (detached).
    In ``eval()`` mode and under ``torch.no_grad()`` the interface is the identity.  Used where it
    cannot work (input without a graph, output never backpropagated) it warns once with a
    :class:`~sgrun.dni.DNIUsageWarning`.
    """

    _hint = "use its output as the input of the modules above the cut"

    def __init__(self, input_model: nn.Module, mode: str = "synthetic", name: str = "") -> None:
        super().__init__()
        if mode not in FORWARD_MODES:
            raise ConfigError(f"forward interface mode must be one of {', '.join(FORWARD_MODES)} "
                              f"(got {mode!r})")
        self.input_model = input_model
        self.mode = mode
        self.name = name
        self.record = _InputRecord()
        self._init_checks()

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or self.mode == "off" or not torch.is_grad_enabled():
            return h
        if x is None:
            raise ValueError("a synthetic-input interface needs the data input x: call it as "
                             "interface(h, x)")
        self._check_use(h)
        return self._track(SyntheticInput.apply(h, self.input_model(x), self.record))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mode={self.mode}"


class UnlockedInterface(BackwardInterface):
    """The complete unlock at one cut: synthetic input above, synthetic gradient below.

    ``forward(h, context, x)``: in training the modules above run on the synthetic input
    ``h_hat = I(x)``, the module below receives ``scale * M(h, c) / B`` at once, ``M`` regresses on
    the gradient the modules above send back and ``I`` on ``h`` (Jaderberg et al. 2017, sec. 2 /
    3.3).  In ``eval()`` mode (and with ``mode="off"``) it is the identity: the network is
    evaluated on its real activations.  Under :func:`~sgrun.dni.gradient_quality` it is observed
    like a :class:`~sgrun.dni.BackwardInterface` (true gradient, real activations).

    Args:
        synthesizer: ``M``, the gradient synthesizer.
        input_model: ``I``, the synthetic-input model (e.g. an :class:`InputSynthesizer`).
        scale, mode, name: as :class:`~sgrun.dni.BackwardInterface` (no ``train_only`` mode).

    Attributes: ``record.sg_loss`` and ``record.input_loss``, the last losses of ``M`` and ``I``.
    """

    def __init__(self, synthesizer: GradientSynthesizer, input_model: nn.Module, scale: float = 1.0,
                 mode: str = "synthetic", name: str = "") -> None:
        super().__init__(synthesizer, scale, mode, name)
        if mode == "train_only":
            raise ValueError("a complete-unlock interface has no train_only mode: use synthetic "
                             "or off")
        self.input_model = input_model
        self.record = _InputRecord()

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None,
                x: torch.Tensor | None = None):
        if (self._probe is not None or not self.training or self.mode == "off"
                or not torch.is_grad_enabled()):
            return super().forward(h, context)
        if x is None:
            raise ValueError("a synthetic-input interface needs the data input x")
        self._check_use(h)
        h_hat = self.input_model(x)
        delta_hat = self.synthesizer(h, context)
        return self._track(SyntheticInputCut.apply(h, h_hat, delta_hat, self.scale, self.record))
