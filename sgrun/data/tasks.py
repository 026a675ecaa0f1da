"""Base class for generated sequence tasks that are read as continuous streams.

Recurrent models in sgrun are trained with truncated BPTT on an endless stream (Jaderberg et al.
2017, sec. 3.1): the trainer repeatedly asks a task for the next ``k`` time steps of ``B`` parallel
streams and carries the LSTM state from one call to the next.  A task is therefore a *stateful*
object: :meth:`StreamTask.next_block` advances every stream by ``k`` steps, and
:meth:`StreamTask.state_dict` / :meth:`StreamTask.load_state_dict` capture the position and the
random generator so that a resumed run sees exactly the blocks it would have seen.

Tensors are time-major: ``[k, B, ...]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sgrun.errors import ConfigError


@dataclass
class Block:
    """The next ``k`` steps of ``B`` streams.

    Attributes:
        x: inputs, float32 ``[k, B, input_size]`` (int64 ids ``[k, B]`` for token streams).
        y: targets, float bits ``[k, B, output_size]`` for the copy tasks, int64 class ids
            ``[k, B]`` for token streams.
        mask: float32 ``[k, B]``; 1 where the step has a target that counts for loss and metrics.
    """

    x: Tensor
    y: Tensor
    mask: Tensor


class StreamTask(ABC):
    """A task read as ``batch_size`` parallel, endless streams.

    Subclasses set ``batch_size`` and ``input_size``; single-headed tasks also set
    ``output_size`` (the number of output units the model needs).  Tasks with several heads expose
    one size per head instead (see :class:`sgrun.data.digits.DigitCountTask`).
    """

    batch_size: int
    input_size: int
    output_size: int

    @abstractmethod
    def next_block(self, k: int) -> Any:
        """Advance every stream by ``k`` steps and return those steps (a :class:`Block`)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Position and random state, enough to reproduce all future blocks."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_positive_int(value: Any, name: str, fix: str) -> int:
    """Return ``value`` as an int, or raise :class:`ConfigError` if it is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be >= 1 (got {value!r}): {fix}")
    return value


def new_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``; every generated task owns one."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return gen
