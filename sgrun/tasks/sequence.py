"""Sequences with truncated BPTT, DNI or DNI + Aux: Copy, Repeat Copy and Penn Treebank
characters (Jaderberg et al. 2017, sec. 3.1, Table 1).

``B`` continuous streams (Copy / Repeat Copy episodes one after another, or Penn Treebank text) are
read ``model.k`` steps at a time; each block is one optimizer step (:func:`sgrun.dni.recurrent.
truncated_step`: the state is carried across blocks and detached at each boundary, where the
synthetic gradient stands in for the future).

Copy and Repeat Copy (:class:`~sgrun.data.copy_task.CopyTask`, with its curriculum) report the
largest N solved; Penn Treebank reports bits per character on validation (early stopping) and the
test BPC at the best validation point.

TensorBoard tags (x axis: training step unless said otherwise): ``loss/train`` (the real loss),
``perf/chars_per_sec``, ``curriculum/N``, ``curriculum/R``, ``curriculum/largest_solved``,
``curriculum/error`` (bits per output of the last curriculum window), ``by_samples/largest_solved``
(x axis: episodes completed, summed over streams, as in the paper's figures), ``bpc/valid``,
``bpc/test``, ``by_samples/bpc_valid`` (x axis: characters read), ``dni/state/sg_loss`` (the
bootstrapped regression loss), ``dni/state/cosine``, ``dni/state/cosine_target`` and
``dni/state/mse_true`` (:func:`~sgrun.dni.recurrent.future_gradient_quality`), ``aux/loss``.
"""

from __future__ import annotations

import logging
import math

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from sgrun.build import build_model, build_sequence_stream, placement_of
from sgrun.data.copy_task import bit_errors
from sgrun.data.ptb import bits_per_char, iterate_eval
from sgrun.data.tasks import Block, StreamTask
from sgrun.dni.recurrent import future_gradient_quality, truncated_step
from sgrun.errors import ConfigError
from sgrun.tasks.base import Task

log = logging.getLogger("sgrun")

# Defaults of the recurrent keys for a config that does not set them (the Table 1 presets do).
SG_HORIZON = 40        # steps of future losses in the "true" gradient of dni/state/cosine
EVAL_BATCH = 64        # PTB evaluation: parallel streams
EVAL_BLOCK = 100       # PTB evaluation: steps per forward call (state carried, no gradient)


