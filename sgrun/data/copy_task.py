"""Copy and Repeat Copy (Graves et al. 2014, Neural Turing Machines), read as endless streams.

Jaderberg et al. 2017, sec. 3.1 trains LSTMs on these tasks with truncated BPTT and reports the
longest sequence length N solved under a curriculum.  Each of the ``B`` streams plays one episode
after another; the streams are independent, so episode boundaries fall at different times in
different streams.

Episode layout (time-major, ``C = bits``; input channels ``[0, C)`` carry the data bits, channel
``C`` is the delimiter, channel ``C + 1`` the repeat count)::

    Copy, length N                          T = 2N + 1 steps
      steps 0 .. N-1      x = the N random bit vectors          no target
      step  N             x[C] = 1 (delimiter)                  no target
      steps N+1 .. 2N     x = 0                                 y = the N vectors, mask 1

    Repeat Copy, length N, R repeats        T = N + 1 + N*R + 1 steps
      steps 0 .. N-1      x = the N random bit vectors          no target
      step  N             x[C] = 1 and x[C+1] = R / max_repeat_norm   (the delimiter step itself
                          carries the repeat count, so Copy and Repeat Copy share one layout)
      next N*R steps      x = 0                                 y[:C] = the sequence R times, mask 1
      last step           x = 0                                 y[C] = 1 (stop), y[:C] = 0, mask 1

Targets are bits: train with binary cross-entropy on logits.  ``input_size = bits + 2`` for both
tasks; ``output_size = bits`` for Copy and ``bits + 1`` (the stop channel) for Repeat Copy.

Curriculum (Jaderberg et al. 2017, sec. 3.1, threshold recalled): start at N = 1 (R = 1); when the
average error per output falls below ``threshold`` (0.15 bits) the level grows.  The *error per
output* is the number of wrong bits of one output step (summed over all output channels, a bit is
predicted as ``logit > 0``), averaged over output steps (Repeat Copy's stop step included); see
:func:`bit_errors`.  The rule:

* the trainer passes the per-step bit errors of each block to :meth:`CopyTask.report`;
* only output steps of episodes generated at the *current* level count (episodes still running
  from an easier level are left out);
* every ``window`` counted output steps (a tumbling window, summed over all streams) their mean is
  compared with ``threshold``; strictly below advances one stage, and the window restarts;
* Copy: stage ``s`` plays N = s + 1.  Repeat Copy alternates, N first:
  (N, R) = (1, 1) -> (2, 1) -> (2, 2) -> (3, 2) -> (3, 3) -> ...;
* every new episode uses exactly the current (N, R); no sampling of easier lengths.

When the curriculum advances from (N, R), that level counts as solved.  :attr:`CopyTask.level` is
the N of the last solved level (0 before the first advance) -- the paper's "largest N solved".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sgrun.data.tasks import Block, StreamTask, check_positive_int, new_generator
from sgrun.errors import ConfigError

#: Jaderberg et al. 2017, sec. 3.1 [recalled]: grow the curriculum below 0.15 bits per output.
DEFAULT_THRESHOLD = 0.15
#: The repeat-count channel carries R / max_repeat_norm.
DEFAULT_MAX_REPEAT_NORM = 10.0
#: Counted output steps per curriculum decision (summed over streams).
DEFAULT_WINDOW = 1000

_MASK64 = (1 << 64) - 1


def make_episode(
    rng: torch.Generator,
    n: int,
    bits: int,
    repeat: int | None = None,
    max_repeat_norm: float = DEFAULT_MAX_REPEAT_NORM,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Copy episode (``repeat=None``) or Repeat Copy episode with ``repeat`` repeats.

    Returns ``x`` float32 ``[T, bits + 2]``, ``y`` float32 ``[T, bits]`` (Copy) or
    ``[T, bits + 1]`` (Repeat Copy) and ``mask`` float32 ``[T]``; the layout is in the module
    docstring.  The ``n`` data vectors are uniform random bits drawn from ``rng``.
    """
    packed = _packed_episode(rng, n, bits, repeat, max_repeat_norm)
    in_size, out_size = bits + 2, bits + (0 if repeat is None else 1)
    return (
        packed[:, :in_size],
        packed[:, in_size : in_size + out_size],
        packed[:, in_size + out_size],
    )


