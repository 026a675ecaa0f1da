"""The one place that turns config into objects (and the only caller of ``hydra.utils.instantiate``)."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sgrun.dni import Placement, SynthesizerSpec, interfaces_of
from sgrun.errors import ConfigError


def device_of(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA device: set device=cpu or device=auto")
    return torch.device(name)


def placement_of(dni: DictConfig) -> Placement | None:
    """The :class:`Placement` a ``dni`` config describes (``None`` for plain backprop)."""
    cuts = list(dni.get("cuts") or [])
    if not cuts:
        return None
    s = dni.synthesizer
    try:
        spec = SynthesizerSpec(kind=s.kind, hidden=s.hidden, layers=s.layers, kernel=s.kernel, batchnorm=s.batchnorm)
    except ValueError as e:
        raise ConfigError(f"{e}: fix dni.synthesizer") from None
    si = dni.get("synthetic_input")
    inputs = SynthesizerSpec(kind="mlp", hidden=si.hidden, layers=si.layers) if si else None
    return Placement(cuts=tuple(cuts), synthesizer=spec, conditioned=bool(dni.conditioned), mode=dni.mode,
                     scale=float(dni.scale), synthetic_input=inputs)


def build_model(cfg: DictConfig, **runtime) -> torch.nn.Module:
    """Instantiate ``cfg.model`` with the sizes known only at run time (``in_shape``, ``num_classes``)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
              if k not in ("name", "family")}
    try:
        # partial, so run-time objects (a Placement) are passed as they are, not turned into configs
        return instantiate(kwargs, _partial_=True)(**runtime)
    except Exception as e:  # instantiate wraps the model's own ConfigError
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, steps: int, lr: float):
    """Adam over the model, synthesizers in their own group; step decay at fractions of the run.

    Jaderberg et al. 2017, sec. 3.3: Adam, lr 3e-5, divided by 10 at 300k and 400k of 500k steps
    (``optim.decay_at: [0.6, 0.8]``).
    """
    # synthesizers and input models (everything in an interface) share the synthesizer learning rate
    synth = {id(p) for i in interfaces_of(model) for p in i.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in synth], "lr": lr}]
    synth_params = [p for p in model.parameters() if id(p) in synth]
    if synth_params:
        groups.append({"params": synth_params, "lr": lr * float(cfg.dni.get("lr_factor", 1.0))})
    return _adam_with_decay(cfg, groups, steps)


def build_synthesizer_optimizer(cfg: DictConfig, synthesizer: torch.nn.Module, steps: int, lr: float):
    """Adam and step decay for a synthesizer (or input model) trained on its own, as the one of a
    pipeline stage's boundary: the synthesizer learning rate of :func:`build_optimizer`."""
    params = [{"params": list(synthesizer.parameters()), "lr": lr * float(cfg.dni.get("lr_factor", 1.0))}]
    return _adam_with_decay(cfg, params, steps)


def _adam_with_decay(cfg: DictConfig, groups: list[dict], steps: int):
    opt = torch.optim.Adam(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    milestones = sorted({max(1, int(round(f * steps))) for f in cfg.optim.decay_at})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.optim.gamma)
    return opt, sched