def copy_step_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``[k, B, O]`` logits and 0/1 targets -> ``[k, B]``: binary cross-entropy summed over the
    bits."""
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(-1)


def lm_step_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``[k, B, V]`` logits and ``[k, B]`` next-symbol ids -> ``[k, B]``: cross-entropy in nats."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                       reduction="none").view_as(y)


def peek(task: StreamTask, steps: int) -> Block:
    """The next ``steps`` steps of every stream, leaving the task where it was."""
    saved = task.state_dict()
    block = task.next_block(steps)
    task.load_state_dict(saved)
    return block


def read_block(task: StreamTask, k: int, look_ahead: bool = False) -> tuple[Block, Tensor | None]:
    """The next ``k`` steps of the training stream and, with ``look_ahead``, the inputs ``x`` of the
    ``k`` steps after them (``[k, B, ...]``, the DNI + Aux look-ahead), else ``None``.

    The look-ahead is a :func:`peek` taken *before* the block is read, so the stream advances by
    ``k`` steps exactly as without it (and a copy task's block is still open for ``report``).  At
    the moment a copy-task curriculum advances, episodes that start in the next block are generated
    at the new level, so the look-ahead saw the old level there: a prediction target, not the data
    trained on.
    """
    ahead = peek(task, 2 * k).x[k:] if look_ahead else None
    return task.next_block(k), ahead


@torch.no_grad()
def evaluate_bpc(model: nn.Module, ids: Tensor, batch_size: int, block: int,
                 device: torch.device) -> float:
    """Bits per character of ``ids`` read as ``batch_size`` contiguous streams (state carried, from
    zero)."""
    batch_size = max(1, min(batch_size, len(ids) // 2))
    was_training = model.training
    model.eval()
    state = model.initial_state(batch_size, device)
    nll, count = 0.0, 0
    for b in iterate_eval(ids, batch_size, block):
        out = model(b.x.to(device), state)
        nll += float(lm_step_loss(out.logits, b.y.to(device)).sum())
        count += b.y.numel()
        state = out.state
    model.train(was_training)
    return bits_per_char(nll, count)


def _to(block: Block, device: torch.device) -> Block:
    return Block(x=block.x.to(device), y=block.y.to(device), mask=block.mask.to(device))


class Sequence(Task):
    """One block of ``model.k`` steps per optimizer step, the LSTM state carried across blocks."""

    unit = "chars"
    diagnose_after_step = True
    primary = "primary"

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        t = cfg.train
        self.device = device
        self.k = k = int(cfg.model.k)
        self.batch_size = int(t.batch_size)
        self.name = cfg.data.name
        self.stream, self.chars = build_sequence_stream(cfg, self.batch_size)
        self.is_copy = self.chars is None
        self.evaluates = not self.is_copy  # the copy tasks' curriculum is their evaluation
        self.step_loss = copy_step_loss if self.is_copy else lm_step_loss
        self.aux_weight = float(cfg.dni.get("aux_weight", 0.0) or 0.0)
        self.model = build_model(cfg.model, consumed=("k",), input_size=self.stream.input_size,
                                 output_size=self.stream.output_size, token_input=not self.is_copy,
                                 placement=placement_of(cfg.dni),
                                 aux=self.aux_weight > 0).to(device)
        self.horizon = -(-int(t.get("sg_horizon", SG_HORIZON)) // k) * k  # whole blocks
        self.sg_quality = bool(t.get("sg_quality", True)) and self.model.synthesizer is not None
        self.eval_batch = int(cfg.data.get("eval_batch_size", EVAL_BATCH))
        self.eval_block = int(cfg.data.get("eval_block", EVAL_BLOCK))
        self.eval_chars = cfg.data.get("eval_chars") or None  # characters of valid / test (PTB)
        self.patience = t.get("patience")
        # the copy tasks stop once their curriculum has not advanced for this many episodes (a
        # plateau); train.steps stays the hard cap
        self.plateau = t.get("plateau_samples")
        if self.plateau is not None and not self.is_copy:
            raise ConfigError("train.plateau_samples stops a copy task's curriculum; "
                              "PTB stops early on validation BPC: use train.patience")
        self.state = self.model.initial_state(self.batch_size, device)
        self.history: list[tuple] = []
        self.best = {"bpc": math.inf, "step": 0, "params": None, "stale": 0}
        self.stopped_early = False

    def units_per_step(self) -> int:
        return self.k * self.batch_size

    def parameter_groups(self):
        synth = (list(self.model.synthesizer.parameters()) if self.model.synthesizer is not None
                 else [])
        return self.model.core_parameters(), synth

    def describe(self) -> str:
        return (f"{self.name}: LSTM {self.model.hidden}, k={self.k}, batch {self.batch_size}, "
                f"device {self.device}")

    def next_batch(self):
        block, ahead = read_block(self.stream, self.k, look_ahead=self.model.aux_head is not None)
        x, y, mask = (block.x.to(self.device), block.y.to(self.device),
                      block.mask.to(self.device))  # [k, B, ...]
        return x, y, mask, None if ahead is None else ahead.to(self.device)

    def train_step(self, batch) -> dict[str, Tensor]:
        x, y, mask, x_next = batch
        result = truncated_step(self.model, x, y, mask, self.state, self.step_loss, self.aux_weight,
                                x_next)
        self.state = result.state  # carried to the next block, detached
        values = {"loss/train": result.loss}
        if result.sg_loss is not None:
            values["dni/state/sg_loss"] = result.sg_loss
        if result.aux_loss is not None:
            values["aux/loss"] = result.aux_loss
        task = self.stream
        if self.is_copy and task.report(bit_errors(result.logits, y, mask)):
            n, r = task.solved
            self.history.append((self.step, task.samples_seen, n, r))
            self.writer.scalar("by_samples/largest_solved", n, task.samples_seen)
            log.info("step %d: solved N=%d R=%d after %d episodes", self.step, n, r,
                     task.samples_seen)
        return values

    def diagnostics(self, batch) -> dict[str, float]:
        out: dict[str, float] = {}
        task = self.stream
        if self.is_copy:
            out.update({"curriculum/N": task.n, "curriculum/R": task.repeats,
                        "curriculum/largest_solved": task.level})
            if task.last_error is not None:
                out["curriculum/error"] = task.last_error
        if self.sg_quality:
            future = _to(peek(task, self.horizon), self.device)
            quality = future_gradient_quality(self.model, self.state, future, self.k,
                                              self.step_loss)
            out.update({f"dni/state/{name}": v for name, v in quality.items()})
        return out

    def progress(self) -> dict:
        return {"N": self.stream.n} if self.is_copy else {}

    def evaluate(self, step: int) -> dict[str, float]:
        # Jaderberg et al. 2017, sec. 3.1: early stopping on validation BPC; keep the best
        # parameters
        bpc = evaluate_bpc(self.model, self.chars.valid[:self.eval_chars], self.eval_batch,
                           self.eval_block, self.device)
        self.writer.scalar("by_samples/bpc_valid", bpc, self.stream.samples_seen)
        self.history.append((step, self.stream.samples_seen, bpc))
        log.info("step %d  valid BPC %.4f", step, bpc)
        if bpc < self.best["bpc"]:
            self.best = {"bpc": bpc, "step": step, "stale": 0,
                         "params": {n: v.detach().clone()
                                    for n, v in self.model.state_dict().items()}}
        else:
            self.best["stale"] += 1
            self.stopped_early = bool(self.patience) and self.best["stale"] >= self.patience
            if self.stopped_early:
                log.info("step %d: no better validation BPC in %d evaluations: stopping early",
                         step, self.patience)
        return {"bpc/valid": bpc}

    def last_growth(self) -> int:
        """Episodes seen when the curriculum last advanced (N, or R in Repeat Copy; 0 before the
        first solved level)."""
        return self.history[-1][1] if self.history else 0

    def plateau_reached(self) -> bool:
        return (self.plateau is not None
                and self.stream.samples_seen - self.last_growth() >= self.plateau)

    def should_stop(self) -> bool:
        if self.is_copy and self.plateau_reached():
            if not self.stopped_early:
                log.info("step %d: the curriculum (largest N %d) has not advanced in %d episodes "
                         "(train.plateau_samples): stopping", self.step, self.stream.level,
                         self.stream.samples_seen - self.last_growth())
            self.stopped_early = True
        return self.stopped_early

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "stream": self.stream.state_dict(),
                "state": self.state, "history": list(self.history), "best": dict(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.stream.load_state_dict(state["stream"])
        self.state = state["state"].to(self.device)
        self.history, self.best = [tuple(h) for h in state["history"]], dict(state["best"])

    def final_metrics(self, steps: int) -> dict:
        task = self.stream
        metrics: dict = {"steps": steps, "samples_seen": task.samples_seen, "k": self.k,
                         "history": self.history}
        if self.is_copy:
            # the time dependency of each solved level: N * R output steps after reading N items,
            # in an episode of 2N + 1 (Copy) or N + 1 + N * R + 1 steps (Repeat Copy)
            solved = [(h[2], h[3]) for h in self.history]
            metrics.update({"largest_n": task.level, "largest_r": (task.solved or (0, 0))[1],
                            "largest_nr": max((n * r for n, r in solved), default=0),
                            "largest_length": max((n + 1 + n * r + (1 if task.repeat else 0)
                                                   for n, r in solved), default=0),
                            "samples_at_largest": self.last_growth(),
                            "primary": -float(task.level)})
            if self.plateau is not None:
                metrics["plateau_reached"] = self.plateau_reached()
            return metrics
        self.model.load_state_dict(self.best["params"])
        bpc_test = evaluate_bpc(self.model, self.chars.test[:self.eval_chars], self.eval_batch,
                                self.eval_block, self.device)
        self.writer.scalar("bpc/test", bpc_test, self.best["step"])
        log.info("test BPC %.4f at the best validation point (step %d, valid %.4f)", bpc_test,
                 self.best["step"], self.best["bpc"])
        metrics.update({"bpc_test": bpc_test, "bpc_valid_best": self.best["bpc"],
                        "best_step": self.best["step"], "primary": bpc_test})
        return metrics

    @staticmethod
    def headline(metrics: dict) -> str:
        if "largest_n" in metrics:
            r = f", R {metrics['largest_r']}" if metrics.get("largest_r", 1) > 1 else ""
            return f"largest N solved {metrics['largest_n']}{r}"
        return f"test BPC {metrics['bpc_test']:.3f} (best valid {metrics['bpc_valid_best']:.3f})"
