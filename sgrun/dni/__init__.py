"""Decoupled neural interfaces (Jaderberg et al. 2017) as ordinary ``nn.Module``s.

Importable without Hydra: ``from sgrun.dni import BackwardInterface, MLPSynthesizer, Placement``.
"""

from sgrun.dni.diagnostics import gradient_quality, preserved_batchnorm
from sgrun.dni.interface import (
    MODES,
    BackwardInterface,
    Placement,
    SyntheticGradient,
    build_interfaces,
    interfaces_of,
)
from sgrun.dni.synthesizers import (
    ConvSynthesizer,
    GradientSynthesizer,
    LinearSynthesizer,
    MLPSynthesizer,
    SynthesizerSpec,
    build_synthesizer,
)

__all__ = [
    "MODES",
    "BackwardInterface",
    "ConvSynthesizer",
    "GradientSynthesizer",
    "LinearSynthesizer",
    "MLPSynthesizer",
    "Placement",
    "SynthesizerSpec",
    "SyntheticGradient",
    "build_interfaces",
    "build_synthesizer",
    "gradient_quality",
    "interfaces_of",
    "preserved_batchnorm",
]
