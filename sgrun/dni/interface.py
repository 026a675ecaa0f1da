"""Backward interfaces: the one place where a gradient is replaced by a synthetic one.

A :class:`BackwardInterface` sits at a cut between a lower module (output ``h``) and the modules
above it.  In the forward pass it returns ``h`` unchanged and asks its synthesizer for
``delta_hat = M(h, c)``.  In the backward pass the autograd function :class:`SyntheticGradient`

* hands the lower module ``scale * delta_hat`` instead of the gradient that arrived from above
  (Jaderberg et al. 2017, sec. 2: the lower module updates without waiting), and
* hands the synthesizer the gradient of its regression loss towards the gradient that did arrive.

With interfaces after every layer the gradient that arrives at a cut is the synthetic gradient of
the cut above pulled back through one layer, i.e. the bootstrapped target of sec. 2.  One ordinary
``loss.backward()`` therefore trains the model and every synthesizer, bootstrapping included.

Units.  Losses are means over the batch, so ``dL/dh_i`` of example ``i`` is ``1/B`` of the
gradient of its own loss.  Synthesizers predict the *per-example* gradient ``B * dL/dh_i`` so that
their targets do not shrink with the batch size; the interface divides by ``B`` again when it
injects.  The synthesizer loss is ``L_sg = mean_i || delta_hat_i - B * dL/dh_i ||^2``.
"""

from __future__ import annotations

import torch
from torch import nn

from sgrun.dni.synthesizers import GradientSynthesizer
from sgrun.dni.units import injected, per_example, regression_grad, regression_loss
from sgrun.errors import ConfigError

MODES = ("synthetic", "train_only", "off")


class _Record:
    """Holds the last synthesizer loss of an interface (a detached tensor; ``.item()`` on logging steps)."""

    __slots__ = ("sg_loss",)

    def __init__(self) -> None:
        self.sg_loss: torch.Tensor | None = None


class SyntheticGradient(torch.autograd.Function):
    """Identity forward; backward swaps the incoming gradient for the synthetic one.

    ``forward(h, delta_hat, scale, synthetic, record)``: ``delta_hat`` must come from a synthesizer
    applied to a *detached* ``h``, so the regression gradient only reaches the synthesizer.
    """

    @staticmethod
    def forward(ctx, h, delta_hat, scale: float, synthetic: bool, record: _Record | None):
        ctx.save_for_backward(delta_hat)
        ctx.scale, ctx.synthetic, ctx.record = scale, synthetic, record
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_out):
        (delta_hat,) = ctx.saved_tensors
        n = grad_out.shape[0]
        diff = delta_hat - per_example(grad_out)  # the synthesizer's regression target
        grad_delta = regression_grad(diff)
        if ctx.record is not None:
            ctx.record.sg_loss = regression_loss(diff.detach())
        if ctx.synthetic:
            grad_h = injected(delta_hat.detach(), ctx.scale, n)
        else:  # train_only: the synthesizer learns, the true gradient passes unchanged
            grad_h = grad_out
        return grad_h, grad_delta, None, None, None


class BackwardInterface(nn.Module):
    """A decoupled neural interface for the backward pass at one cut.

    Args:
        synthesizer: predicts the per-example gradient from ``h`` (and context).
        scale: factor on the injected synthetic gradient (1 for the feed-forward nets).
        mode: ``synthetic`` (the paper), ``train_only`` (synthesizer learns, true gradient passes)
            or ``off`` (identity, synthesizer unused).
        name: the cut's name, used in logs.

    In ``eval()`` mode the interface is the identity.
    """

    def __init__(self, synthesizer: GradientSynthesizer, scale: float = 1.0, mode: str = "synthetic", name: str = "") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"interface mode must be one of {', '.join(MODES)} (got {mode!r})")
        self.synthesizer = synthesizer
        self.scale = float(scale)
        self.mode = mode
        self.name = name
        self.record = _Record()
        self._probe: dict | None = None  # set by sgrun.dni.diagnostics while measuring

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self._probe is not None:
            # Measuring SG quality: let the true gradient through and remember h and delta_hat.
            with torch.no_grad():
                self._probe[self.name] = (h, self.synthesizer(h, context))
            return h
        if not self.training or self.mode == "off" or not torch.is_grad_enabled():
            return h
        delta_hat = self.synthesizer(h, context)  # input detached inside the synthesizer
        return SyntheticGradient.apply(h, delta_hat, self.scale, self.mode == "synthetic", self.record)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mode={self.mode}, scale={self.scale}"


def interfaces_of(model: nn.Module) -> list[BackwardInterface]:
    """Every backward interface inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, BackwardInterface)]
