"""Synthetic inputs: the forward unlock, and with a synthetic gradient the complete unlock.

Jaderberg et al. 2017, sec. 2 / 3.3: a model ``I`` predicts a module's input from the data input
``x`` alone, ``h_hat = I(x)``, trained by L2 towards the real activation ``h``.  The module above the
cut then runs on ``h_hat`` without waiting for the modules below (forward unlock); with a gradient
synthesizer ``M(h)`` at the same cut, the module below updates without waiting for the modules
above (backward unlock): both together are the complete unlock.

:class:`SyntheticInputCut` routes all of this through one autograd function, so one ordinary
``loss.backward()`` trains everything:

* the modules above see ``h_hat`` (forward) and send their gradient w.r.t. it back (backward);
* that gradient is the regression target of ``M`` (per-example units, as in
  :mod:`sgrun.dni.interface`), and never reaches ``I`` or the modules below;
* the module below receives ``scale * M(h) / B``;
* ``I`` receives exactly the gradient of ``L_in = mean_i ||h_hat_i - h_i||^2`` (``h`` detached).
"""

from __future__ import annotations

import torch
from torch import nn

from sgrun.dni.interface import BackwardInterface
from sgrun.dni.synthesizers import GradientSynthesizer
from sgrun.dni.units import injected, per_example, regression_grad, regression_loss


class InputSynthesizer(nn.Module):
    """``h_hat = I(x)``: an MLP (Linear -> BatchNorm -> ReLU blocks, then Linear) from the data input."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], hidden: int = 1024, layers: int = 2) -> None:
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
    __slots__ = ("sg_loss", "input_loss")

    def __init__(self) -> None:
        self.sg_loss: torch.Tensor | None = None
        self.input_loss: torch.Tensor | None = None


class SyntheticInputCut(torch.autograd.Function):
    """``forward(h, h_hat, delta_hat, scale, record) -> h_hat``; the backward is described above."""

    @staticmethod
    def forward(ctx, h, h_hat, delta_hat, scale: float, record: _InputRecord | None):
        ctx.save_for_backward(h, h_hat, delta_hat)
        ctx.scale, ctx.record = scale, record
        return h_hat.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        h, h_hat, delta_hat = ctx.saved_tensors
        n = grad_out.shape[0]
        sg_diff = delta_hat - per_example(grad_out)  # target of M: the gradient the modules above sent back
        in_diff = h_hat - h                          # target of I: the real activation
        if ctx.record is not None:
            ctx.record.sg_loss = regression_loss(sg_diff.detach())
            ctx.record.input_loss = regression_loss(in_diff.detach())
        grad_h = injected(delta_hat.detach(), ctx.scale, n)
        return grad_h, regression_grad(in_diff), regression_grad(sg_diff), None, None


class UnlockedInterface(BackwardInterface):
    """A cut that is unlocked both ways: synthetic input from ``x`` above, synthetic gradient below.

    ``forward(h, context, x)``.  In ``eval()`` mode (and with ``mode="off"``) it is the identity:
    the network is evaluated on its real activations.
    """

    def __init__(self, synthesizer: GradientSynthesizer, input_model: InputSynthesizer, scale: float = 1.0,
                 mode: str = "synthetic", name: str = "") -> None:
        super().__init__(synthesizer, scale, mode, name)
        if mode == "train_only":
            raise ValueError("a complete-unlock interface has no train_only mode: use synthetic or off")
        self.input_model = input_model
        self.record = _InputRecord()

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None, x: torch.Tensor | None = None):
        if self._probe is not None or not self.training or self.mode == "off" or not torch.is_grad_enabled():
            return super().forward(h, context)
        if x is None:
            raise ValueError("a synthetic-input interface needs the data input x")
        h_hat = self.input_model(x)
        delta_hat = self.synthesizer(h, context)
        return SyntheticInputCut.apply(h, h_hat, delta_hat, self.scale, self.record)
