"""The recurrent boundary of DNI (Jaderberg et al. 2017, sec. 3.1): truncated BPTT with a synthetic gradient at every block end.

``B`` continuous streams (Copy / Repeat Copy episodes one after another, or Penn Treebank text) are
read ``k`` steps at a time; each block is one optimizer step.  The LSTM state ``s = [h, c]`` is
carried from block to block and detached at every boundary, so no true gradient crosses it.

One block, from the carried state ``s_0`` to the block end ``s_k`` (:func:`truncated_step`):

1. run the ``k`` steps; ``L`` is the block's real loss (mean over its ``k * B`` steps);
2. ``sg_k = M(s_k)``: the synthesizer's prediction of the gradient of all future losses w.r.t. ``s_k``;
3. one backward of ``L`` with ``scale * sg_k`` injected at ``s_k`` (``torch.autograd.backward((L, s_k),
   (None, scale * sg_k / B))``): the core gets the in-block gradient plus the synthetic one, and the
   gradient that arrives at the block start is ``delta_0 = dL/ds_0 + (ds_k/ds_0)^T scale sg_k / B``;
4. the synthesizer regresses its prediction at the block start, ``M(s_0)``, on ``B * delta_0``.  ``s_0`` is
   the previous block's end state, so this is the prediction injected at the end of the previous block
   (recomputed with the current weights), regressed on the gradient that has now arrived: the
   bootstrapped, TD-like target of sec. 3.1;
5. DNI + Aux: an extra head ``A`` reads the block-end state ``s_k`` and predicts the synthetic gradient
   ``k`` steps further on, at the end of the *next* block: its target is ``M(s_2k)``, where ``s_2k`` comes
   from running the next block's inputs forward from ``s_k`` under ``torch.no_grad()`` with the current
   weights (a look-ahead: :func:`aux_target`; the caller reads them ahead without advancing its stream).  The target is detached; the loss
   ``aux_weight * mean_i ||A(s_k)_i - M(s_2k)_i||^2`` (per-stream units, as the synthesizer's) is
   backpropagated into the head and, through ``s_k``, the core, after ``delta_start`` is read, so it is
   no part of the synthesizer's target.

Units.  Block losses are means over the batch, so the gradient w.r.t. one stream's state is ``1/B`` of
that stream's own; as in :mod:`sgrun.dni.interface`, synthesizers predict the per-stream gradient
``B * dL/ds`` (their targets do not shrink with the batch) and the injection divides by ``B`` again.
Because the target includes the *scaled* injection, the synthesizer learns the future gradient with
each further block discounted by ``scale`` (0.1 by default): ``M(s) ~ g_next + scale * J^T M(s')``.

``model`` is any ``nn.Module`` that maps ``(x_block [k, B, ...], state [B, S]) -> out`` with
``out.logits`` and ``out.state`` (the carried state at the block end) and has the attributes
``synthesizer`` (``M``; ``None`` for plain truncated BPTT), ``aux_head`` (``None`` without DNI + Aux),
``scale`` and ``mode`` (as :class:`~sgrun.dni.BackwardInterface`):
:class:`~sgrun.models.rnn.RecurrentNet` is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sgrun.dni.diagnostics import preserved_batchnorm
from sgrun.dni.units import injected, per_example


def block_loss(per_step: Tensor, mask: Tensor) -> Tensor:
    """Mean over all ``k * B`` steps (steps without a target count as 0): the same normaliser for
    every block, so the sum of block losses is one objective whose future gradient is well defined."""
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

    ``x_next`` (``[k, B, ...]``) are the next block's inputs; they are run forward from the block-end
    state ``end_state`` (``s_k``) with the current weights, without gradient, and the synthesizer is
    applied to the state they end in.  Returns ``[B, 2H]``, detached, per-stream units.  BatchNorm
    buffers (a synthesizer with ``batchnorm: true``) are left as they were.
    """
    with preserved_batchnorm(model):
        ahead = model(x_next, end_state.detach()).state  # s_2k [B, 2H]
        return model.synthesizer(ahead)


def truncated_step(model, x: Tensor, y: Tensor, mask: Tensor, state: Tensor, step_loss,
                   aux_weight: float = 0.0, x_next: Tensor | None = None) -> Step:
    """Forward and backward of one block (see the module docstring); the caller zeroes the gradients
    before and steps the optimizer after.  ``x_next``: the next block's inputs, needed (only) by a
    model with the DNI + Aux head."""
    n = state.shape[0]
    synth = model.synthesizer
    if model.aux_head is not None and x_next is None:
        raise ValueError("DNI + Aux needs the next block's inputs: pass x_next to truncated_step")
    # [B, 2H] a leaf, detached from the previous block; with DNI its .grad is what arrives at the block start
    s0 = state.detach().requires_grad_(synth is not None)
    out = model(x, s0)  # logits [k, B, O], state [B, 2H]
    loss = block_loss(step_loss(out.logits, y), mask)
    if synth is None:
        loss.backward()  # plain truncated BPTT: nothing crosses the block end
        return Step(loss.detach(), out.state.detach(), out.logits.detach(), None, None, None)

    # Jaderberg et al. 2017, sec. 3.1: the synthetic gradient of all future losses w.r.t. the block end
    with torch.no_grad():
        sg_end = synth(out.state)  # [B, 2H], per-stream units
    sg_in = injected(sg_end, model.scale, n) if model.mode == "synthetic" else torch.zeros_like(sg_end)
    aux_loss = None
    if model.aux_head is not None:
        # DNI + Aux (sec. 3.1): from the block end s_k, predict the synthetic gradient M(s_2k) that the
        # synthesizer will give at the end of the next block, k steps later
        target = aux_target(model, out.state, x_next)
        aux_loss = (model.aux_head(out.state) - target).pow(2).sum(1).mean()

    # The real loss plus the injected future gradient, in one backward; the reported loss stays `loss`.
    torch.autograd.backward((loss, out.state), (None, sg_in), retain_graph=aux_loss is not None)
    delta_start = per_example(s0.grad)  # [B, 2H] in-block gradient + the injection pulled back through the block
    if aux_loss is not None:
        (aux_weight * aux_loss).backward()  # after delta_start is read: the aux gradient is not a target

    # Bootstrapped target: the prediction for this state (made at the previous block's end) is
    # regressed on the gradient that has now arrived at it.
    sg_loss = (synth(s0) - delta_start).pow(2).sum(1).mean()
    sg_loss.backward()
    return Step(loss.detach(), out.state.detach(), out.logits.detach(), delta_start,
                sg_loss.detach(), None if aux_loss is None else aux_loss.detach())


def future_gradient_quality(model, state: Tensor, future, k: int, step_loss,
                            streams: int = 64) -> dict[str, float]:
    """How well ``M(s)`` matches the true gradient of the future losses w.r.t. the block-end state ``s``.

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
        true = torch.autograd.grad(sum(losses), s, retain_graph=True)[0] * m  # [m, 2H] per stream
        discounted = sum(model.scale ** j * loss for j, loss in enumerate(losses))
        target = torch.autograd.grad(discounted, s)[0] * m
        with torch.no_grad():
            pred = model.synthesizer(s)
    cos = nn.functional.cosine_similarity(pred, true, dim=1, eps=1e-12).mean()
    cos_target = nn.functional.cosine_similarity(pred, target, dim=1, eps=1e-12).mean()
    return {"cosine": float(cos), "cosine_target": float(cos_target),
            "mse_true": float((pred - true).pow(2).sum(1).mean())}
