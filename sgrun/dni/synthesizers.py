"""Gradient synthesizers: small networks that predict dL/dh from h (and optional context).

Jaderberg et al. 2017, sec. 2: a synthesizer ``M`` maps the activation ``h`` of a cut (and optional
context ``c``, e.g. the one-hot label for cDNI) to a prediction of the gradient of the loss w.r.t.
``h``.  Every synthesizer here

* returns a tensor of exactly ``h``'s shape,
* detaches its input, so that its own regression loss never reaches the layers below,
* starts with a zero last layer, so that at step 0 the synthetic gradient is zero (plain
  truncation of the backward pass, sec. 3 "zero-initialised").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SynthesizerSpec:
    """What synthesizer to build at a cut.

    kind: ``linear``, ``mlp`` or ``conv``.  ``hidden`` and ``layers`` count the hidden layers
    (``mlp``: Linear -> BatchNorm -> ReLU, ``conv``: Conv -> BatchNorm -> ReLU,
    resolution-preserving).
    """

    kind: str = "mlp"
    hidden: int = 1024
    layers: int = 2
    kernel: int = 5
    batchnorm: bool = True

    def __post_init__(self) -> None:
        if self.kind not in SYNTHESIZERS:
            raise ValueError(f"synthesizer kind must be one of {sorted(SYNTHESIZERS)} "
                             f"(got {self.kind!r})")
        if self.layers < 0 or self.hidden < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(
                f"synthesizer needs layers >= 0, hidden >= 1 and an odd kernel (got {self.layers}, "
                f"{self.hidden}, {self.kernel})"
            )


class GradientSynthesizer(nn.Module):
    """Base class: ``forward(h, context=None) -> predicted dL/dh`` with ``h.shape``."""

    def __init__(self, context_dim: int = 0) -> None:
        super().__init__()
        self.context_dim = context_dim

    def _check_context(self, context: torch.Tensor | None) -> None:
        if self.context_dim and context is None:
            raise ValueError("this synthesizer is conditioned (cDNI): pass the context "
                             "(one-hot label)")


def _zero_(layer: nn.Module) -> nn.Module:
    # Jaderberg et al. 2017, sec. 3: the final layer starts at zero, so delta_hat = 0 at step 0.
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class LinearSynthesizer(GradientSynthesizer):
    """``delta_hat = W [h, c] + b`` on flattened features; the paper's cDNI synthesizer for FCNs."""

    def __init__(self, shape: tuple[int, ...], context_dim: int = 0) -> None:
        super().__init__(context_dim)
        self.shape = tuple(shape)
        dim = int(torch.Size(self.shape).numel())
        self.out = _zero_(nn.Linear(dim + context_dim, dim))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_context(context)
        z = h.detach().flatten(1)  # [B, D]
        if self.context_dim:
            z = torch.cat([z, context.detach().to(z.dtype)], dim=1)
        return self.out(z).view_as(h)


class MLPSynthesizer(GradientSynthesizer):
    """``layers`` hidden Linear -> BatchNorm -> ReLU blocks, then a zero-initialised Linear.

    The paper's FCN synthesizer is ``hidden=1024, layers=2`` (sec. 3.3, supplementary).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        hidden: int = 1024,
        layers: int = 2,
        context_dim: int = 0,
        batchnorm: bool = True,
    ) -> None:
        super().__init__(context_dim)
        self.shape = tuple(shape)
        dim = int(torch.Size(self.shape).numel())
        blocks: list[nn.Module] = []
        width = dim + context_dim
        for _ in range(layers):
            blocks.append(nn.Linear(width, hidden, bias=not batchnorm))
            if batchnorm:
                blocks.append(nn.BatchNorm1d(hidden))
            blocks.append(nn.ReLU())
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.out = _zero_(nn.Linear(width, dim))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_context(context)
        z = h.detach().flatten(1)
        if self.context_dim:
            z = torch.cat([z, context.detach().to(z.dtype)], dim=1)
        return self.out(self.body(z)).view_as(h)


class ConvSynthesizer(GradientSynthesizer):
    """Resolution-preserving conv synthesizer for ``[C, H, W]`` activations (no pooling).

    Paper (supplementary C.1): two hidden conv layers of 128 5x5 filters with same padding,
    BatchNorm and ReLU, and a final zero-initialised 5x5 conv back to ``C`` channels.  The context
    (one-hot label) enters as extra constant input channels.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        hidden: int = 128,
        layers: int = 2,
        kernel: int = 5,
        context_dim: int = 0,
        batchnorm: bool = True,
    ) -> None:
        super().__init__(context_dim)
        if len(shape) != 3:
            raise ValueError(f"a conv synthesizer needs [C, H, W] activations "
                             f"(got shape {tuple(shape)})")
        self.shape = tuple(shape)
        channels = shape[0]
        pad = kernel // 2
        blocks: list[nn.Module] = []
        width = channels + context_dim
        for _ in range(layers):
            blocks.append(nn.Conv2d(width, hidden, kernel, padding=pad, bias=not batchnorm))
            if batchnorm:
                blocks.append(nn.BatchNorm2d(hidden))
            blocks.append(nn.ReLU())
            width = hidden
        self.body = nn.Sequential(*blocks)
        self.out = _zero_(nn.Conv2d(width, channels, kernel, padding=pad))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_context(context)
        z = h.detach()  # [B, C, H, W]
        if self.context_dim:
            c = context.detach().to(z.dtype)[:, :, None, None].expand(-1, -1, *z.shape[2:])
            z = torch.cat([z, c], dim=1)
        return self.out(self.body(z))


SYNTHESIZERS = {"linear": LinearSynthesizer, "mlp": MLPSynthesizer, "conv": ConvSynthesizer}


def build_synthesizer(spec: SynthesizerSpec, shape: tuple[int, ...],
                      context_dim: int = 0) -> GradientSynthesizer:
    """Build the synthesizer ``spec`` describes for activations of ``shape`` (without batch dim)."""
    if spec.kind == "linear":
        return LinearSynthesizer(shape, context_dim=context_dim)
    if spec.kind == "mlp":
        return MLPSynthesizer(shape, spec.hidden, spec.layers, context_dim, spec.batchnorm)
    return ConvSynthesizer(shape, spec.hidden, spec.layers, spec.kernel, context_dim,
                           spec.batchnorm)
