"""Recurrent loops (Jaderberg et al. 2017, sec. 3.1): truncated BPTT with a synthetic gradient at every block end.

``B`` continuous streams (Copy / Repeat Copy episodes one after another, or Penn Treebank text) are
read ``k`` steps at a time; each block is one optimizer step.  The LSTM state ``s = [h, c]`` is
carried from block to block and detached at every boundary, so no true gradient crosses it.

One block, from the carried state ``s_0`` to the block end ``s_k`` (:func:`truncated_step`):

1. run the ``k`` steps; ``L`` is the block's real loss (mean over its ``k * B`` steps);
2. ``sg_k = M(s_k)``: the synthesizer's prediction of the gradient of all future losses w.r.t. ``s_k``;
3. one backward of ``L`` with ``scale * sg_k`` injected at ``s_k`` (``torch.autograd.backward((L, s_k),
   (None, scale * sg_k / B))``): the core gets the in-block gradient plus the synthetic one, and the
   gradient that arrives at the block start is ``delta_0 = dL/ds_0 + (ds_k/ds_0)^T scale sg_k / B``;
4. the synthesizer regresses its prediction at the block start, ``M(s_0)``, on ``B * delta_0``.  ``s_0`` is
   the previous block's end state, so this is the prediction injected at the end of the previous block
   (recomputed with the current weights), regressed on the gradient that has now arrived: the
   bootstrapped, TD-like target of sec. 3.1;
5. DNI + Aux: an extra head ``A`` reads the block-end state ``s_k`` and predicts the synthetic gradient
   ``k`` steps further on, at the end of the *next* block: its target is ``M(s_2k)``, where ``s_2k`` comes
   from running the next block's inputs forward from ``s_k`` under ``torch.no_grad()`` with the current
   weights (a look-ahead: :func:`aux_target`; the loop reads those inputs with :func:`read_block`, which
   leaves the training stream where it was).  The target is detached; the loss
   ``aux_weight * mean_i ||A(s_k)_i - M(s_2k)_i||^2`` (per-stream units, as the synthesizer's) is
   backpropagated into the head and, through ``s_k``, the core, after ``delta_start`` is read, so it is
   no part of the synthesizer's target.

Units.  Block losses are means over the batch, so the gradient w.r.t. one stream's state is ``1/B`` of
that stream's own; as in :mod:`sgrun.dni.interface`, synthesizers predict the per-stream gradient
``B * dL/ds`` (their targets do not shrink with the batch) and the injection divides by ``B`` again.
Because the target includes the *scaled* injection, the synthesizer learns the future gradient with
each further block discounted by ``scale`` (0.1 by default): ``M(s) ~ g_next + scale * J^T M(s')``.

Sequence tasks: ``data=copy`` and ``data=repeat_copy`` (:class:`~sgrun.data.copy_task.CopyTask`, with
its curriculum; metric: the largest N solved) and ``data=ptb`` (bits per character on validation,
early stopping, test BPC at the best validation point).

TensorBoard tags (x axis: training step unless said otherwise): ``loss/train`` (the real loss, mean
over the logging interval), ``perf/chars_per_sec``, ``curriculum/N``, ``curriculum/R``,
``curriculum/largest_solved``, ``curriculum/error`` (bits per output of the last curriculum window),
``by_samples/largest_solved`` (x axis: episodes completed, summed over streams, as in the paper's
figures), ``bpc/valid``, ``bpc/test``, ``by_samples/bpc_valid`` (x axis: characters read),
``dni/state/sg_loss`` (the bootstrapped regression loss), ``dni/state/cosine`` and
``dni/state/cosine_target`` (see :func:`future_gradient_quality`), ``dni/state/mse_true``, ``aux/loss``.
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
from sgrun.data.copy_task import CopyTask, bit_errors
from sgrun.data.ptb import PTBStream, bits_per_char, iterate_eval, load_ptb_chars
from sgrun.data.tasks import Block, StreamTask
from sgrun.dni import preserved_batchnorm
from sgrun.errors import ConfigError, SgrunError
from sgrun.models.rnn import RecurrentNet
from sgrun.train import Session, budget

log = logging.getLogger("sgrun")

COPY_TASKS = ("copy", "repeat_copy")
SEQUENCE_TASKS = (*COPY_TASKS, "ptb")

# Defaults of the recurrent keys for a config that does not set them (the Table 1 presets do).
SG_HORIZON = 40        # steps of future losses in the "true" gradient of dni/state/cosine
SG_STREAMS = 64        # streams used for that measurement
EVAL_BATCH = 64        # PTB evaluation: parallel streams
EVAL_BLOCK = 100       # PTB evaluation: steps per forward call (state carried, no gradient)


# --------------------------------------------------------------------------- losses


def copy_step_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``[k, B, O]`` logits and 0/1 targets -> ``[k, B]``: binary cross-entropy summed over the bits."""
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(-1)


