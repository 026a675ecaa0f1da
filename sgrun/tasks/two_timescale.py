"""Two networks at two timescales (Jaderberg et al. 2017, sec. 3.2): network A counts odd digits,
network B counts 3s from A's messages, coupled by nothing, by a DNI, or by backprop.

``B`` parallel digit streams (:class:`~sgrun.data.digits.DigitCountTask`) are read
``model.truncation_b`` ticks at a time, i.e. ``truncation_b * T`` digits; each such chunk is one
optimizer step for A, B and the synthesizer, in every coupling, so the couplings differ only in the
gradient that reaches A's messages.  One step (:func:`two_timescale_step`):

1. A runs over the chunk block by block (its state detached at every tick: truncated BPTT over
   blocks of ``T`` steps) and sends its hidden state at each tick to B as the message;
2. B runs over the chunk's ``n = truncation_b`` messages from its carried state (detached at the
   chunk start: truncated BPTT over ``n`` ticks, so B's loss at the chunk's last tick reaches all
   ``n`` messages and its loss at the first tick only the first one);
3. ``L = L_A + L_B`` (each the mean cross-entropy over the chunk's ticks and streams, ticks without
   a target counting 0) in one backward.  What reaches A from ``L_B`` is the coupling:
   ``none`` nothing, ``dni`` the synthesizer's ``M(message)`` (and the synthesizer regresses on the
   gradient ``L_B`` delivers at the message), ``bptt`` that gradient itself.

With ``dni`` what A receives from B depends on A's own message only, so A could update at every
tick without waiting for B (the point of sec. 3.2); here every coupling keeps the same update
schedule, so that the runs differ in nothing but that gradient.

Errors (percent of wrong counts) are measured on a held-out stream: a fixed stream (its own seed
and, with images, the MNIST test images), ``data.eval_ticks`` ticks of ``data.eval_batch_size``
streams from zero states, in eval mode; B's first ``T - 1`` ticks have no target (fewer than
``T*T`` digits seen).  ``baseline_a`` / ``baseline_b`` are the errors of always answering the most
frequent count on that stream.

TensorBoard tags (x: optimizer step): ``error/A``, ``error/B`` (held-out), ``error_train/A``,
``error_train/B`` (the training ticks of the logging interval), ``loss/A``, ``loss/B``,
``dni/message/sg_loss`` (the synthesizer's regression loss), ``dni/message/cosine`` and
``dni/message/mse_true`` (the synthetic gradient against the gradient B's backward pass delivers in
the same chunk, i.e. what ``bptt`` would pass; an extra forward/backward on logging steps),
``perf/digits_per_sec``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from sgrun.build import build_digit_streams, build_model, placement_of
from sgrun.data.digits import DigitBlock, DigitCountTask
from sgrun.dni import gradient_quality
from sgrun.models.hierarchical import HierarchicalRNN
from sgrun.tasks.base import Task

log = logging.getLogger("sgrun")

EVAL_CHUNK_TICKS = 32   # ticks per forward call when evaluating (state carried, no gradient)


# --------------------------------------------------------------------------- losses and counts


def tick_targets(block: DigitBlock, T: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows of ``block`` (which starts at a block boundary) at B's ticks:
    ``y_a, y_b, mask_a, mask_b``, each ``[n, B]``."""
    ticks = slice(T - 1, None, T)
    return block.y_a[ticks], block.y_b[ticks], block.mask_a[ticks], block.mask_b[ticks]


def count_loss(logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """``[n, B, C]`` logits, ``[n, B]`` counts and mask -> mean cross-entropy over all ``n * B``
    ticks (ticks without a target count 0: the same normaliser for every chunk)."""
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                     reduction="none").view_as(y)
    return (ce * mask).sum() / mask.numel()


