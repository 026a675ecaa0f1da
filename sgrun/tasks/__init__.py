"""One task per kind of experiment; the registry is the only place that maps a model family to one.

* ``feedforward`` (``model=fcn|cnn``): :class:`~sgrun.tasks.classification.Classification`;
* ``rnn`` (``model=rnn``): :class:`~sgrun.tasks.sequence.Sequence` (Table 1);
* ``hrnn`` (``model=hrnn``): :class:`~sgrun.tasks.two_timescale.TwoTimescale`.
"""

from sgrun.tasks.base import Task
from sgrun.tasks.classification import Classification
from sgrun.tasks.sequence import Sequence
from sgrun.tasks.two_timescale import TwoTimescale

TASKS: dict[str, type[Task]] = {"feedforward": Classification, "rnn": Sequence,
                                 "hrnn": TwoTimescale}

__all__ = ["TASKS", "Classification", "Sequence", "Task", "TwoTimescale"]