def lm_step_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``[k, B, V]`` logits and ``[k, B]`` next-symbol ids -> ``[k, B]``: cross-entropy in nats."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def block_loss(per_step: Tensor, mask: Tensor) -> Tensor:
    """Mean over all ``k * B`` steps (steps without a target count as 0): the same normaliser for
    every block, so the sum of block losses is one objective whose future gradient is well defined."""
    return (per_step * mask).sum() / mask.numel()


# --------------------------------------------------------------------------- one block


@dataclass
class Step:
    """What :func:`truncated_step` leaves behind (all detached)."""

    loss: Tensor                 # the block's real loss, without the injected gradient
    state: Tensor                # [B, 2H] the block-end state: the next block starts from it
    logits: Tensor               # [k, B, O]
    delta_start: Tensor | None   # [B, 2H] per-stream gradient that arrived at the block start
    sg_loss: Tensor | None       # the synthesizer's regression loss
    aux_loss: Tensor | None      # DNI + Aux regression loss (before aux_weight)


@torch.no_grad()
def aux_target(model: RecurrentNet, end_state: Tensor, x_next: Tensor) -> Tensor:
    """DNI + Aux target: ``M(s_2k)``, the synthesizer's output at the end of the next block.

    ``x_next`` (``[k, B, ...]``) are the next block's inputs; they are run forward from the block-end
    state ``end_state`` (``s_k``) with the current weights, without gradient, and the synthesizer is
    applied to the state they end in.  Returns ``[B, 2H]``, detached, per-stream units.  BatchNorm
    buffers (a synthesizer with ``batchnorm: true``) are left as they were.
    """
    with preserved_batchnorm(model):
        ahead = model(x_next, end_state.detach()).state  # s_2k [B, 2H]
        return model.synthesizer(ahead)


def truncated_step(model: RecurrentNet, x: Tensor, y: Tensor, mask: Tensor, state: Tensor, step_loss,
                   aux_weight: float = 0.0, x_next: Tensor | None = None) -> Step:
    """Forward and backward of one block (see the module docstring); the caller zeroes the gradients
    before and steps the optimizer after.  ``x_next``: the next block's inputs, needed (only) by a
    model with the DNI + Aux head."""
    n = state.shape[0]
    synth = model.synthesizer
    if model.aux_head is not None and x_next is None:
        raise ValueError("DNI + Aux needs the next block's inputs: pass x_next to truncated_step")
    # [B, 2H] a leaf, detached from the previous block; with DNI its .grad is what arrives at the block start
    s0 = state.detach().requires_grad_(synth is not None)
    out = model(x, s0)  # logits [k, B, O], state [B, 2H]
    loss = block_loss(step_loss(out.logits, y), mask)
    if synth is None:
        loss.backward()  # plain truncated BPTT: nothing crosses the block end
        return Step(loss.detach(), out.state.detach(), out.logits.detach(), None, None, None)

    # Jaderberg et al. 2017, sec. 3.1: the synthetic gradient of all future losses w.r.t. the block end
    with torch.no_grad():
        sg_end = synth(out.state)  # [B, 2H], per-stream units
    injected = sg_end * (model.scale / n) if model.mode == "synthetic" else torch.zeros_like(sg_end)
    aux_loss = None
    if model.aux_head is not None:
        # DNI + Aux (sec. 3.1): from the block end s_k, predict the synthetic gradient M(s_2k) that the
        # synthesizer will give at the end of the next block, k steps later
        target = aux_target(model, out.state, x_next)
        aux_loss = (model.aux_head(out.state) - target).pow(2).sum(1).mean()

    # The real loss plus the injected future gradient, in one backward; the reported loss stays `loss`.
    torch.autograd.backward((loss, out.state), (None, injected), retain_graph=aux_loss is not None)
    delta_start = s0.grad * n  # [B, 2H] in-block gradient + the injection pulled back through the block
    if aux_loss is not None:
        (aux_weight * aux_loss).backward()  # after delta_start is read: the aux gradient is not a target

    # Bootstrapped target: the prediction for this state (made at the previous block's end) is
    # regressed on the gradient that has now arrived at it.
    sg_loss = (synth(s0) - delta_start).pow(2).sum(1).mean()
    sg_loss.backward()
    return Step(loss.detach(), out.state.detach(), out.logits.detach(), delta_start,
                sg_loss.detach(), None if aux_loss is None else aux_loss.detach())


