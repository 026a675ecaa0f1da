"""The recurrent boundary of DNI: truncated BPTT with a synthetic gradient at every block end.

Jaderberg et al. 2017, sec. 3.1.  ``B`` continuous streams (Copy / Repeat Copy episodes one after
another, or Penn Treebank text) are read ``k`` steps at a time; each block is one optimizer step.
The recurrent state ``s`` (for an LSTM ``[h, c]``) is carried from block to block and detached at
every boundary, so no true gradient crosses it: the synthetic gradient replaces it.

One block, from the carried state ``s_0`` to the block end ``s_k``:

1. run the ``k`` steps; ``L`` is the block's real loss (mean over its ``k * B`` steps);
2. ``sg_k = M(s_k)``: the synthesizer's prediction of the gradient of all future losses w.r.t.
   ``s_k``;
3. one backward of ``L`` with ``scale * sg_k`` injected at ``s_k``
   (``torch.autograd.backward((L, s_k), (None, scale * sg_k / B))``): the core gets the in-block
   gradient plus the synthetic one, and the gradient that arrives at the block start is
   ``delta_0 = dL/ds_0 + (ds_k/ds_0)^T scale sg_k / B``;
4. the synthesizer regresses its prediction at the block start, ``M(s_0)``, on ``B * delta_0``.
   ``s_0`` is the previous block's end state, so this is the prediction injected at the end of the
   previous block (recomputed with the current weights), regressed on the gradient that has now
   arrived at it: the bootstrapped, TD-like target of sec. 3.1;
5. DNI + Aux: an extra head ``A`` reads the block-end state ``s_k`` and predicts the synthetic
   gradient ``k`` steps further on, at the end of the *next* block: its target is ``M(s_2k)``,
   where ``s_2k`` comes from running the next block's inputs forward from ``s_k`` under
   ``torch.no_grad()`` with the current weights (a look-ahead: :func:`aux_target`; the caller
   reads them ahead without advancing its stream).  The target is detached; the loss
   ``aux_weight * mean_i ||A(s_k)_i - M(s_2k)_i||^2`` (per-stream units, as the synthesizer's) is
   backpropagated into the head and, through ``s_k``, the core, after ``delta_start`` is read, so
   it is no part of the synthesizer's target.

Units.  Block losses are means over the batch, so the gradient w.r.t. one stream's state is ``1/B``
of that stream's own; as in :mod:`sgrun.dni.interface`, synthesizers predict the per-stream
gradient ``B * dL/ds`` (their targets do not shrink with the batch) and the injection divides by
``B`` again.  Because the target includes the *scaled* injection, the synthesizer learns the future
gradient with each further block discounted by ``scale`` (0.1 by default):
``M(s) ~ g_next + scale * J^T M(s')``.  ``bootstrap_scale`` gives the target its own factor
``b`` instead, ``M(s) ~ g_next + b * J^T M(s')`` (``b = 1``: the undiscounted future gradient),
while the core still receives ``scale * M(s_k)``; it costs one more backward through the block.

Two entry points run the same block (:func:`_truncated_block`):

* :class:`RecurrentInterface` for any recurrent core of your own, ``core(x_block, state) ->
  (outputs, new_state)`` with ``state`` one tensor or a tuple such as ``(h, c)``, and any
  ``loss_fn(outputs)``: the public API;
* :func:`truncated_step` for a ``model`` that maps ``(x_block [k, B, ...], state [B, S]) -> out``
  with ``out.logits`` and ``out.state`` (the carried state at the block end) and has the attributes
  ``synthesizer`` (``M``; ``None`` for plain truncated BPTT), ``aux_head`` (``None`` without
  DNI + Aux), ``scale`` and ``mode`` (as :class:`~sgrun.dni.BackwardInterface`):
  :class:`~sgrun.models.rnn.RecurrentNet` is one.

A :class:`~sgrun.dni.BackwardInterface` cannot do this job: the carried state is detached before
the next block, so nothing would ever backpropagate through it (it warns once if tried).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sgrun.dni.diagnostics import preserved_batchnorm
from sgrun.dni.interface import MODES
from sgrun.dni.synthesizers import GradientSynthesizer
from sgrun.dni.units import example_cosine, injected, per_example, regression_loss
from sgrun.errors import ConfigError

State = Tensor | tuple[Tensor, ...]  # the carried state: one [B, S] tensor or e.g. (h, c)


def block_loss(per_step: Tensor, mask: Tensor) -> Tensor:
    """Mean over all ``k * B`` steps (steps without a target count as 0): the same normaliser for
    every block, so the sum of block losses is one objective whose future gradient is well
    defined."""
    return (per_step * mask).sum() / mask.numel()


@dataclass
class Step:
    """What :func:`truncated_step` leaves behind (all detached)."""

    loss: Tensor                 # the block's real loss, without the injected gradient
    state: Tensor                # [B, 2H] the block-end state: the next block starts from it
    logits: Tensor               # [k, B, O]
    delta_start: Tensor | None   # [B, 2H] per-stream gradient that arrived at the block start
    sg_loss: Tensor | None       # the synthesizer's regression loss
    aux_loss: Tensor | None      # DNI + Aux regression loss (before aux_weight)


@torch.no_grad()
def aux_target(model, end_state: Tensor, x_next: Tensor) -> Tensor:
    """DNI + Aux target: ``M(s_2k)``, the synthesizer's output at the end of the next block.

    ``x_next`` (``[k, B, ...]``) are the next block's inputs; they are run forward from the
    block-end state ``end_state`` (``s_k``) with the current weights, without gradient, and the
    synthesizer is applied to the state they end in.  Returns ``[B, 2H]``, detached, per-stream
    units.  BatchNorm buffers (a synthesizer with ``batchnorm: true``) are left as they were.
    """
    with preserved_batchnorm(model):
        ahead = model(x_next, end_state.detach()).state  # s_2k [B, 2H]
        return model.synthesizer(ahead)


def _flat(state: State) -> Tensor:
    """The carried state as one ``[B, S]`` tensor, as the synthesizer sees it (a tensor as it is,
    a tuple such as ``(h, c)`` concatenated along the features)."""
    if isinstance(state, Tensor):
        return state
    return torch.cat([s.flatten(1) for s in state], dim=1)


def _split(flat: Tensor, like: State) -> tuple[Tensor, ...]:
    """``flat`` ``[B, S]`` cut into tensors shaped as the parts of ``like`` (inverse of _flat)."""
    if isinstance(like, Tensor):
        return (flat,)
    parts = flat.split([s[0].numel() for s in like], dim=1)
    return tuple(p.reshape(s.shape) for p, s in zip(parts, like))


def _parts(state: State) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)


def _leaf(state: State, requires_grad: bool) -> State:
    """A detached copy of the carried state, a leaf whose ``.grad`` is what arrives at it."""
    if isinstance(state, Tensor):
        return state.detach().requires_grad_(requires_grad)
    return type(state)(s.detach().requires_grad_(requires_grad) for s in state)


def _detached(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _start_gradient(s0: State) -> Tensor:
    """The gradient that arrived at the block start, ``[B, S]`` (zero where none did)."""
    if isinstance(s0, Tensor):
        return s0.grad if s0.grad is not None else torch.zeros_like(s0)
    return _flat(tuple(s.grad if s.grad is not None else torch.zeros_like(s) for s in s0))


def _truncated_block(run, loss_fn, state: State, synth, scale: float, mode: str, aux=None,
                     aux_weight: float = 0.0, bootstrap_scale: float | None = None):
    """Steps 1-5 of the module docstring for one block, shared by :func:`truncated_step` and
    :class:`RecurrentInterface`.  ``run(s0) -> (outputs, s_k)``, ``loss_fn(outputs) -> L``,
    ``aux(s_k, flat s_k) -> aux loss`` (DNI + Aux) or ``None``; ``synth`` ``None``: plain
    truncated BPTT; ``bootstrap_scale``: the factor on ``M(s_k)`` in the synthesizer's target
    (``None``: the injected one).  Returns ``(L, outputs, s_k, delta_start, sg_loss, aux_loss)``,
    not detached."""
    n = _parts(state)[0].shape[0]
    # a leaf, detached from the previous block; with DNI its .grad is what arrives at the block
    # start
    s0 = _leaf(state, synth is not None)
    outputs, end = run(s0)
    loss = loss_fn(outputs)
    if synth is None:
        loss.backward()  # plain truncated BPTT: nothing crosses the block end
        return loss, outputs, end, None, None, None

    # Jaderberg et al. 2017, sec. 3.1: the synthetic gradient of all future losses w.r.t. the
    # block end
    end_flat = _flat(end)
    with torch.no_grad():
        sg_end = synth(end_flat)  # [B, S], per-stream units
    sg_in = injected(sg_end, scale, n) if mode == "synthetic" else torch.zeros_like(sg_end)
    aux_loss = None if aux is None else aux(end, end_flat)
    ends = [(e, g) for e, g in zip(_parts(end), _split(sg_in, end)) if e.requires_grad]
    given = scale if mode == "synthetic" else 0.0
    extra = 0.0 if bootstrap_scale is None else float(bootstrap_scale) - given
    pulled = None
    if extra != 0.0:
        # the target's own factor on M(s_k): add (bootstrap_scale - given) J^T M(s_k) / B, pulled
        # back through the block before the main backward frees its graph
        extra_in = _split(injected(sg_end, extra, n), end)
        kept = [(e, g) for e, g in zip(_parts(end), extra_in) if e.requires_grad]
        starts = _parts(s0)
        grads = torch.autograd.grad([e for e, _ in kept], starts, [g for _, g in kept],
                                    retain_graph=True, allow_unused=True)
        pulled = per_example(_flat(tuple(torch.zeros_like(s) if g is None else g
                                         for s, g in zip(starts, grads))))

    # The real loss plus the injected future gradient, in one backward; the reported loss stays
    # `loss`.
    torch.autograd.backward((loss, *(e for e, _ in ends)), (None, *(g for _, g in ends)),
                            retain_graph=aux_loss is not None)
    # [B, S] in-block gradient + the injection pulled back through the block
    delta_start = per_example(_start_gradient(s0))
    if aux_loss is not None:
        # after delta_start is read: the aux gradient is not a target
        (aux_weight * aux_loss).backward()

    # Bootstrapped target: the prediction for this state (made at the previous block's end) is
    # regressed on the gradient that has now arrived at it.
    target = delta_start if pulled is None else delta_start + pulled
    sg_loss = regression_loss(synth(_flat(s0)) - target)
    sg_loss.backward()
    return loss, outputs, end, delta_start, sg_loss, aux_loss


def truncated_step(model, x: Tensor, y: Tensor, mask: Tensor, state: Tensor, step_loss,
                   aux_weight: float = 0.0, x_next: Tensor | None = None) -> Step:
    """Forward and backward of one block of a model with the attributes of the module docstring
    (:class:`~sgrun.models.rnn.RecurrentNet`); the caller zeroes the gradients before and steps
    the optimizer after.  ``step_loss(logits, y)`` gives the per-step losses ``[k, B]``, averaged
    by :func:`block_loss` with ``mask``.  ``x_next``: the next block's inputs, needed (only) by a
    model with the DNI + Aux head.  For a recurrent core of your own, see
    :class:`RecurrentInterface`."""
    if model.aux_head is not None and x_next is None:
        raise ValueError("DNI + Aux needs the next block's inputs: pass x_next to truncated_step")

    def run(s0: Tensor):
        out = model(x, s0)  # logits [k, B, O], state [B, 2H]
        return out, out.state

    aux = None
    if model.aux_head is not None:
        def aux(end: Tensor, _flat_end: Tensor) -> Tensor:
            # DNI + Aux (sec. 3.1): from the block end s_k, predict the synthetic gradient M(s_2k)
            # that the synthesizer will give at the end of the next block, k steps later
            target = aux_target(model, end, x_next)
            return (model.aux_head(end) - target).pow(2).sum(1).mean()

    loss, out, end, delta_start, sg_loss, aux_loss = _truncated_block(
        run, lambda out: block_loss(step_loss(out.logits, y), mask), state, model.synthesizer,
        model.scale, model.mode, aux, aux_weight, getattr(model, "bootstrap_scale", None))
    return Step(loss.detach(), end.detach(), out.logits.detach(), delta_start,
                None if sg_loss is None else sg_loss.detach(),
                None if aux_loss is None else aux_loss.detach())


@dataclass
class RecurrentStep:
    """What :meth:`RecurrentInterface.step` leaves behind (all detached).

    Attributes:
        loss: the block's real loss ``L`` (without the injected gradient).
        state: the block-end state ``s_k``, in the core's own format: the next block starts from it.
        outputs: the core's outputs for the block.
        delta_start: ``[B, S]`` the per-stream gradient that arrived at the block start (the
            synthesizer's bootstrapped target); ``None`` with ``mode="off"``.
        sg_loss: the synthesizer's regression loss ``mean_i ||M(s_0)_i - delta_start_i||^2``.
        aux_loss: the DNI + Aux loss (before ``aux_weight``), ``None`` without an aux head.
    """

    loss: Tensor
    state: State
    outputs: Any
    delta_start: Tensor | None
    sg_loss: Tensor | None
    aux_loss: Tensor | None


class RecurrentInterface(nn.Module):
    """DNI at the carried state of any recurrent core, trained with truncated BPTT (sec. 3.1).

    ``core`` is any module with ``core(x_block, state) -> (outputs, new_state)``: ``x_block`` holds
    the ``k`` steps of one block (e.g. ``[k, B, ...]``), ``state`` the carried state, one tensor
    ``[B, S]`` or a tuple of ``[B, ...]`` tensors such as ``(h, c)``.  The synthesizer ``M`` sees
    the state as one ``[B, S]`` tensor (a tuple concatenated along features: build ``M`` for
    ``S = h.numel + c.numel`` per stream, e.g. ``2H``) and predicts the gradient of all future
    losses w.r.t. it, in per-stream units (:mod:`sgrun.dni.units`).

    :meth:`step` trains one block (the module docstring, steps 1-5): it runs the core from a
    detached leaf ``s_0``, backpropagates ``L = loss_fn(outputs)`` with ``scale * M(s_k) / B``
    injected at the block end ``s_k``, and regresses ``M(s_0)`` on the (per-stream) gradient that
    arrived at ``s_0``, the bootstrapped target.  The caller zeroes the gradients before and steps
    the optimizer (over the core's and this module's parameters) after.  Calling the module,
    ``interface(core, x_block, state, loss_fn)``, is the same as :meth:`step`.

    Args:
        synthesizer: ``M``, e.g. ``LinearSynthesizer((S,))`` (zero-initialised: training starts
            as plain truncated BPTT).
        scale: factor on the injected synthetic gradient; the target discounts each further block
            by it (0.1, as sgrun's recurrent presets).
        mode: ``synthetic``, ``train_only`` (``M`` learns, nothing is injected) or ``off`` (plain
            truncated BPTT, ``M`` unused).
        name: the cut's name, used in logs.
        aux_head: DNI + Aux (sec. 3.1): a module ``A`` mapping the flat block-end state ``[B, S]``
            to a prediction of ``M(s_2k)``, the synthetic gradient at the end of the *next* block
            (run ahead from ``s_k`` on ``x_next`` without gradient); ``None`` for plain DNI.
        aux_weight: weight of the aux loss ``mean_i ||A(s_k)_i - M(s_2k)_i||^2`` in the core's
            objective (0.1, as sgrun's DNI + Aux preset).
        bootstrap_scale: the factor on ``M(s_k)`` in the synthesizer's bootstrapped target;
            ``None`` (default): the injected one, ``scale`` (see the module docstring).
    """

    def __init__(self, synthesizer: GradientSynthesizer, scale: float = 0.1,
                 mode: str = "synthetic", name: str = "state", aux_head: nn.Module | None = None,
                 aux_weight: float = 0.1, bootstrap_scale: float | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"interface mode must be one of {', '.join(MODES)} (got {mode!r})")
        self.synthesizer = synthesizer
        self.scale, self.mode, self.name = float(scale), mode, name
        self.aux_head = aux_head
        self.aux_weight = float(aux_weight)
        self.bootstrap_scale = None if bootstrap_scale is None else float(bootstrap_scale)

    def step(self, core: nn.Module, x_block, state: State, loss_fn: Callable[[Any], Tensor],
             x_next=None) -> RecurrentStep:
        """Forward and backward of one block; see the class docstring.

        ``loss_fn(outputs)`` is the block's loss, a mean over the ``B`` streams (e.g. over its
        ``k * B`` steps).  ``x_next``: the next block's inputs (needed only with ``aux_head``).
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("RecurrentInterface.step trains one block: call it with gradients "
                               "enabled (evaluate by running the core itself)")
        if self.aux_head is not None and x_next is None:
            raise ValueError("DNI + Aux needs the next block's inputs: pass x_next to step")
        shape = getattr(self.synthesizer, "shape", None)
        width = sum(s[0].numel() for s in _parts(state))
        if shape is not None and torch.Size(shape).numel() != width:
            raise ValueError(f"the synthesizer predicts {tuple(shape)} per stream but the carried "
                             f"state has {width} features: build it for shape ({width},)")

        aux = None
        if self.aux_head is not None:
            def aux(end: State, end_flat: Tensor) -> Tensor:
                target = self._look_ahead(core, end, x_next)  # M(s_2k), detached
                return regression_loss(self.aux_head(end_flat) - target)

        synth = None if self.mode == "off" else self.synthesizer
        loss, outputs, end, delta_start, sg_loss, aux_loss = _truncated_block(
            lambda s0: core(x_block, s0), loss_fn, state, synth, self.scale, self.mode, aux,
            self.aux_weight, self.bootstrap_scale)
        return RecurrentStep(loss.detach(), _detached(end), _detached(outputs), delta_start,
                             None if sg_loss is None else sg_loss.detach(),
                             None if aux_loss is None else aux_loss.detach())

    forward = step

    @torch.no_grad()
    def _look_ahead(self, core: nn.Module, end: State, x_next) -> Tensor:
        """``M(s_2k)``: the next block run from ``s_k`` with the current weights, without gradient
        and leaving BatchNorm buffers as they were."""
        with preserved_batchnorm(core, self):
            _, ahead = core(x_next, _detached(end))
            return self.synthesizer(_flat(ahead))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mode={self.mode}, scale={self.scale}"


def future_gradient_quality(model, state: Tensor, future, k: int, step_loss,
                            streams: int = 64) -> dict[str, float]:
    """How well ``M(s)`` matches the true gradient of the future losses w.r.t. the block-end
    state ``s``.

    ``future`` holds the next ``horizon`` steps (a whole number of blocks).  A copy of the next
    blocks is run from ``s`` (on the first ``streams`` streams) and their losses, each normalised as
    in training, are backpropagated into ``s`` over the whole horizon, with no truncation:

    * ``cosine``: per-stream cosine between ``M(s)`` and the gradient of the undiscounted sum of the
      future block losses (the true future gradient, cut at the horizon), averaged over streams;
    * ``cosine_target``: the same against the sum with block ``j`` ahead weighted by ``scale**j``,
      which is what the bootstrapped target converges to (see the module docstring);
    * ``mse_true``: the synthesizer loss against the true rather than the bootstrapped target.

    The horizon is ``train.sg_horizon`` steps (40 by default) rounded up to whole blocks.  The
    comparison is with one realisation of the future (inputs the synthesizer cannot know yet), so
    even a perfect predictor of the *expected* future gradient scores a cosine below 1.
    """
    m = min(streams, state.shape[0])
    s = state[:m].detach().requires_grad_(True)  # [m, 2H]
    with preserved_batchnorm(model):
        out = model(future.x[:, :m], s)
        per_step = step_loss(out.logits, future.y[:, :m]) * future.mask[:, :m]  # [horizon, m]
        losses = [b.sum() / b.numel() for b in per_step.split(k)]  # block losses, as in training
        # [m, 2H] per stream
        true = per_example(torch.autograd.grad(sum(losses), s, retain_graph=True)[0])
        discounted = sum(model.scale ** j * loss for j, loss in enumerate(losses))
        target = per_example(torch.autograd.grad(discounted, s)[0])
        with torch.no_grad():
            pred = model.synthesizer(s)
    cos, cos_target = example_cosine(pred, true), example_cosine(pred, target)
    return {"cosine": float(cos), "cosine_target": float(cos_target),
            "mse_true": float((pred - true).pow(2).sum(1).mean())}
