"""Two networks at two timescales (Jaderberg et al. 2017, sec. 3.2): network A counts odd digits, network B
counts 3s from A's messages, coupled by nothing, by a DNI, or by backprop.

``B`` parallel digit streams (:class:`~sgrun.data.digits.DigitCountTask`) are read ``model.truncation_b``
ticks at a time, i.e. ``truncation_b * T`` digits; each such chunk is one optimizer step for A, B and
the synthesizer, in every coupling, so the couplings differ only in the gradient that reaches A's
messages.  One step (:func:`two_timescale_step`):

1. A runs over the chunk block by block (its state detached at every tick: truncated BPTT over
   blocks of ``T`` steps) and sends its hidden state at each tick to B as the message;
2. B runs over the chunk's ``n = truncation_b`` messages from its carried state (detached at the chunk
   start: truncated BPTT over ``n`` ticks, so B's loss at the chunk's last tick reaches all ``n``
   messages and its loss at the first tick only the first one);
3. ``L = L_A + L_B`` (each the mean cross-entropy over the chunk's ticks and streams, ticks without a
   target counting 0) in one backward.  What reaches A from ``L_B`` is the coupling:
   ``none`` nothing, ``dni`` the synthesizer's ``M(message)`` (and the synthesizer regresses on the
   gradient ``L_B`` delivers at the message), ``bptt`` that gradient itself.

With ``dni`` what A receives from B depends on A's own message only, so A could update at every tick
without waiting for B (the point of sec. 3.2); here every coupling keeps the same update schedule, so
that the runs differ in nothing but that gradient.

Errors (percent of wrong counts) are measured on a held-out stream: a fixed stream (its own seed and,
with images, the MNIST test images), ``data.eval_ticks`` ticks of ``data.eval_batch_size`` streams from
zero states, in eval mode; B's first ``T - 1`` ticks have no target (fewer than ``T*T`` digits seen).
``baseline_a`` / ``baseline_b`` are the errors of always answering the most frequent count on that
stream.

TensorBoard tags (x: optimizer step): ``error/A``, ``error/B`` (held-out), ``error_train/A``,
``error_train/B`` (the training ticks of the logging interval), ``loss/A``, ``loss/B``,
``dni/message/sg_loss`` (the synthesizer's regression loss), ``dni/message/cosine`` and
``dni/message/mse_true`` (the synthetic gradient against the gradient B's backward pass delivers in
the same chunk, i.e. what ``bptt`` would pass; an extra forward/backward on logging steps),
``perf/digits_per_sec``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from sgrun.build import placement_of
from sgrun.data.digits import DigitBlock, DigitCountTask
from sgrun.data.images import load_images
from sgrun.dni import gradient_quality
from sgrun.errors import ConfigError, SgrunError
from sgrun.models.hierarchical import HierarchicalRNN
from sgrun.train import Session, budget

log = logging.getLogger("sgrun")

DIGIT_DATA = ("digits", "digits_mnist")
EVAL_SEED = 1_000_003   # the held-out stream's seed: the same stream for every run and training seed
EVAL_CHUNK_TICKS = 32   # ticks per forward call when evaluating (state carried, no gradient)


# --------------------------------------------------------------------------- losses and counts


def tick_targets(block: DigitBlock, T: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The rows of ``block`` (which starts at a block boundary) at B's ticks: ``y_a, y_b, mask_a, mask_b``,
    each ``[n, B]``."""
    ticks = slice(T - 1, None, T)
    return block.y_a[ticks], block.y_b[ticks], block.mask_a[ticks], block.mask_b[ticks]


def count_loss(logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """``[n, B, C]`` logits, ``[n, B]`` counts and mask -> mean cross-entropy over all ``n * B`` ticks
    (ticks without a target count 0: the same normaliser for every chunk)."""
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
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


def chunk_losses(model: HierarchicalRNN, x: Tensor, y_a: Tensor, y_b: Tensor, mask_a: Tensor, mask_b: Tensor,
                 state: tuple[Tensor, Tensor]):
    """Forward of one chunk from the carried (detached) ``state``; returns ``(L_A, L_B, output)``."""
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
                wrong_counts(out.logits_b.detach(), y_b, mask_b), (out.state_a.detach(), out.state_b.detach()))


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: HierarchicalRNN, task: DigitCountTask, ticks: int, device: torch.device) -> dict[str, float]:
    """Errors (%) of A and B on ``ticks`` ticks of a fresh ``task`` from zero states, and the errors of
    always answering the most frequent count (``baseline_a``, ``baseline_b``)."""
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
        for net, logits, y, mask in (("a", out.logits_a, y_a, mask_a), ("b", out.logits_b, y_b, mask_b)):
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


