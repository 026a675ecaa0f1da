"""Decoupled neural interfaces (Jaderberg et al. 2017) as ordinary ``nn.Module``s.

Importable without Hydra: ``from sgrun.dni import BackwardInterface, MLPSynthesizer, Placement``.

* synthesizers (:mod:`sgrun.dni.synthesizers`): ``M(h, c)``, the gradient predictors;
* backward interfaces (:mod:`sgrun.dni.interface`): the synthetic gradient at a cut;
* synthetic inputs (:mod:`sgrun.dni.synthetic_input`): ``I(x)`` at a cut, the forward unlock;
* placement (:mod:`sgrun.dni.placement`): which cuts get an interface;
* the recurrent boundary (:mod:`sgrun.dni.recurrent`): truncated BPTT with a synthetic gradient;
* per-example units (:mod:`sgrun.dni.units`) and SG quality (:mod:`sgrun.dni.diagnostics`).
"""

from sgrun.dni.diagnostics import gradient_quality, preserved_batchnorm
from sgrun.dni.interface import MODES, BackwardInterface, SyntheticGradient, interfaces_of
from sgrun.dni.placement import Placement, build_interfaces
from sgrun.dni.recurrent import aux_target, block_loss, future_gradient_quality, truncated_step
from sgrun.dni.synthesizers import (
    ConvSynthesizer,
    GradientSynthesizer,
    LinearSynthesizer,
    MLPSynthesizer,
    SynthesizerSpec,
    build_synthesizer,
)
from sgrun.dni.synthetic_input import InputSynthesizer, SyntheticInputCut, UnlockedInterface

__all__ = [
    "MODES",
    "BackwardInterface",
    "ConvSynthesizer",
    "GradientSynthesizer",
    "InputSynthesizer",
    "LinearSynthesizer",
    "MLPSynthesizer",
    "Placement",
    "SynthesizerSpec",
    "SyntheticGradient",
    "SyntheticInputCut",
    "UnlockedInterface",
    "aux_target",
    "block_loss",
    "build_interfaces",
    "build_synthesizer",
    "future_gradient_quality",
    "gradient_quality",
    "interfaces_of",
    "preserved_batchnorm",
    "truncated_step",
]
