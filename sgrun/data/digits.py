"""The digit-counting streams of the two-timescale experiment (Jaderberg et al. 2017, sec. 3.2).

Two recurrent networks read one stream of digits: network A ticks every step, network B every
``T`` steps and sees only messages from A.  Every ``T`` steps

* A must output the number of odd digits among the last ``T`` digits (a class in ``0 .. T``);
* B must output the number of 3s among the last ``T*T`` digits (a class in ``0 .. T*T``), which it
  can only know from A's messages.  [task recalled, medium confidence]

Time is global and shared by the ``B`` parallel streams: step ``t`` counts from 0 at the start of
the stream, and the ticks of network B (the ends of the blocks of ``T`` steps) are the steps with
``(t + 1) % T == 0``, in every stream at once.  The targets live on those steps; A's target exists
from the first tick on, B's only once ``T*T`` digits have been seen.  Everywhere else the target is
0 and its mask is 0.

A digit is shown either as its one-hot class (``mode="classes"``, 10 inputs) or as an MNIST image
of that class drawn at random from a given set (``mode="images"``, 784 inputs, flattened).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sgrun.data.tasks import StreamTask, check_positive_int, new_generator
from sgrun.errors import ConfigError

MODES = ("classes", "images")


@dataclass
class DigitBlock:
    """The next ``k`` steps of the ``B`` digit streams (time-major).

    Attributes:
        x: float32 ``[k, B, input_size]``: one-hot digits or flattened images.
        y_a: int64 ``[k, B]``: odd digits among the last T (valid where ``mask_a`` is 1).
        y_b: int64 ``[k, B]``: 3s among the last T*T (valid where ``mask_b`` is 1).
        mask_a, mask_b: float32 ``[k, B]``.
        digits: int64 ``[k, B]``: the digit classes shown.
    """

    x: Tensor
    y_a: Tensor
    y_b: Tensor
    mask_a: Tensor
    mask_b: Tensor
    digits: Tensor


def count_targets(digits: Tensor, T: int, start: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Targets and masks for a digit stream ``digits`` ``[t]`` or ``[t, B]`` (time first).

    ``digits[i]`` is the digit at global step ``start + i``.  Step ``i`` has targets when
    ``(start + i + 1) % T == 0``: ``y_a[i]`` = odd digits in ``digits[i-T+1 .. i]`` (needs
    ``i + 1 >= T``), ``y_b[i]`` = 3s in ``digits[i-T*T+1 .. i]`` (needs ``i + 1 >= T*T``).
    Returns ``(y_a, y_b, mask_a, mask_b)``: int64, int64, float32, float32, shaped like
    ``digits``; targets are 0 where their mask is 0.
    """
    T = check_positive_int(T, "T", "set data.T (the timescale of network B) to 1 or more")
    steps = digits.shape[0]
    ends = (torch.arange(steps) + start + 1) % T == 0
    have_a = ends & (torch.arange(steps) + 1 >= T)
    have_b = ends & (torch.arange(steps) + 1 >= T * T)

    def window_count(hits: Tensor, width: int) -> Tensor:
        # Sum over the last `width` steps through a cumulative sum along time.
        csum = torch.cumsum(hits.long(), dim=0)
        before = torch.zeros_like(csum)
        if width < steps:
            before[width:] = csum[:-width]
        return csum - before

    shape = (steps,) + (1,) * (digits.dim() - 1)
    mask_a = have_a.view(shape).expand(digits.shape).float()
    mask_b = have_b.view(shape).expand(digits.shape).float()
    y_a = window_count(digits % 2 == 1, T) * mask_a.long()
    y_b = window_count(digits == 3, T * T) * mask_b.long()
    return y_a, y_b, mask_a, mask_b


