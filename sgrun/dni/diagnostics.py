"""How good is the synthetic gradient?  Measured against the true gradient on logging steps.

A synthetic gradient is only useful as far as it points where the true gradient does (Jaderberg et
al. 2017, sec. 2; Czarnecki et al. 2017, "Understanding Synthetic Gradients and Decoupled Neural
Interfaces"), so it is worth logging how well it matches the true one at each interface.  The true
gradient needs a full backward pass, so it is measured only when asked: :func:`gradient_quality`
runs one extra forward/backward with every interface turned into an observer (identity, true
gradient passes), and restores BatchNorm running statistics so the measurement leaves no trace on
training.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from sgrun.dni.interface import interfaces_of
from sgrun.dni.units import example_cosine, per_example


@contextmanager
def preserved_batchnorm(*models: nn.Module):
    """Restore every BatchNorm buffer (running mean/var, counters) of ``models`` on exit, so that a
    measurement or look-ahead forward pass in training mode leaves no trace on training."""
    norms = [m for model in models for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None}
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def gradient_quality(model: nn.Module,
                     loss_fn: Callable[[], torch.Tensor]) -> dict[str, dict[str, float]]:
    """Compare each backward interface's synthetic gradient with the true gradient of ``loss_fn()``.

    ``loss_fn`` runs the model's forward pass and returns the (batch-mean) loss.  Returns, per
    interface name, ``cosine`` (mean over examples of the cosine between the predicted and the true
    per-example gradient) and ``mse`` (mean over examples of the squared error: the synthesizer loss
    against the true rather than the bootstrapped target).  Every interface that is not ``off``
    needs a name of its own (a ``ValueError`` otherwise).  Nothing is trained (the true gradient
    comes from ``torch.autograd.grad``; no ``.grad`` is touched) and BatchNorm buffers are left as
    they were.
    """
    interfaces = [i for i in interfaces_of(model) if i.mode != "off"]
    names = [i.name for i in interfaces]
    if not all(names):
        raise ValueError("gradient_quality reports per interface name: give every "
                         "BackwardInterface a name (BackwardInterface(..., name='h1'))")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        listed = ", ".join(map(repr, repeated))
        raise ValueError(f"gradient_quality reports per interface name: {listed} names more than "
                         "one interface; give each its own name")
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
        true = per_example(g).flatten(1)  # per-example units, as the synthesizer predicts
        pred = delta_hat.flatten(1)
        cos = example_cosine(pred, true)
        mse = (pred - true).pow(2).sum(1).mean()
        out[name] = {"cosine": float(cos), "mse": float(mse)}
    return out
