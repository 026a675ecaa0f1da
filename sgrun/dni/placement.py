"""Placement: where a model gets decoupled interfaces, and of what kind (data, not code).

A model lists its cuts (``model.cut_names``) and calls :func:`build_interfaces` with a
:class:`Placement`; a config file says which cuts get an interface (``dni.cuts``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from sgrun.dni.interface import MODES, BackwardInterface
from sgrun.dni.synthesizers import SynthesizerSpec, build_synthesizer
from sgrun.dni.synthetic_input import InputSynthesizer, UnlockedInterface
from sgrun.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """Where a model gets backward interfaces, and of what kind.

    ``cuts`` names cut points of the model (``("all",)`` for every cut, ``()`` for plain backprop);
    models list their cuts in ``model.cut_names`` and call :meth:`resolve`.  ``conditioned`` makes
    every synthesizer also see the one-hot label (cDNI).
    """

    cuts: tuple[str, ...] = ()
    synthesizer: SynthesizerSpec = field(default_factory=SynthesizerSpec)
    conditioned: bool = False
    mode: str = "synthetic"
    scale: float = 1.0
    # a synthetic input I(x) at each cut too, predicted from the data input x (complete unlock)
    synthetic_input: SynthesizerSpec | None = None
    # the factor on the next synthetic gradient in a recurrent synthesizer's bootstrapped target
    # (None: the injected ``scale``); see sgrun.dni.recurrent
    bootstrap_scale: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cuts", tuple(self.cuts))
        if self.mode not in MODES:
            raise ConfigError(f"dni mode must be one of {', '.join(MODES)} (got {self.mode!r}): "
                              "set dni.mode=synthetic")
        if self.scale < 0:
            raise ConfigError(f"dni scale must be >= 0 (got {self.scale}): set dni.scale=1.0")

    def resolve(self, available: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """The cuts that get an interface; a cut the model does not have is a
        :class:`ConfigError`."""
        if self.cuts == ("all",):
            return tuple(available)
        unknown = [c for c in self.cuts if c not in available]
        if unknown:
            raise ConfigError(
                f"no cut named {', '.join(map(repr, unknown))} in this model: valid cuts are "
                f"{', '.join(available) or 'none'} (or 'all')"
            )
        return tuple(c for c in available if c in self.cuts)


def build_interfaces(placement: Placement | None, shapes: dict[str, tuple[int, ...]],
                     context_dim: int = 0,
                     in_shape: tuple[int, ...] | None = None) -> nn.ModuleDict:
    """One interface per placed cut; ``shapes`` maps every cut to its activation shape.

    With ``placement.synthetic_input`` the interfaces are
    :class:`~sgrun.dni.synthetic_input.UnlockedInterface`: a synthetic input from the data input of
    shape ``in_shape`` and a synthetic gradient (the complete unlock).
    """
    interfaces = nn.ModuleDict()
    if placement is None:
        return interfaces
    if placement.bootstrap_scale is not None:
        raise ConfigError("bootstrap_scale sets the target of a recurrent synthesizer (model=rnn "
                          "with dni=every_k); remove it here")
    si = placement.synthetic_input
    if si is not None and in_shape is None:
        raise ConfigError("synthetic inputs need the model's input shape (in_shape)")
    for cut in placement.resolve(list(shapes)):
        context = context_dim if placement.conditioned else 0
        synth = build_synthesizer(placement.synthesizer, shapes[cut], context)
        if si is None:
            interfaces[cut] = BackwardInterface(synth, placement.scale, placement.mode, name=cut)
        else:
            synthetic_input = InputSynthesizer(in_shape, shapes[cut], hidden=si.hidden,
                                               layers=si.layers)
            interfaces[cut] = UnlockedInterface(synth, synthetic_input, placement.scale,
                                                placement.mode, name=cut)
    return interfaces