# --------------------------------------------------------------------------- the loop


def make_streams(cfg: DictConfig, batch_size: int, T: int):
    """The training stream and a function returning the (always identical) held-out stream."""
    d = cfg.data
    if d.name not in DIGIT_DATA:
        raise ConfigError(f"model=hrnn trains on a digit stream, not data={d.name}: choose data=digits "
                          "(digit classes) or data=digits_mnist (MNIST images)")
    train_images = train_labels = test_images = test_labels = None
    if d.mode == "images":
        options = d.get("image_options")
        options = OmegaConf.to_container(options, resolve=True) if options else {}
        images = load_images(d.images, cfg.data_dir, download=bool(d.download), **options)
        train_images, train_labels, test_images, test_labels = images.train_x, images.train_y, images.test_x, images.test_y
    train = DigitCountTask(batch_size, T, d.mode, train_images, train_labels, seed=cfg.seed)
    eval_batch = int(d.eval_batch_size)

    def held_out() -> DigitCountTask:
        # with images, the held-out stream shows the test images: digits the networks never saw
        return DigitCountTask(eval_batch, T, d.mode, test_images, test_labels, seed=EVAL_SEED)

    return train, held_out


def train_two_timescale(cfg: DictConfig, session: Session) -> tuple[dict, HierarchicalRNN]:
    """Two LSTMs at two timescales on the digit-counting streams (paper sec. 3.2), coupled by
    ``model.coupling``.  Returns the final metrics (``primary`` = B's held-out error) and the model."""
    threads = torch.get_num_threads()
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    try:
        return _train(cfg, session)
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide: leave it as it was


