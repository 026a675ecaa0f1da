"""The one place that turns config into objects: every model (``_target_`` of ``conf/model/``),
every optimizer and every dataset (and the only caller of ``hydra.utils.instantiate``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sgrun.data.copy_task import CopyTask
from sgrun.data.digits import DigitCountTask
from sgrun.data.image_data import ImageData
from sgrun.data.images import load_images
from sgrun.data.ptb import PTBChars, PTBStream, load_ptb_chars
from sgrun.dni import Placement, SynthesizerSpec
from sgrun.errors import ConfigError

# The datasets each model family trains on (the task registry's families).
FAMILY_DATA = {
    "feedforward": ("mnist", "cifar10", "synthetic"),
    "rnn": ("copy", "repeat_copy", "ptb"),
    "hrnn": ("digits", "digits_mnist"),
}
FAMILY_MODELS = {"feedforward": "fcn|cnn", "rnn": "rnn", "hrnn": "hrnn"}
# The dni choices each family has interfaces for.
FAMILY_DNI = {
    "feedforward": ("none", "every_layer", "cdni", "complete_unlock", "complete_unlock_cdni"),
    "rnn": ("none", "every_k", "every_k_aux"),
    "hrnn": ("message",),
}


def check_runtime_family(runtime: str, family: str, model: str) -> None:
    """The multi-process runtime splits feed-forward nets only."""
    if runtime == "pipeline" and family != "feedforward":
        raise ConfigError("runtime=pipeline runs feed-forward models (model=fcn|cnn), "
                          f"not model={model}: use runtime=inprocess")


def check_family_dni(family: str, model: str, dni: str) -> None:
    """A dni choice made for another model family is one line naming the valid ones."""
    valid = FAMILY_DNI.get(family)
    if valid is not None and dni not in valid:
        owners = "|".join(FAMILY_MODELS[f] for f, v in FAMILY_DNI.items() if dni in v)
        whose = f"dni={dni} is for model={owners}" if owners else f"dni={dni} is not a dni choice"
        raise ConfigError(f"{whose}: with model={model} choose "
                          + " or ".join(f"dni={v}" for v in valid)
                          + (" (model.coupling=none|dni|bptt chooses the coupling)"
                             if family == "hrnn" else ""))
# the held-out digit stream's seed: the same stream for every run and seed
DIGIT_EVAL_SEED = 1_000_003


def device_of(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but this machine has no CUDA device: "
                          "set device=cpu or device=auto")
    return torch.device(name)


def placement_of(dni: DictConfig) -> Placement | None:
    """The :class:`Placement` a ``dni`` config describes (``None`` for plain backprop)."""
    cuts = list(dni.get("cuts") or [])
    if not cuts:
        return None
    s = dni.synthesizer
    try:
        spec = SynthesizerSpec(kind=s.kind, hidden=s.hidden, layers=s.layers, kernel=s.kernel,
                               batchnorm=s.batchnorm)
    except ValueError as e:
        raise ConfigError(f"{e}: fix dni.synthesizer") from None
    si = dni.get("synthetic_input")
    inputs = SynthesizerSpec(kind="mlp", hidden=si.hidden, layers=si.layers) if si else None
    return Placement(cuts=tuple(cuts), synthesizer=spec, conditioned=bool(dni.conditioned),
                     mode=dni.mode, scale=float(dni.scale), synthetic_input=inputs,
                     bootstrap_scale=_optional_float(dni.get("bootstrap_scale")))


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def build_model(model: DictConfig, consumed: tuple[str, ...] = (), **runtime) -> torch.nn.Module:
    """Instantiate ``model`` (a ``conf/model/`` config with its ``_target_``) with the sizes known
    only at run time (``in_shape``, ``num_classes``, ``input_size``...); ``consumed`` are keys of
    the model group that the task reads itself (the truncation ``k`` of an RNN)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(model, resolve=True).items()
              if k not in ("name", "family", *consumed)}
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