# --------------------------------------------------------------------------- diagnostics and evaluation


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
    ``k`` steps exactly as without it (and a copy task's block is still open for ``report``).  At the
    moment a copy-task curriculum advances, episodes that start in the next block are generated at the
    new level, so the look-ahead saw the old level there: a prediction target, not the data trained on.
    """
    ahead = peek(task, 2 * k).x[k:] if look_ahead else None
    return task.next_block(k), ahead


def future_gradient_quality(model: RecurrentNet, state: Tensor, future: Block, k: int, step_loss,
                            streams: int = SG_STREAMS) -> dict[str, float]:
    """How well ``M(s)`` matches the true gradient of the future losses w.r.t. the block-end state ``s``.

    ``future`` holds the next ``horizon`` steps (a whole number of blocks).  A copy of the next
    blocks is run from ``s`` (on the first ``streams`` streams) and their losses, each normalised as
    in training, are backpropagated into ``s`` over the whole horizon, with no truncation:

    * ``cosine``: per-stream cosine between ``M(s)`` and the gradient of the undiscounted sum of the
      future block losses (the true future gradient, cut at the horizon), averaged over streams;
    * ``cosine_target``: the same against the sum with block ``j`` ahead weighted by ``scale**j``,
      which is what the bootstrapped target converges to (see the module docstring);
    * ``mse_true``: the synthesizer loss against the true rather than the bootstrapped target.

    The horizon is ``train.sg_horizon`` steps (40 by default) rounded up to whole blocks.  The
    comparison is with one realisation of the future (inputs the synthesizer cannot know yet), so
    even a perfect predictor of the *expected* future gradient scores a cosine below 1.
    """
    m = min(streams, state.shape[0])
    s = state[:m].detach().requires_grad_(True)  # [m, 2H]
    with preserved_batchnorm(model):
        out = model(future.x[:, :m], s)
        per_step = step_loss(out.logits, future.y[:, :m]) * future.mask[:, :m]  # [horizon, m]
        losses = [b.sum() / b.numel() for b in per_step.split(k)]  # block losses, as in training
        true = torch.autograd.grad(sum(losses), s, retain_graph=True)[0] * m  # [m, 2H] per stream
        discounted = sum(model.scale ** j * loss for j, loss in enumerate(losses))
        target = torch.autograd.grad(discounted, s)[0] * m
        with torch.no_grad():
            pred = model.synthesizer(s)
    cos = nn.functional.cosine_similarity(pred, true, dim=1, eps=1e-12).mean()
    cos_target = nn.functional.cosine_similarity(pred, target, dim=1, eps=1e-12).mean()
    return {"cosine": float(cos), "cosine_target": float(cos_target),
            "mse_true": float((pred - true).pow(2).sum(1).mean())}


@torch.no_grad()
def evaluate_bpc(model: RecurrentNet, ids: Tensor, batch_size: int, block: int, device: torch.device) -> float:
    """Bits per character of ``ids`` read as ``batch_size`` contiguous streams (state carried, from zero)."""
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


# --------------------------------------------------------------------------- the loop


def make_task(cfg: DictConfig, batch_size: int):
    """The training stream of ``cfg.data`` and, for PTB, the loaded characters (else ``None``)."""
    name = cfg.data.name
    options = OmegaConf.to_container(cfg.data.options, resolve=True) if cfg.data.get("options") else {}
    if name in COPY_TASKS:
        try:
            return CopyTask(batch_size, seed=cfg.seed, repeat=name == "repeat_copy", **options), None
        except TypeError as e:
            raise ConfigError(f"data.options of {name}: {e}: see conf/data/{name}.yaml for the valid keys") from None
    if name == "ptb":
        sums = cfg.data.get("checksums")
        chars = load_ptb_chars(cfg.data_dir, download=bool(cfg.data.download),
                               checksums=None if sums is None else OmegaConf.to_container(sums, resolve=True))
        return PTBStream(chars.train, batch_size, vocab_size=chars.vocab_size), chars
    raise ConfigError(f"model=rnn trains on a sequence task, not data={name}: choose data=copy, "
                      "data=repeat_copy or data=ptb")


def train_sequence(cfg: DictConfig, session: Session) -> tuple[dict, RecurrentNet]:
    """Copy / Repeat Copy / Penn Treebank with truncated BPTT, DNI or DNI + Aux (paper sec. 3.1, Table 1).

    Returns the final metrics (``primary`` is what a sweeper minimises: minus the largest N solved,
    or the test BPC) and the trained model (for PTB, the parameters of the best validation point).
    ``train.threads`` sets torch's thread count for the run (restored afterwards).
    """
    threads = torch.get_num_threads()
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    try:
        return sequence_loop(cfg, session)
    finally:
        torch.set_num_threads(threads)


def sequence_loop(cfg: DictConfig, session: Session) -> tuple[dict, RecurrentNet]:
    """The training loop of :func:`train_sequence`, one block per step."""
    device, writer = session.device, session.writer
    t = cfg.train
    k = int(cfg.model.k)
    steps, lr, eval_every = budget(cfg)
    batch_size = int(t.batch_size)
    task, chars = make_task(cfg, batch_size)
    is_copy = chars is None
    step_loss = copy_step_loss if is_copy else lm_step_loss
    aux_weight = float(cfg.dni.get("aux_weight", 0.0) or 0.0)
    model = RecurrentNet(task.input_size, task.output_size, hidden=cfg.model.hidden, token_input=not is_copy,
                         placement=placement_of(cfg.dni), aux=aux_weight > 0,
                         forget_bias=cfg.model.get("forget_bias", 1.0)).to(device)
    groups = [{"params": model.core_parameters(), "lr": lr}]
    if model.synthesizer is not None:
        groups.append({"params": list(model.synthesizer.parameters()), "lr": lr * float(cfg.dni.lr_factor)})
    opt = torch.optim.Adam(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    # Jaderberg et al. 2017, sec. 3.1: no learning-rate decay (the Table 1 presets set optim.decay_at: [])
    milestones = sorted({max(1, int(round(f * steps))) for f in cfg.optim.decay_at})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.optim.gamma)
    horizon = -(-int(t.get("sg_horizon", SG_HORIZON)) // k) * k  # whole blocks
    measure_sg = bool(t.get("sg_quality", True)) and model.synthesizer is not None
    eval_batch = int(cfg.data.get("eval_batch_size", EVAL_BATCH))
    eval_block = int(cfg.data.get("eval_block", EVAL_BLOCK))
    limit = cfg.profile.get("eval_limit") or None  # characters of valid / test (PTB)
    patience = t.get("patience")

    state = model.initial_state(batch_size, device)
    history: list[tuple] = []
    sums = {"loss": torch.zeros((), device=device), "sg": torch.zeros((), device=device),
            "aux": torch.zeros((), device=device)}
    best = {"bpc": math.inf, "step": 0, "params": None, "stale": 0}
    first, tick_step, step = 1, 0, 0

    def loop_state() -> dict:
        return {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "task": task.state_dict(), "state": state, "history": list(history),
                "sums": {n: v.clone() for n, v in sums.items()}, "best": dict(best), "tick_step": tick_step}

    if session.resumed is not None:
        saved = session.resumed
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        task.load_state_dict(saved["task"])
        state = saved["state"].to(device)
        history, best = [tuple(h) for h in saved["history"]], dict(saved["best"])
        tick_step, first = saved["tick_step"], saved["step"] + 1
        for name, v in saved["sums"].items():
            sums[name].copy_(v)
    log.info("%s: LSTM %d, k=%d, %s, %d steps, batch %d, lr %.2g, device %s", cfg.data.name, model.hidden, k,
             cfg.dni.name, steps, batch_size, lr, device)

    tick = time.time()
    model.train()
    stopped_early = False
    bar = tqdm(total=steps, initial=first - 1, desc="train", unit="step", disable=None, dynamic_ncols=True)
    for step in range(first, steps + 1):
        block, ahead = read_block(task, k, look_ahead=model.aux_head is not None)
        x, y, mask = block.x.to(device), block.y.to(device), block.mask.to(device)  # [k, B, ...]
        x_next = None if ahead is None else ahead.to(device)
        opt.zero_grad(set_to_none=True)
        result = truncated_step(model, x, y, mask, state, step_loss, aux_weight, x_next)
        opt.step()
        sched.step()
        state = result.state  # carried to the next block, detached
        sums["loss"] += result.loss
        if result.sg_loss is not None:
            sums["sg"] += result.sg_loss
        if result.aux_loss is not None:
            sums["aux"] += result.aux_loss
        if is_copy and task.report(bit_errors(result.logits, y, mask)):
            n, r = task.solved
            history.append((step, task.samples_seen, n, r))
            writer.scalar("by_samples/largest_solved", n, task.samples_seen)
            log.info("step %d: solved N=%d R=%d after %d episodes", step, n, r, task.samples_seen)

        if step % t.log_every == 0 or step == steps:
            count = step - tick_step
            mean_loss = float(sums["loss"]) / count
            if not math.isfinite(mean_loss) or not math.isfinite(float(sums["sg"])):
                raise SgrunError(f"the training loss or the synthesizer loss became non-finite by step {step}: "
                                 f"lower optim.lr (now {lr:.2g}) or dni.scale and run again")
            now = time.time()
            writer.scalar("loss/train", mean_loss, step)
            writer.scalar("perf/chars_per_sec", count * k * batch_size / max(now - tick, 1e-9), step)
            if model.synthesizer is not None:
                writer.scalar("dni/state/sg_loss", float(sums["sg"]) / count, step)
            if model.aux_head is not None:
                writer.scalar("aux/loss", float(sums["aux"]) / count, step)
            if is_copy:
                writer.scalars({"curriculum/N": task.n, "curriculum/R": task.repeats,
                                "curriculum/largest_solved": task.level}, step)
                if task.last_error is not None:
                    writer.scalar("curriculum/error", task.last_error, step)
            if measure_sg:
                quality = future_gradient_quality(model, state, _to(peek(task, horizon), device), k, step_loss)
                writer.scalars({f"dni/state/{name}": v for name, v in quality.items()}, step)
            for v in sums.values():
                v.zero_()
            tick, tick_step = time.time(), step
            bar.set_postfix(loss=f"{mean_loss:.3f}", **({"N": task.n} if is_copy else {}))

        if not is_copy and (step % eval_every == 0 or step == steps):
            # Jaderberg et al. 2017, sec. 3.1: early stopping on validation BPC; keep the best parameters
            bpc = evaluate_bpc(model, chars.valid[:limit], eval_batch, eval_block, device)
            writer.scalar("bpc/valid", bpc, step)
            writer.scalar("by_samples/bpc_valid", bpc, task.samples_seen)
            history.append((step, task.samples_seen, bpc))
            log.info("step %d/%d  valid BPC %.4f", step, steps, bpc)
            if bpc < best["bpc"]:
                best = {"bpc": bpc, "step": step, "stale": 0,
                        "params": {n: v.detach().clone() for n, v in model.state_dict().items()}}
            else:
                best["stale"] += 1
                stopped_early = bool(patience) and best["stale"] >= patience
        bar.update(1)
        session.step_done(step, steps, loop_state)
        if stopped_early:
            log.info("step %d: no better validation BPC in %d evaluations: stopping early", step, patience)
            break
    bar.close()

    metrics: dict = {"steps": step, "samples_seen": task.samples_seen, "k": k, "history": history}
    if is_copy:
        metrics.update({"largest_n": task.level, "largest_r": (task.solved or (0, 0))[1],
                        "primary": -float(task.level)})
    else:
        model.load_state_dict(best["params"])
        bpc_test = evaluate_bpc(model, chars.test[:limit], eval_batch, eval_block, device)
        writer.scalar("bpc/test", bpc_test, best["step"])
        log.info("test BPC %.4f at the best validation point (step %d, valid %.4f)", bpc_test, best["step"], best["bpc"])
        metrics.update({"bpc_test": bpc_test, "bpc_valid_best": best["bpc"], "best_step": best["step"],
                        "primary": bpc_test})
    return metrics, model


def _to(block: Block, device: torch.device) -> Block:
    return Block(x=block.x.to(device), y=block.y.to(device), mask=block.mask.to(device))


LOOPS = {"rnn": train_sequence}
