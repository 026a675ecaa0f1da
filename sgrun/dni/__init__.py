"""Decoupled neural interfaces (Jaderberg et al. 2017) as ordinary ``nn.Module``s.

Importable without Hydra: ``from sgrun.dni import BackwardInterface, MLPSynthesizer``.

* synthesizers (:mod:`sgrun.dni.synthesizers`): ``M(h, c)``, the gradient synthesizers;
* the backward unlock (:mod:`sgrun.dni.interface`): :class:`BackwardInterface`, the synthetic
  gradient at a cut (sec. 2);
* synthetic inputs (:mod:`sgrun.dni.synthetic_input`): ``I(x)`` at a cut; :class:`ForwardInterface`
  (the forward unlock) and :class:`UnlockedInterface` (synthetic input and synthetic gradient: the
  complete unlock, sec. 2 / 3.3);
* the recurrent boundary (:mod:`sgrun.dni.recurrent`): :class:`RecurrentInterface`, truncated BPTT
  with a synthetic gradient at the carried state of any recurrent core (sec. 3.1);
* placement (:mod:`sgrun.dni.placement`): which cuts of an sgrun model get an interface;
* per-example units (:mod:`sgrun.dni.units`) and SG quality (:mod:`sgrun.dni.diagnostics`).

``docs/library.md`` shows each in a model of your own.
"""

from sgrun.dni.diagnostics import gradient_quality, preserved_batchnorm
from sgrun.dni.interface import (
    MODES,
    BackwardInterface,
    DNIUsageWarning,
    SyntheticGradient,
    interfaces_of,
)
from sgrun.dni.placement import Placement, build_interfaces
from sgrun.dni.recurrent import (
    RecurrentInterface,
    RecurrentStep,
    aux_target,
    block_loss,
    future_gradient_quality,
    truncated_step,
)
from sgrun.dni.synthesizers import (
    ConvSynthesizer,
    GradientSynthesizer,
    LinearSynthesizer,
    MLPSynthesizer,
    SynthesizerSpec,
    build_synthesizer,
)
from sgrun.dni.synthetic_input import (
    ForwardInterface,
    InputSynthesizer,
    SyntheticInput,
    SyntheticInputCut,
    UnlockedInterface,
)
from sgrun.dni.units import injected, per_example, regression_loss

__all__ = [
    "MODES",
    "BackwardInterface",
    "ConvSynthesizer",
    "DNIUsageWarning",
    "ForwardInterface",
    "GradientSynthesizer",
    "InputSynthesizer",
    "LinearSynthesizer",
    "MLPSynthesizer",
    "Placement",
    "RecurrentInterface",
    "RecurrentStep",
    "SynthesizerSpec",
    "SyntheticGradient",
    "SyntheticInput",
    "SyntheticInputCut",
    "UnlockedInterface",
    "aux_target",
    "block_loss",
    "build_interfaces",
    "build_synthesizer",
    "future_gradient_quality",
    "gradient_quality",
    "injected",
    "interfaces_of",
    "per_example",
    "preserved_batchnorm",
    "regression_loss",
    "truncated_step",
]