def build_optimizer(cfg: DictConfig, params: list, synth_params: list, steps: int):
    """Adam over the model's parameters, synthesizers (and input models) in their own group at
    ``optim.lr * dni.lr_factor``; step decay at fractions of the run.

    Jaderberg et al. 2017, sec. 3.3: Adam, lr 3e-5, divided by 10 at 300k and 400k of 500k steps
    (``optim.decay_at: [0.6, 0.8]``).
    """
    lr = float(cfg.optim.lr)
    groups = [{"params": list(params), "lr": lr}]
    if synth_params:
        groups.append({"params": list(synth_params),
                       "lr": lr * float(cfg.dni.get("lr_factor", 1.0))})
    return _adam_with_decay(cfg, groups, steps)


def build_synthesizer_optimizer(cfg: DictConfig, synthesizer: torch.nn.Module, steps: int):
    """Adam and step decay for a synthesizer (or input model) trained on its own, as the one of a
    pipeline stage's boundary: the synthesizer learning rate of :func:`build_optimizer`."""
    params = [{"params": list(synthesizer.parameters()),
               "lr": float(cfg.optim.lr) * float(cfg.dni.get("lr_factor", 1.0))}]
    return _adam_with_decay(cfg, params, steps)


def _adam_with_decay(cfg: DictConfig, groups: list[dict], steps: int):
    opt = torch.optim.Adam(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    milestones = sorted({max(1, int(round(f * steps))) for f in cfg.optim.decay_at})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.optim.gamma)
    return opt, sched


# --------------------------------------------------------------------------- datasets


def check_family_data(cfg: DictConfig) -> None:
    """A model family with a dataset of another kind is one line naming the valid choices."""
    family, name = cfg.model.family, cfg.data.name
    valid = FAMILY_DATA.get(family)
    if valid is not None and name not in valid:
        raise ConfigError(f"model={cfg.model.name} trains on {', '.join(valid)}, "
                          f"not data={name}: choose "
                          + " or ".join(f"data={v}" for v in valid)
                          + " (or leave data= out for its default)")


def _options(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node else {}


def build_images(cfg: DictConfig) -> ImageData:
    """The image dataset of ``cfg.data`` (MNIST, CIFAR-10 or the generated one)."""
    check_family_data(cfg)
    return load_images(cfg.data.name, cfg.data_dir, download=cfg.data.download,
                       **_options(cfg.data.options))


def build_sequence_stream(cfg: DictConfig,
                          batch_size: int) -> tuple[CopyTask | PTBStream, PTBChars | None]:
    """The training stream of a sequence task and, for Penn Treebank, the loaded characters."""
    check_family_data(cfg)
    name = cfg.data.name
    if name in ("copy", "repeat_copy"):
        try:
            return CopyTask(batch_size, seed=cfg.seed, repeat=name == "repeat_copy",
                            **_options(cfg.data.options)), None
        except TypeError as e:
            raise ConfigError(f"data.options of {name}: {e}: "
                              f"see conf/data/{name}.yaml for the valid keys") from None
    sums = cfg.data.get("checksums")
    chars = load_ptb_chars(cfg.data_dir, download=bool(cfg.data.download),
                           checksums=None if sums is None
                           else OmegaConf.to_container(sums, resolve=True))
    return PTBStream(chars.train, batch_size, vocab_size=chars.vocab_size), chars


def build_digit_streams(cfg: DictConfig, batch_size: int,
                        T: int) -> tuple[DigitCountTask, Callable[[], DigitCountTask]]:
    """The training digit stream and a function returning the (always identical) held-out stream."""
    check_family_data(cfg)
    d = cfg.data
    train_images = train_labels = test_images = test_labels = None
    if d.mode == "images":
        images = load_images(d.images, cfg.data_dir, download=bool(d.download),
                             **_options(d.get("image_options")))
        train_images, train_labels, test_images, test_labels = (images.train_x, images.train_y,
                                                                images.test_x, images.test_y)
    train = DigitCountTask(batch_size, T, d.mode, train_images, train_labels, seed=cfg.seed)
    eval_batch = int(d.eval_batch_size)

    def held_out() -> DigitCountTask:
        # with images, the held-out stream shows the test images: digits the networks never saw
        return DigitCountTask(eval_batch, T, d.mode, test_images, test_labels, seed=DIGIT_EVAL_SEED)

    return train, held_out
