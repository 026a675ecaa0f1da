"""Per-example units, written once for every synthesizer (interfaces, the recurrent boundary, the
pipeline's boundaries, diagnostics).

Losses are means over a batch of ``B`` examples (or streams), so the gradient that reaches one
example's activation is ``1/B`` of the gradient of its own loss.  Synthesizers predict the
*per-example* gradient ``B * dL/dh_i``, so that their targets do not shrink with the batch; the
gradient injected into the module below is ``scale * delta_hat / B`` again; the synthesizer's loss
is ``L_sg = mean_i ||delta_hat_i - B dL/dh_i||^2`` (Jaderberg et al. 2017, sec. 2: an L2
regression).
"""

from __future__ import annotations

import torch


def per_example(grad: torch.Tensor) -> torch.Tensor:
    """``B * dL/dh`` from the gradient ``dL/dh`` of a batch-mean loss (``[B, ...]``)."""
    return grad * grad.shape[0]


def injected(delta_hat: torch.Tensor, scale: float, n: int) -> torch.Tensor:
    """The gradient handed to the module below for a per-example prediction:
    ``delta_hat * scale / B``."""
    return delta_hat * (scale / n)


def regression_loss(diff: torch.Tensor) -> torch.Tensor:
    """``mean_i ||diff_i||^2`` of a ``[B, ...]`` difference between prediction and target."""
    return diff.pow(2).flatten(1).sum(1).mean()


def example_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the cosine between each example's prediction and its target (SG
    quality), of two ``[B, ...]`` tensors in per-example units."""
    return torch.nn.functional.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1,
                                                 eps=1e-12).mean()


def regression_grad(diff: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`regression_loss` w.r.t. the prediction: ``2 diff / B``."""
    return diff * (2.0 / diff.shape[0])
