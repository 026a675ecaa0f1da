"""How good is the synthetic gradient?  Measured against the true gradient on logging steps.

Czarnecki et al. 2017 (sec. 5 of PAPER.md) recommend logging how well the synthetic gradient matches
the true one per interface.  The true gradient needs a full backward pass, so it is measured only
when asked: :func:`gradient_quality` runs one extra forward/backward with every interface turned
into an observer (identity, true gradient passes), and restores BatchNorm running statistics so the
measurement leaves no trace on training.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from sgrun.dni.interface import interfaces_of


@contextmanager
def preserved_batchnorm(model: nn.Module):
    """Restore every BatchNorm buffer (running mean/var, counters) on exit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def gradient_quality(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> dict[str, dict[str, float]]:
    """Compare each interface's synthetic gradient with the true gradient of ``loss_fn()``.

    ``loss_fn`` runs the model's forward pass and returns the (batch-mean) loss.  Returns, per cut,
    ``cosine`` (mean over examples of the cosine between predicted and true per-example gradient)
    and ``mse`` (mean over examples of the squared error, the synthesizer loss against the true
    rather than the bootstrapped target).
    """
    interfaces = [i for i in interfaces_of(model) if i.mode != "off"]
    if not interfaces:
        return {}
    probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with preserved_batchnorm(model):
        for i in interfaces:
            i._probe = probes
        try:
            loss = loss_fn()
        finally:
            for i in interfaces:
                i._probe = None
        names = [n for n in probes if probes[n][0].requires_grad]
        grads = torch.autograd.grad(loss, [probes[n][0] for n in names], allow_unused=True)
    out = {}
    for name, g in zip(names, grads):
        h, delta_hat = probes[name]
        if g is None:
            continue
        true = (g * h.shape[0]).flatten(1)  # per-example units, as the synthesizer predicts
        pred = delta_hat.flatten(1)
        cos = nn.functional.cosine_similarity(pred, true, dim=1, eps=1e-12).mean()
        mse = (pred - true).pow(2).sum(1).mean()
        out[name] = {"cosine": float(cos), "mse": float(mse)}
    return out
