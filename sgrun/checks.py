"""Config checks: every user mistake in a value becomes one clear line naming the fix.

Hydra checks that keys and group options exist; this module checks the values (types and
ranges), before anything is built or written.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from sgrun.errors import ConfigError

_MISSING = object()


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=_MISSING)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


# (key, type test, type name, range test, range text, example fix)
Rule = tuple[str, Callable, str, Callable, str, str]

RULES: list[Rule] = [
    ("seed", _is_int, "an integer", lambda v: v >= 0, ">= 0", "seed=0"),
    ("train.steps", _is_int, "an integer", lambda v: v >= 1, ">= 1", "train.steps=1000"),
    ("train.batch_size", _is_int, "an integer", lambda v: v >= 1, ">= 1", "train.batch_size=256"),
    ("train.log_every", _is_int, "an integer", lambda v: v >= 1, ">= 1", "train.log_every=100"),
    ("train.eval_every", _is_int, "an integer", lambda v: v >= 1, ">= 1", "train.eval_every=1000"),
    ("checkpoint.every", _is_int, "an integer", lambda v: v >= 0, ">= 0", "checkpoint.every=1000"),
    ("train.update_prob", _is_num, "a number", lambda v: 0 <= v <= 1, "in [0, 1]",
     "train.update_prob=1.0"),
    ("optim.lr", _is_num, "a number", lambda v: 0 < v < math.inf, "> 0 and finite",
     "optim.lr=3e-5"),
    ("optim.gamma", _is_num, "a number", lambda v: 0 < v <= 1, "in (0, 1]", "optim.gamma=0.1"),
    ("data.test_limit", _is_int, "an integer", lambda v: v >= 1, ">= 1",
     "data.test_limit=1000 (or null: all)"),
    ("model.layers", _is_int, "an integer", lambda v: v >= 2, ">= 2", "model.layers=3"),
    ("model.hidden", _is_int, "an integer", lambda v: v >= 1, ">= 1", "model.hidden=256"),
    ("model.channels", _is_int, "an integer", lambda v: v >= 1, ">= 1", "model.channels=64"),
    ("dni.scale", _is_num, "a number", lambda v: 0 <= v < math.inf, ">= 0 and finite",
     "dni.scale=1.0"),
    ("dni.lr_factor", _is_num, "a number", lambda v: v > 0, "> 0", "dni.lr_factor=1.0"),
    ("dni.synthesizer.hidden", _is_int, "an integer", lambda v: v >= 1, ">= 1",
     "dni.synthesizer.hidden=1024"),
    ("dni.synthesizer.layers", _is_int, "an integer", lambda v: v >= 0, ">= 0",
     "dni.synthesizer.layers=2"),
]

# Recurrent models and sequence tasks (model=rnn; Jaderberg et al. 2017, sec. 3.1)
RULES += [
    ("model.k", _is_int, "an integer", lambda v: v >= 1, ">= 1", "model.k=3"),
    ("dni.aux_weight", _is_num, "a number", lambda v: v >= 0, ">= 0", "dni.aux_weight=1.0"),
    ("dni.bootstrap_scale", _is_num, "a number", lambda v: v >= 0, ">= 0",
     "dni.bootstrap_scale=1.0 (or null: the injected scale)"),
    ("train.plateau_samples", _is_int, "an integer", lambda v: v >= 1, ">= 1",
     "train.plateau_samples=150000 (or null: no plateau rule)"),
    ("data.options.bits", _is_int, "an integer", lambda v: v >= 1, ">= 1", "data.options.bits=8"),
    ("data.options.window", _is_int, "an integer", lambda v: v >= 1, ">= 1",
     "data.options.window=1000"),
    ("data.options.threshold", _is_num, "a number", lambda v: v > 0, "> 0",
     "data.options.threshold=0.15"),
    ("data.eval_batch_size", _is_int, "an integer", lambda v: v >= 1, ">= 1",
     "data.eval_batch_size=64"),
    ("data.eval_block", _is_int, "an integer", lambda v: v >= 1, ">= 1", "data.eval_block=100"),
    ("train.sg_horizon", _is_int, "an integer", lambda v: v >= 1, ">= 1", "train.sg_horizon=40"),
    ("train.patience", _is_int, "an integer", lambda v: v >= 1, ">= 1",
     "train.patience=5 (or null: never stop early)"),
    ("data.eval_chars", _is_int, "an integer", lambda v: v >= 2, ">= 2",
     "data.eval_chars=100000 (or null: all)"),
]


def check_config(cfg: DictConfig, extra: list[Rule] | None = None) -> None:
    """Raise :class:`ConfigError` on the first value of the wrong type or out of range."""
    for key, is_type, type_name, in_range, range_text, fix in RULES + (extra or []):
        value = _get(cfg, key)
        if value is _MISSING or value is None:
            continue
        if not is_type(value):
            raise ConfigError(f"{key} must be {type_name} (got {value!r}): set e.g. {fix}")
        # no setting of sgrun takes inf or nan
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number (got {value!r}): set e.g. {fix}")
        if not in_range(value):
            raise ConfigError(f"{key} must be {range_text} (got {value!r}): set e.g. {fix}")
    threads = _get(cfg, "runtime.threads")
    if threads not in (_MISSING, None, "auto") and not (_is_int(threads) and threads >= 1):
        raise ConfigError(f"runtime.threads must be an integer >= 1 (got {threads!r}): "
                          "set e.g. runtime.threads=1 (or null: torch's default)")
    device = _get(cfg, "device")
    if device not in (_MISSING, "auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda (got {device!r}): set device=auto")
    dni_mode = _get(cfg, "dni.mode")
    if dni_mode not in (_MISSING, "synthetic", "train_only", "off"):
        raise ConfigError(f"dni.mode must be synthetic, train_only or off (got {dni_mode!r}): "
                          "set dni.mode=synthetic")

# Two networks at two timescales (model=hrnn; Jaderberg et al. 2017, sec. 3.2)
RULES += [
    ("model.T", _is_int, "an integer", lambda v: v >= 1, ">= 1", "model.T=3"),
    ("model.coupling", lambda v: isinstance(v, str), "one of none, dni, bptt",
     lambda v: v in ("none", "dni", "bptt"), "one of none, dni, bptt", "model.coupling=dni"),
    ("model.hidden_a", _is_int, "an integer", lambda v: v >= 1, ">= 1", "model.hidden_a=64"),
    ("model.hidden_b", _is_int, "an integer", lambda v: v >= 1, ">= 1", "model.hidden_b=64"),
    ("model.truncation_b", _is_int, "an integer", lambda v: v >= 1, ">= 1", "model.truncation_b=6"),
    ("data.mode", lambda v: isinstance(v, str), "one of classes, images",
     lambda v: v in ("classes", "images"), "one of classes, images", "data.mode=classes"),
    ("data.eval_ticks", _is_int, "an integer", lambda v: v >= 1, ">= 1", "data.eval_ticks=200"),
]