def _packed_episode(rng: torch.Generator, n: int, bits: int, repeat: int | None,
                    max_repeat_norm: float) -> Tensor:
    """``[T, in + out + 2]``: x | y | mask | a spare column (the stream stores a stage tag there).

    One tensor per episode keeps the stream's per-step copying to one slice assignment.
    """
    if n < 1:
        raise ValueError(f"sequence length n must be >= 1, got {n}")
    if repeat is not None and repeat < 1:
        raise ValueError(f"repeat count must be >= 1, got {repeat}")
    seq = torch.randint(0, 2, (n, bits), generator=rng, dtype=torch.float32)  # [N, C]
    reps = 1 if repeat is None else repeat
    stop = 0 if repeat is None else 1
    in_size, out_size = bits + 2, bits + stop
    length = n + 1 + n * reps + stop
    packed = torch.zeros(length, in_size + out_size + 2)
    packed[:n, :bits] = seq
    packed[n, bits] = 1.0  # delimiter
    if repeat is not None:
        packed[n, bits + 1] = repeat / max_repeat_norm
    # The output phase: the sequence R times, [R, N, C] viewed over the N*R output steps.
    packed[n + 1 : n + 1 + n * reps, in_size : in_size + bits].unflatten(0, (reps, n))[:] = seq
    if stop:
        packed[-1, in_size + bits] = 1.0
    packed[n + 1 :, in_size + out_size] = 1.0  # mask
    return packed