def wrong_counts(logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Number of ticks with a target where the arg-max count is wrong (a tensor, no sync)."""
    return ((logits.argmax(-1) != y).float() * mask).sum()


# --------------------------------------------------------------------------- one step


@dataclass
class Step:
    """What :func:`two_timescale_step` leaves behind (all detached)."""

    loss_a: Tensor
    loss_b: Tensor
    wrong_a: Tensor
    wrong_b: Tensor
    state: tuple[Tensor, Tensor]  # carried to the next chunk


def chunk_losses(model: HierarchicalRNN, x: Tensor, y_a: Tensor, y_b: Tensor, mask_a: Tensor,
                 mask_b: Tensor, state: tuple[Tensor, Tensor]):
    """Forward of one chunk from the carried (detached) ``state``; returns
    ``(L_A, L_B, output)``."""
    out = model(x, (state[0].detach(), state[1].detach()))  # logits [n, B, C]
    return count_loss(out.logits_a, y_a, mask_a), count_loss(out.logits_b, y_b, mask_b), out


def two_timescale_step(model: HierarchicalRNN, x: Tensor, y_a: Tensor, y_b: Tensor, mask_a: Tensor,
                       mask_b: Tensor, state: tuple[Tensor, Tensor]) -> Step:
    """Forward and backward of one chunk (see the module docstring); the caller zeroes the gradients
    before and steps the optimizer after."""
    loss_a, loss_b, out = chunk_losses(model, x, y_a, y_b, mask_a, mask_b, state)
    # One backward trains A, B and the synthesizer; the coupling (inside the model) decides what of
    # dL_B/d(message) A receives: nothing, the synthetic gradient, or the true one.
    (loss_a + loss_b).backward()
    return Step(loss_a.detach(), loss_b.detach(), wrong_counts(out.logits_a.detach(), y_a, mask_a),
                wrong_counts(out.logits_b.detach(), y_b, mask_b),
                (out.state_a.detach(), out.state_b.detach()))


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: HierarchicalRNN, task: DigitCountTask, ticks: int,
             device: torch.device) -> dict[str, float]:
    """Errors (%) of A and B on ``ticks`` ticks of a fresh ``task`` from zero states, and the errors
    of always answering the most frequent count (``baseline_a``, ``baseline_b``)."""
    was_training = model.training
    model.eval()
    T = model.T
    state = model.initial_state(task.batch_size, device)
    wrong = {"a": 0.0, "b": 0.0}
    seen = {"a": 0.0, "b": 0.0}
    hist = {"a": torch.zeros(task.num_classes_a), "b": torch.zeros(task.num_classes_b)}
    for start in range(0, ticks, EVAL_CHUNK_TICKS):
        block = task.next_block(min(EVAL_CHUNK_TICKS, ticks - start) * T)
        y_a, y_b, mask_a, mask_b = (v.to(device) for v in tick_targets(block, T))
        out = model(block.x.to(device), state)
        state = (out.state_a, out.state_b)
        for net, logits, y, mask in (("a", out.logits_a, y_a, mask_a),
                                     ("b", out.logits_b, y_b, mask_b)):
            wrong[net] += float(wrong_counts(logits, y, mask))
            seen[net] += float(mask.sum())
            hist[net] += torch.bincount(y[mask > 0].cpu(), minlength=hist[net].numel()).float()
    model.train(was_training)
    result = {}
    for net in ("a", "b"):
        n = max(seen[net], 1.0)
        result[f"error_{net}"] = 100.0 * wrong[net] / n
        result[f"baseline_{net}"] = 100.0 * (1.0 - float(hist[net].max()) / n)
    return result



class TwoTimescale(Task):
    """A and B on the digit-counting streams, coupled by ``model.coupling``; ``primary`` is B's
    held-out error."""

    unit = "digits"
    primary = "primary"

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        m = cfg.model
        self.device = device
        self.T, ticks = int(m.T), int(m.truncation_b)
        self.chunk = ticks * self.T  # digits per stream per optimizer step
        self.batch_size = int(cfg.train.batch_size)
        self.coupling, self.mode = m.coupling, cfg.data.mode
        self.stream, self.held_out = build_digit_streams(cfg, self.batch_size, self.T)
        placement = placement_of(cfg.dni) if m.coupling == "dni" else None
        if m.coupling != "dni" and cfg.dni.get("cuts"):
            log.info("model.coupling=%s: the dni group (%s) is not used", m.coupling, cfg.dni.name)
        self.model: HierarchicalRNN = build_model(
            m, consumed=("truncation_b",), input_size=self.stream.input_size,
            classes_a=self.stream.num_classes_a, classes_b=self.stream.num_classes_b,
            placement=placement).to(device)
        self.sg_quality = (bool(cfg.train.get("sg_quality", True))
                           and self.model.interface is not None)
        self.eval_ticks = int(cfg.data.eval_ticks)
        self.state = self.model.initial_state(self.batch_size, device)
        self.history: list[tuple] = []
        self.last: dict[str, float] = {}

    def units_per_step(self) -> int:
        return self.chunk * self.batch_size

    def parameter_groups(self):
        synth = self.model.synthesizer_parameters() if self.model.interface is not None else []
        return self.model.a_parameters() + self.model.b_parameters(), synth

    def describe(self) -> str:
        m = self.model
        return (f"digit streams ({self.mode}), T={self.T}, coupling {self.coupling}, "
                f"A {m.hidden_a} / B {m.hidden_b} units, {self.chunk} digits per step, "
                f"batch {self.batch_size}, device {self.device}")

    def next_batch(self):
        block = self.stream.next_block(self.chunk)
        x = block.x.to(self.device)  # [chunk, B, input]
        # y_a, y_b, mask_a, mask_b [ticks, B]
        return (x, *(v.to(self.device) for v in tick_targets(block, self.T)))

    def train_step(self, batch) -> dict[str, Tensor]:
        x, y_a, y_b, mask_a, mask_b = batch
        result = two_timescale_step(self.model, x, y_a, y_b, mask_a, mask_b, self.state)
        self.state = result.state
        values = {"loss/A": result.loss_a, "loss/B": result.loss_b, "count/wrong_a": result.wrong_a,
                  "count/wrong_b": result.wrong_b, "count/seen_a": mask_a.sum(),
                  "count/seen_b": mask_b.sum()}
        if self.model.interface is not None:
            record = self.model.interface.record.sg_loss
            values["dni/message/sg_loss"] = (record if record is not None
                                             else torch.zeros((), device=self.device))
        return values

    def log_values(self, sums: dict[str, float], count: int) -> dict[str, float]:
        out = {tag: v / count for tag, v in sums.items() if not tag.startswith("count/")}
        for net in ("a", "b"):
            if sums[f"count/seen_{net}"] > 0:
                out[f"error_train/{net.upper()}"] = (100.0 * sums[f"count/wrong_{net}"]
                                                     / sums[f"count/seen_{net}"])
        return out

    def diagnostics(self, batch) -> dict[str, float]:
        if not self.sg_quality:
            return {}
        # the synthetic gradient against B's true gradient at the messages: an extra
        # forward/backward
        args = (*batch, self.state)
        quality = gradient_quality(self.model, lambda: chunk_losses(self.model, *args)[1])
        return {f"dni/{name}/{key}": q[src] for name, q in quality.items()
                for key, src in (("cosine", "cosine"), ("mse_true", "mse"))}

    def evaluate(self, step: int) -> dict[str, float]:
        self.last = evaluate(self.model, self.held_out(), self.eval_ticks, self.device)
        self.history.append((step, step * self.chunk, self.last["error_a"], self.last["error_b"]))
        log.info("step %d  held-out error A %.2f%%  B %.2f%%", step, self.last["error_a"],
                 self.last["error_b"])
        return {"error/A": self.last["error_a"], "error/B": self.last["error_b"]}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "stream": self.stream.state_dict(),
                "state": self.state, "history": list(self.history), "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.stream.load_state_dict(state["stream"])
        self.state = tuple(s.to(self.device) for s in state["state"])
        self.history, self.last = [tuple(h) for h in state["history"]], dict(state["last"])

    def final_metrics(self, steps: int) -> dict:
        last = self.last
        return {"error_a": last["error_a"], "error_b": last["error_b"], "primary": last["error_b"],
                "baseline_a": last["baseline_a"], "baseline_b": last["baseline_b"],
                "best_error_b": min(h[3] for h in self.history), "steps": steps,
                "digits_per_stream": steps * self.chunk, "history": self.history}

    @staticmethod
    def headline(metrics: dict) -> str:
        return (f"held-out error of B {metrics['error_b']:.2f} % (always the commonest count: "
                f"{metrics['baseline_b']:.2f} %), of A {metrics['error_a']:.2f} %")
