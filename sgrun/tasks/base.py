"""What the training engine (:func:`sgrun.train.fit`) asks of a task.

A task owns its model, its data and its metrics; the engine owns everything that is the same for
every task: optimizers and their schedule, resume, threads, the progress bar, the log / eval /
checkpoint cadence, the divergence guard, stochastic layer updates and the final outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sgrun.metrics import NullWriter


class Task:
    """One kind of experiment: classification, sequences (Table 1) or two timescales."""

    #: what one step reads, for ``perf/<unit>_per_sec`` (samples, characters, digits)
    unit = "samples"
    #: whether :meth:`evaluate` runs every ``train.eval_every`` steps (a copy task's curriculum
    #: is its own evaluation)
    evaluates = True
    #: diagnostics measured before the step on its batch (feed-forward) or after it (recurrent:
    #: the state the next block starts from)
    diagnose_after_step = False
    #: ``train.update_prob`` < 1 is honoured (:meth:`layer_groups`) or refused
    stochastic_updates = False
    #: the metric a sweeper minimises
    primary = "test_error"

    model: nn.Module
    writer: NullWriter = NullWriter()  # set by the engine
    step: int = 0  # the step being trained, set by the engine before each step

    def units_per_step(self) -> int:
        raise NotImplementedError

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The model's own parameters and its synthesizers' (which get ``dni.lr_factor``)."""
        raise NotImplementedError

    def layer_groups(self) -> list[list[nn.Module]]:
        """Groups updated together under stochastic updates (Jaderberg et al. 2017, sec. 3.3)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the start of the run: the data and the model."""
        raise NotImplementedError

    def next_batch(self) -> Any:
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward and backward of one batch (gradients are zeroed before, the optimizer steps
        after).

        Returns detached scalars the engine sums over the logging interval, tagged as logged
        (``loss/train``, ``dni/<cut>/sg_loss``); the divergence guard checks every one of them."""
        raise NotImplementedError

    def log_values(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """TensorBoard scalars of a logging step from the sums of ``count`` steps: their means."""
        return {tag: value / count for tag, value in sums.items()}

    def diagnostics(self, batch: Any) -> dict[str, float]:
        """Scalars measured on logging steps only (SG quality against the true gradient...)."""
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics, logged at ``step``."""
        return {}

    def progress(self) -> dict[str, Any]:
        """Extra fields of the progress bar."""
        return {}

    def should_stop(self) -> bool:
        """Early stopping (checked after the step's checkpoint)."""
        return False

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def final_metrics(self, steps: int) -> dict:
        """The metrics of ``summary.json`` after ``steps`` steps (the ``primary`` one included)."""
        raise NotImplementedError

    @staticmethod
    def headline(metrics: dict) -> str:
        """The result a person reads first, e.g. ``test error 1.67 %``."""
        raise NotImplementedError