def _train(cfg: DictConfig, session: Session) -> tuple[dict, HierarchicalRNN]:
    device, writer = session.device, session.writer
    t, m = cfg.train, cfg.model
    T, ticks = int(m.T), int(m.truncation_b)
    chunk = ticks * T  # digits per stream per optimizer step
    steps, lr, eval_every = budget(cfg)
    batch_size = int(t.batch_size)
    task, held_out = make_streams(cfg, batch_size, T)
    placement = placement_of(cfg.dni) if m.coupling == "dni" else None
    model = HierarchicalRNN(task.input_size, T, task.num_classes_a, task.num_classes_b, hidden_a=m.hidden_a,
                            hidden_b=m.hidden_b, coupling=m.coupling, clock=bool(m.clock),
                            placement=placement).to(device)
    groups = [{"params": model.a_parameters() + model.b_parameters(), "lr": lr}]
    if model.interface is not None:
        groups.append({"params": model.synthesizer_parameters(), "lr": lr * float(cfg.dni.lr_factor)})
    opt = torch.optim.Adam(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    milestones = sorted({max(1, int(round(f * steps))) for f in cfg.optim.decay_at})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.optim.gamma)
    measure_sg = bool(t.get("sg_quality", True)) and model.interface is not None
    eval_ticks = int(cfg.data.eval_ticks)

    state = model.initial_state(batch_size, device)
    history: list[tuple] = []
    sums = {name: torch.zeros((), device=device) for name in ("loss_a", "loss_b", "sg", "wrong_a", "wrong_b",
                                                               "seen_a", "seen_b")}
    first, tick_step, step = 1, 0, 0
    last: dict[str, float] = {}

    def loop_state() -> dict:
        if not all(math.isfinite(float(v)) for v in sums.values()):
            raise SgrunError(f"the training loss or the synthesizer loss became non-finite by step {step}: lower "
                             f"optim.lr (now {lr:.2g}) or dni.scale and run again; the last good checkpoint is kept")
        return {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "task": task.state_dict(), "state": state, "history": list(history),
                "sums": {n: v.clone() for n, v in sums.items()}, "tick_step": tick_step, "last": dict(last)}

    if session.resumed is not None:
        r = session.resumed
        model.load_state_dict(r["model"])
        opt.load_state_dict(r["opt"])
        sched.load_state_dict(r["sched"])
        task.load_state_dict(r["task"])
        state = tuple(s.to(device) for s in r["state"])
        history, tick_step, first, last = [tuple(h) for h in r["history"]], r["tick_step"], r["step"] + 1, r["last"]
        for n, v in r["sums"].items():
            sums[n].copy_(v)
    log.info("digit streams (%s), T=%d, coupling %s, A %d / B %d units, %d steps of %d digits, batch %d, "
             "lr %.2g, device %s", cfg.data.mode, T, m.coupling, m.hidden_a, m.hidden_b, steps, chunk, batch_size,
             lr, device)
    if m.coupling != "dni" and cfg.dni.get("cuts"):
        log.info("model.coupling=%s: the dni group (%s) is not used", m.coupling, cfg.dni.name)

    tick = time.time()
    model.train()
    bar = tqdm(total=steps, initial=first - 1, desc="train", unit="step", disable=None, dynamic_ncols=True)
    for step in range(first, steps + 1):
        block = task.next_block(chunk)
        x = block.x.to(device)  # [chunk, B, input]
        y_a, y_b, mask_a, mask_b = (v.to(device) for v in tick_targets(block, T))  # [ticks, B]
        logging_step = step % t.log_every == 0 or step == steps
        if logging_step and measure_sg:
            # the synthetic gradient against B's true gradient at the messages: an extra forward/backward
            batch = (x, y_a, y_b, mask_a, mask_b, state)
            quality = gradient_quality(model, lambda batch=batch: chunk_losses(model, *batch)[1])
            for name, q in quality.items():
                writer.scalars({f"dni/{name}/cosine": q["cosine"], f"dni/{name}/mse_true": q["mse"]}, step)

        opt.zero_grad(set_to_none=True)
        result = two_timescale_step(model, x, y_a, y_b, mask_a, mask_b, state)
        opt.step()
        sched.step()
        state = result.state
        sums["loss_a"] += result.loss_a
        sums["loss_b"] += result.loss_b
        sums["wrong_a"] += result.wrong_a
        sums["wrong_b"] += result.wrong_b
        sums["seen_a"] += mask_a.sum()
        sums["seen_b"] += mask_b.sum()
        if model.interface is not None and model.interface.record.sg_loss is not None:
            sums["sg"] += model.interface.record.sg_loss

        if logging_step:
            count = step - tick_step
            values = {n: float(v) for n, v in sums.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise SgrunError(f"the training loss or the synthesizer loss became non-finite by step {step}: "
                                 f"lower optim.lr (now {lr:.2g}) or dni.scale and run again")
            now = time.time()
            writer.scalars({"loss/A": values["loss_a"] / count, "loss/B": values["loss_b"] / count,
                            "perf/digits_per_sec": count * chunk * batch_size / max(now - tick, 1e-9)}, step)
            for net in ("a", "b"):
                if values[f"seen_{net}"] > 0:
                    writer.scalar(f"error_train/{net.upper()}", 100.0 * values[f"wrong_{net}"] / values[f"seen_{net}"],
                                  step)
            if model.interface is not None:
                writer.scalar("dni/message/sg_loss", values["sg"] / count, step)
            for v in sums.values():
                v.zero_()
            tick, tick_step = time.time(), step
            bar.set_postfix(loss_a=f"{values['loss_a'] / count:.3f}", loss_b=f"{values['loss_b'] / count:.3f}")

        if step % eval_every == 0 or step == steps:
            last = evaluate(model, held_out(), eval_ticks, device)
            writer.scalars({"error/A": last["error_a"], "error/B": last["error_b"]}, step)
            history.append((step, step * chunk, last["error_a"], last["error_b"]))
            log.info("step %d/%d  held-out error A %.2f%%  B %.2f%%", step, steps, last["error_a"], last["error_b"])
        bar.update(1)
        session.step_done(step, steps, loop_state)
    bar.close()

    metrics = {"error_a": last["error_a"], "error_b": last["error_b"], "primary": last["error_b"],
               "baseline_a": last["baseline_a"], "baseline_b": last["baseline_b"],
               "best_error_b": min(h[3] for h in history), "steps": steps, "digits_per_stream": steps * chunk,
               "history": history}
    return metrics, model


LOOPS = {"hrnn": train_two_timescale}