def bit_errors(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Wrong bits per step: ``[..., C]`` logits and 0/1 targets, ``[...]`` mask -> ``[...]``.

    A bit is predicted 1 where its logit is > 0.  Steps with mask 0 give 0.
    """
    wrong = ((logits > 0) != (targets > 0.5)).sum(-1)
    return wrong.to(mask.dtype) * mask


def error_per_output(logits: Tensor, targets: Tensor, mask: Tensor) -> float:
    """Average number of wrong bits per output step (the curriculum's measure); NaN if no steps."""
    count = float(mask.sum())
    if count == 0:
        return math.nan
    return float(bit_errors(logits, targets, mask).sum()) / count


def _episode_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for episode ``index`` of ``stream``: episodes do not depend on block sizes."""
    z = seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & _MASK64
    return (z ^ (z >> 31)) >> 1


class CopyTask(StreamTask):
    """Copy (``repeat=False``) or Repeat Copy (``repeat=True``) streams with a curriculum.

    Args:
        batch_size: number of parallel streams ``B``.
        bits: data bits per step.
        seed: episode ``i`` of stream ``b`` is generated from a seed derived from
            ``(seed, b, i)``, so the streams are the same whatever block sizes are asked for.
        repeat: Repeat Copy instead of Copy.
        max_repeat_norm: the repeat-count channel carries ``R / max_repeat_norm``.
        threshold: grow the curriculum when the error per output is strictly below this.
        window: counted output steps per curriculum decision.
        stagger: start each stream with a random number of idle steps (zero input, no target),
            fewer than the first episode's length, so that truncation boundaries do not fall at
            the same episode phase in every stream.

    Use: ``block = task.next_block(k)``, compute ``logits [k, B, output_size]``, then
    ``task.report(bit_errors(logits, block.y, block.mask))`` before the next ``next_block``
    (a block that is not reported simply does not count for the curriculum).

    Attributes: :attr:`n` and :attr:`repeats` (the level of new episodes), :attr:`level` and
    :attr:`solved` (the last solved level), ``samples_seen`` (episodes completed, summed over the
    streams), ``steps_seen`` (steps emitted times ``B``), ``last_error`` (the error per output of
    the last curriculum window), ``history`` (``(samples_seen, N, R)`` at each advance, N and R of
    the level just solved).
    """

    def __init__(
        self,
        batch_size: int,
        bits: int = 8,
        seed: int = 0,
        repeat: bool = False,
        max_repeat_norm: float = DEFAULT_MAX_REPEAT_NORM,
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
        stagger: bool = True,
    ) -> None:
        self.batch_size = check_positive_int(batch_size, "batch_size", "set data.batch_size")
        self.bits = check_positive_int(bits, "bits", "set data.bits to the bits per copy step")
        self.window = check_positive_int(window, "window", "set data.window (output steps)")
        if not max_repeat_norm > 0:
            raise ConfigError(f"max_repeat_norm must be > 0 (got {max_repeat_norm!r}): "
                              "set data.max_repeat_norm")
        if not threshold > 0:
            raise ConfigError(f"threshold must be > 0 (got {threshold!r}): set data.threshold")
        self.seed = int(seed)
        self.repeat = bool(repeat)
        self.max_repeat_norm = float(max_repeat_norm)
        self.threshold = float(threshold)
        self.input_size = self.bits + 2
        self.output_size = self.bits + (1 if self.repeat else 0)
        self._gen = torch.Generator()

        self._stage = 0
        self._err_sum: float | Tensor = 0.0
        self._err_count = 0
        self.last_error: float | None = None
        self.history: list[tuple[int, int, int]] = []
        self.samples_seen = 0
        self.steps_seen = 0

        # Per stream: index of the running episode (-1 = idle lead-in), the curriculum stage it
        # was generated at, the position inside it, and the episode tensors (regenerable).
        lead_gen = new_generator(self.seed)
        first_len = 3 if not self.repeat else 4  # N = R = 1: 2N + 1, or N + 1 + NR + 1
        self._lead = (
            [int(v) for v in torch.randint(0, first_len, (self.batch_size,), generator=lead_gen)]
            if stagger
            else [0] * self.batch_size
        )
        self._index = [-1] * self.batch_size
        self._ep_stage = [0] * self.batch_size
        self._pos = [0] * self.batch_size
        self._episodes = [self._make(b) for b in range(self.batch_size)]
        self._pending: Tensor | None = None

    # ----------------------------------------------------------------- curriculum

    @staticmethod
    def _stage_level(stage: int, repeat: bool) -> tuple[int, int]:
        if not repeat:
            return stage + 1, 1
        return 1 + (stage + 1) // 2, 1 + stage // 2

    @property
    def n(self) -> int:
        """Sequence length N of new episodes."""
        return self._stage_level(self._stage, self.repeat)[0]

    @property
    def repeats(self) -> int:
        """Repeat count R of new episodes (always 1 for Copy)."""
        return self._stage_level(self._stage, self.repeat)[1]

    @property
    def solved(self) -> tuple[int, int] | None:
        """``(N, R)`` of the last solved level, or None before the first advance."""
        if self._stage == 0:
            return None
        return self._stage_level(self._stage - 1, self.repeat)

    @property
    def level(self) -> int:
        """Largest N solved so far (0 if none): the N of the last level the curriculum left."""
        solved = self.solved
        return 0 if solved is None else solved[0]

    def report(self, step_errors: Tensor) -> bool:
        """Feed the wrong bits per step ``[k, B]`` of the block last returned by next_block.

        ``step_errors`` is :func:`bit_errors` of that block (any device).  Returns True when the
        curriculum advanced.  Only a tumbling-window decision reads the value back to the CPU.
        """
        if self._pending is None:
            raise RuntimeError("CopyTask.report() must follow next_block(), at most once per block")
        counted, self._pending = self._pending, None
        if tuple(step_errors.shape) != tuple(counted.shape):
            raise ValueError(f"step_errors has shape {tuple(step_errors.shape)}, "
                             f"the block is {tuple(counted.shape)}")
        n_counted = int(counted.sum())
        if n_counted == 0:
            return False
        errs = step_errors.detach().float() * counted.to(step_errors.device)
        self._err_sum = self._err_sum + errs.sum()
        self._err_count += n_counted
        if self._err_count < self.window:
            return False
        mean = float(self._err_sum) / self._err_count
        self.last_error = mean
        self._err_sum, self._err_count = 0.0, 0
        if mean < self.threshold:
            self._stage += 1
            n, r = self.solved  # type: ignore[misc]
            self.history.append((self.samples_seen, n, r))
            return True
        return False

    def curriculum_state(self) -> dict:
        """The curriculum alone: stage, the running window, and the solved-level history."""
        return {
            "stage": self._stage,
            "err_sum": float(self._err_sum),
            "err_count": self._err_count,
            "last_error": self.last_error,
            "history": [list(h) for h in self.history],
        }

    def load_curriculum_state(self, state: dict) -> None:
        self._stage = int(state["stage"])
        self._err_sum = float(state["err_sum"])
        self._err_count = int(state["err_count"])
        self.last_error = state["last_error"]
        self.history = [tuple(h) for h in state["history"]]  # type: ignore[misc]

    # ----------------------------------------------------------------- streams

    def _make(self, b: int) -> Tensor:
        """Packed tensor (x | y | mask | stage) of the running episode of stream ``b``.

        Regenerated from the episode's seed, so a checkpoint stores only indices.
        """
        if self._index[b] < 0:
            packed = torch.zeros(self._lead[b], self.input_size + self.output_size + 2)
            packed[:, -1] = -1.0
            return packed
        stage = self._ep_stage[b]
        n, r = self._stage_level(stage, self.repeat)
        self._gen.manual_seed(_episode_seed(self.seed, b, self._index[b]))
        packed = _packed_episode(self._gen, n, self.bits, r if self.repeat else None,
                                 self.max_repeat_norm)
        packed[:, -1] = float(stage)
        return packed

    def next_block(self, k: int) -> Block:
        """The next ``k`` steps of every stream; episodes continue across calls."""
        k = check_positive_int(k, "k", "ask for at least one step")
        i, o = self.input_size, self.output_size
        buf = torch.empty(k, self.batch_size, i + o + 2)
        for b in range(self.batch_size):
            t = 0
            while t < k:
                ep = self._episodes[b]
                pos = self._pos[b]
                if pos == ep.shape[0]:
                    # Start the next episode only now, so it gets the curriculum level of the
                    # moment it begins (report() may have advanced it since the last block).
                    self._index[b] += 1
                    self._ep_stage[b] = self._stage
                    self._pos[b] = 0
                    self._episodes[b] = self._make(b)
                    continue
                take = min(k - t, ep.shape[0] - pos)
                buf[t : t + take, b] = ep[pos : pos + take]
                t += take
                self._pos[b] = pos + take
                if self._pos[b] == ep.shape[0] and self._index[b] >= 0:
                    self.samples_seen += 1
        self.steps_seen += k * self.batch_size
        mask = buf[:, :, i + o].contiguous()
        # Only output steps of episodes generated at the current level count for the curriculum.
        self._pending = mask * (buf[:, :, i + o + 1] == self._stage)
        return Block(x=buf[:, :, :i].contiguous(), y=buf[:, :, i : i + o].contiguous(), mask=mask)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "repeat": self.repeat,
            "lead": list(self._lead),
            "index": list(self._index),
            "ep_stage": list(self._ep_stage),
            "pos": list(self._pos),
            "samples_seen": self.samples_seen,
            "steps_seen": self.steps_seen,
            "curriculum": self.curriculum_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["pos"]) != self.batch_size or bool(state["repeat"]) != self.repeat:
            raise ConfigError(
                f"the saved copy-task state is for batch_size={len(state['pos'])}, "
                f"repeat={state['repeat']}, not batch_size={self.batch_size}, "
                f"repeat={self.repeat}: resume with the original data settings"
            )
        self.seed = int(state["seed"])
        self._lead = [int(v) for v in state["lead"]]
        self._index = [int(v) for v in state["index"]]
        self._ep_stage = [int(v) for v in state["ep_stage"]]
        self._pos = [int(v) for v in state["pos"]]
        self.samples_seen = int(state["samples_seen"])
        self.steps_seen = int(state["steps_seen"])
        self.load_curriculum_state(state["curriculum"])
        self._episodes = [self._make(b) for b in range(self.batch_size)]
        self._pending = None