class DigitCountTask(StreamTask):
    """``batch_size`` aligned streams of random digits with A and B counting targets.

    Args:
        batch_size: number of parallel streams.
        T: timescale of network B (and the counting window of A).
        mode: ``"classes"`` (one-hot digits) or ``"images"`` (MNIST images).
        images: ``[N, 1, 28, 28]`` (or ``[N, 28, 28]``) images for ``mode="images"``; uint8 is
            scaled to ``[0, 1]``, floating point is used as given (normalise beforehand if
            wanted).
        labels: ``[N]`` digit classes of ``images``.
        seed: seed of the task's generator.

    In classes mode each digit is uniform over 0..9; in images mode each step shows a uniformly
    drawn image from ``images`` and its digit is that image's label.
    """

    def __init__(
        self,
        batch_size: int,
        T: int,
        mode: str = "classes",
        images: Tensor | None = None,
        labels: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        self.batch_size = check_positive_int(batch_size, "batch_size", "set data.batch_size")
        self.T = check_positive_int(T, "T", "set data.T (the timescale of network B) to 1 or more")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES} (got {mode!r}): set data.mode")
        self.mode = mode
        self.num_classes_a = self.T + 1
        self.num_classes_b = self.T * self.T + 1
        if mode == "images":
            if images is None or labels is None:
                raise ConfigError(
                    "mode='images' needs images and labels: load MNIST and pass them, "
                    "or use mode='classes'"
                )
            if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
                raise ConfigError(
                    f"images ({images.shape[0]}) and labels ({labels.shape[0]}) must be equally "
                    "many and not empty: pass matching tensors"
                )
            # Kept as given (uint8 MNIST is 4x smaller than float); converted per block.
            self._images = images.reshape(images.shape[0], -1)
            self._labels = labels.long()
            self.input_size = self._images.shape[1]
        else:
            self._images = None
            self._labels = None
            self.input_size = 10
        self.seed = int(seed)
        self._gen = new_generator(self.seed)
        self.step = 0
        # The last T*T - 1 digits of every stream: enough history for B's window.
        self._recent = torch.zeros(0, self.batch_size, dtype=torch.long)

    @property
    def output_size(self) -> int:  # type: ignore[override]
        """A's number of classes (B's is ``num_classes_b``)."""
        return self.num_classes_a

    def next_block(self, k: int) -> DigitBlock:
        """The next ``k`` steps of all streams (all streams are at the same global step)."""
        k = check_positive_int(k, "k", "ask for at least one step")
        if self._labels is None:
            digits = torch.randint(0, 10, (k, self.batch_size), generator=self._gen)
            x = torch.nn.functional.one_hot(digits, 10).float()
        else:
            idx = torch.randint(0, self._labels.shape[0], (k, self.batch_size), generator=self._gen)
            digits = self._labels[idx]
            rows = self._images[idx]  # [k, B, 784]
            x = rows.float() / 255.0 if rows.dtype == torch.uint8 else rows.float()
        history = self._recent.shape[0]
        full = torch.cat([self._recent, digits], dim=0)
        y_a, y_b, mask_a, mask_b = count_targets(full, self.T, start=self.step - history)
        keep = self.T * self.T - 1
        self._recent = full[full.shape[0] - min(keep, full.shape[0]) :].clone()
        self.step += k
        return DigitBlock(
            x=x,
            y_a=y_a[history:],
            y_b=y_b[history:],
            mask_a=mask_a[history:],
            mask_b=mask_b[history:],
            digits=digits,
        )

    def state_dict(self) -> dict:
        return {
            "generator": self._gen.get_state(),
            "step": self.step,
            "recent": self._recent.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        recent = state["recent"]
        if recent.dim() != 2 or recent.shape[1] != self.batch_size:
            raise ConfigError(
                f"the saved digit-stream state has {recent.shape[-1]} streams, not "
                f"{self.batch_size}: resume with the original batch_size"
            )
        self._gen.set_state(state["generator"])
        self.step = int(state["step"])
        self._recent = recent.clone()
