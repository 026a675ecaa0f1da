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

Misuse is loud: an interface whose input has no graph, or whose output is never backpropagated
(e.g. wrapped around an RNN's carried state that is detached before the next block), warns once
with a :class:`DNIUsageWarning` naming :class:`~sgrun.dni.RecurrentInterface`, the interface for
a carried state (sec. 3.1).  The checks only look at ``requires_grad`` and at whether the autograd
node of the previous call was dropped without its backward running; no value changes.

Units.  Losses are means over the batch, so ``dL/dh_i`` of example ``i`` is ``1/B`` of the
gradient of its own loss.  Synthesizers predict the *per-example* gradient ``B * dL/dh_i`` so that
their targets do not shrink with the batch size; the interface divides by ``B`` again when it
injects.  The synthesizer loss is ``L_sg = mean_i || delta_hat_i - B * dL/dh_i ||^2``.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref

import torch
from torch import nn

from sgrun.dni.synthesizers import GradientSynthesizer
from sgrun.dni.units import injected, per_example, regression_grad, regression_loss
from sgrun.errors import ConfigError

MODES = ("synthetic", "train_only", "off")

RECURRENT_HINT = ("for a recurrent core's carried state, detached between blocks, use "
                  "sgrun.dni.RecurrentInterface (truncated BPTT, Jaderberg et al. 2017, sec. 3.1)")


class DNIUsageWarning(UserWarning):
    """An interface is used where it cannot work (e.g. its output is never backpropagated).

    Raised as a warning, once per interface; turn it into an error with
    ``warnings.simplefilter("error", DNIUsageWarning)``.
    """


class _Call:
    """One training-mode call of an interface: has the backward of its autograd node run yet?

    ``graph`` is a weak reference to that node: once it is dead and ``done`` is still false, the
    graph was dropped without a backward through the interface.
    """

    __slots__ = ("done", "graph")

    def __init__(self, node) -> None:
        self.done = False
        self.graph = weakref.ref(node)

    def dropped(self) -> bool:
        return not self.done and self.graph() is None

    def __getstate__(self):  # copy / pickle: a copied call is no evidence of misuse
        return True

    def __setstate__(self, done) -> None:
        self.done, self.graph = done, (lambda: None)


def _mark_done(ctx) -> None:
    """In an interface's backward: this call was backpropagated."""
    call = getattr(ctx, "dni_call", None)
    if call is not None:
        call.done = True


_INTERNAL = (os.path.dirname(__file__) + os.sep,
             os.path.dirname(nn.Module.__call__.__code__.co_filename) + os.sep)


def _caller_stacklevel() -> int:
    """``stacklevel`` of the first frame outside :mod:`sgrun.dni` and ``torch.nn``: the line that
    called the interface."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


class _UseChecks:
    """Cheap checks that an interface is used where it can work; an interface warns once at most.

    * in training, its input must require grad: otherwise nothing below the cut can receive the
      gradient the interface hands down;
    * the output of its previous call must have been backpropagated through it before that call's
      graph was dropped: otherwise its synthesizer learned nothing and nothing was handed down.

    Neither check reads or changes a tensor value: the numerics are those without them.
    """

    _hint = RECURRENT_HINT

    def _init_checks(self) -> None:
        self._last_call: _Call | None = None
        self._warned = False

    def _warn(self, message: str) -> None:
        self._warned = True
        label = f"{type(self).__name__} {self.name!r}" if self.name else type(self).__name__
        warnings.warn(f"{label}: {message}; {self._hint}", DNIUsageWarning,
                      stacklevel=_caller_stacklevel())

    def _check_use(self, h: torch.Tensor) -> None:
        if self._warned:
            return
        last = self._last_call
        if last is not None and last.dropped():
            self._warn("the output of its previous call was never backpropagated, so nothing was "
                       "learned or handed down there (use eval() or torch.no_grad() for forward "
                       "passes without training)")
        elif not h.requires_grad:
            self._warn("its input does not require grad, so no module below the cut can receive "
                       "a gradient from it")

    def _track(self, out: torch.Tensor) -> torch.Tensor:
        if self._warned:
            return out
        node = out.grad_fn
        if node is not None:
            node.dni_call = self._last_call = _Call(node)
        return out


class _Record:
    """The last synthesizer loss of an interface (detached; ``.item()`` it on logging steps)."""

    __slots__ = ("sg_loss",)

    def __init__(self) -> None:
        self.sg_loss: torch.Tensor | None = None


class SyntheticGradient(torch.autograd.Function):
    """Identity forward; the backward swaps the gradient from above for the synthetic gradient.

    ``forward(h, delta_hat, scale, synthetic, record)``: ``delta_hat = M(h, c)`` must come from a
    synthesizer applied to a *detached* ``h``, so that the regression gradient only reaches the
    synthesizer.  The backward hands the module below ``scale * delta_hat / B`` (with ``synthetic``;
    otherwise the true gradient) and the synthesizer the gradient of
    ``L_sg = mean_i ||delta_hat_i - B dL/dh_i||^2`` (Jaderberg et al. 2017, sec. 2).
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
        _mark_done(ctx)
        if ctx.synthetic:
            grad_h = injected(delta_hat.detach(), ctx.scale, n)
        else:  # train_only: the synthesizer learns, the true gradient passes unchanged
            grad_h = grad_out
        return grad_h, grad_delta, None, None, None


class BackwardInterface(_UseChecks, nn.Module):
    """A decoupled neural interface for the backward pass (backward unlock) at one cut.

    ``forward(h, context=None)`` returns ``h`` unchanged; in the backward pass the module below
    receives the synthetic gradient ``scale * M(h, c) / B`` at once, without waiting for the
    modules above (update unlocking, Jaderberg et al. 2017, sec. 2), and the synthesizer ``M``
    regresses on the gradient that does arrive from above.  ``context`` is ``c`` (e.g. the one-hot
    label for cDNI, sec. 2 / 3.3).

    Args:
        synthesizer: ``M``, predicts the per-example gradient from ``h`` (and context).
        scale: factor on the injected synthetic gradient (1 for the feed-forward nets).
        mode: ``synthetic`` (the paper), ``train_only`` (synthesizer learns, true gradient passes)
            or ``off`` (identity, synthesizer unused).
        name: the cut's name, used in logs and by :func:`~sgrun.dni.gradient_quality`.

    In ``eval()`` mode, under ``torch.no_grad()`` and with ``mode="off"`` the interface is the
    identity.  It needs ``h`` to be part of a graph (the output of trainable modules) and its
    output to be backpropagated; used otherwise (e.g. on an RNN's carried state, which is
    detached before the next block) it warns once with a :class:`DNIUsageWarning`: that is
    :class:`~sgrun.dni.RecurrentInterface`'s job.
    """

    def __init__(self, synthesizer: GradientSynthesizer, scale: float = 1.0,
                 mode: str = "synthetic", name: str = "") -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"interface mode must be one of {', '.join(MODES)} (got {mode!r})")
        self.synthesizer = synthesizer
        self.scale = float(scale)
        self.mode = mode
        self.name = name
        self.record = _Record()
        self._probe: dict | None = None  # set by sgrun.dni.diagnostics while measuring
        self._init_checks()

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self._probe is not None:
            # Measuring SG quality: let the true gradient through and remember h and delta_hat.
            with torch.no_grad():
                self._probe[self.name] = (h, self.synthesizer(h, context))
            return h
        if not self.training or self.mode == "off" or not torch.is_grad_enabled():
            return h
        self._check_use(h)
        delta_hat = self.synthesizer(h, context)  # input detached inside the synthesizer
        out = SyntheticGradient.apply(h, delta_hat, self.scale, self.mode == "synthetic",
                                      self.record)
        return self._track(out)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mode={self.mode}, scale={self.scale}"


def interfaces_of(model: nn.Module) -> list[BackwardInterface]:
    """Every backward interface (synthetic gradient) inside ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, BackwardInterface)]
