"""One stage of the pipeline: its blocks, its boundary synthesizer and input model, its messages,
its training step (see :mod:`sgrun.pipeline`), and the process that runs it."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict, deque
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.func import functional_call

from sgrun.build import (
    build_model,
    build_optimizer,
    build_synthesizer_optimizer,
    device_of,
    placement_of,
)
from sgrun.dni import interfaces_of
from sgrun.dni.units import (
    example_cosine,
    injected,
    per_example,
    regression_grad,
    regression_loss,
)
from sgrun.errors import ConfigError, OutputWriteError, SgrunError
from sgrun.guard import check_finite
from sgrun.metrics import Writer, write_bytes_atomic
from sgrun.pipeline.split import Split, check_schedule, max_inflight, plan_split
from sgrun.tasks.classification import Classification
from sgrun.train import budget_line, estimate_line, progress, saved_bytes, use_deterministic
from sgrun.updates import drop_gradients, update_coins

log = logging.getLogger("sgrun")

RESULT = "pipeline_result.pt"
_TAG_ACT, _TAG_GRAD = 1, 3


def stage_parameters(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """A stage's own parameters and those of the interfaces inside it, as the in-process task
    groups them."""
    synth = {id(p) for i in interfaces_of(net) for p in i.parameters()}
    params = list(net.parameters())
    return [p for p in params if id(p) not in synth], [p for p in params if id(p) in synth]


class StageNet(nn.Module):
    """Blocks ``lo .. hi-1`` of a :class:`~sgrun.models.feedforward.FeedForward`, their interior
    interfaces, and the head if this is the last stage (the boundary interface is the caller's)."""

    def __init__(self, model: nn.Module, lo: int, hi: int, last: bool) -> None:
        super().__init__()
        self.names = model.cut_names[lo:hi]
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        inner = self.names if last else self.names[:-1]
        self.interfaces = nn.ModuleDict({n: model.interfaces[n] for n in inner
                                         if n in model.interfaces})
        self.head = model.head if last else None
        self.unlocked = bool(model.unlocked)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None,
                x: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the data input, which interfaces with synthetic inputs predict from."""
        for name, block in zip(self.names, self.blocks):
            h = block(h)
            if name in self.interfaces:
                h = (self.interfaces[name](h, context, x) if self.unlocked
                     else self.interfaces[name](h, context))
        return self.head(h) if self.head is not None else h


def irecv(shape: tuple[int, ...], src: int, tag: int, device: torch.device) -> tuple:
    """A posted receive of a float tensor: ``(work, buffer)``."""
    buf = torch.empty(shape, device=device)
    return dist.irecv(buf, src, tag=tag), buf


class Inbox:
    """Predictions of one synthesizer waiting for their targets from one neighbour (however late),
    and the receive posted for the next target."""

    def __init__(self, shape: tuple[int, ...], src: int, tag: int, batch: int,
                 device: torch.device) -> None:
        self.shape, self.src, self.tag, self.batch, self.device = shape, src, tag, batch, device
        self.pending: deque = deque()  # (step, prediction graph, snapshot params, update coin)
        self.recv = None               # (work, buffer) of the next target

    def take(self, wait: bool):
        """The oldest waiting prediction and its target if that has arrived (with ``wait``: once it
        has); ``None`` when nothing waits or the target is not there yet."""
        if not self.pending:
            return None
        if self.recv is None:
            self.recv = irecv((self.batch, *self.shape), self.src, self.tag, self.device)
        work, buf = self.recv
        if not (wait or work.is_completed()):
            return None
        work.wait()
        self.recv = None
        return self.pending.popleft(), buf


class Stage:
    """The training step of one stage (see the module docstring).

    The stage's slice of the classification task: the task's own model (this process holds all of
    it and trains its blocks), batch sampler and step (:meth:`Classification.slice_step`, the
    forward and backward of ``train_step``, here on the stage's blocks).  What a stage adds is only
    what a slice needs: its input arrives from below (or is predicted), the backward of a stage
    below the head starts from a synthetic gradient (or the one sent back from above:
    :meth:`top_gradient`), and it sends its output and the gradient of its input on."""

    def __init__(self, cfg: DictConfig, rank: int, split: Split, task: Classification, steps: int,
                 device: torch.device) -> None:
        model = task.model
        self.task = task
        self.rank, self.split, self.device, self.steps = rank, split, device, steps
        self.first, self.last = rank == 0, rank == split.stages - 1
        lo, hi = split.ranges[rank]
        self.lo, self.hi = lo, hi
        self.net = StageNet(model, lo, hi, self.last)
        self.inner = interfaces_of(self.net)  # the interfaces inside the stage (not its boundary)
        self.in_shape = (tuple(model.in_shape) if self.first
                         else tuple(model.cut_shapes[model.cut_names[lo - 1]]))
        self.out_shape = None if self.last else tuple(model.cut_shapes[split.boundaries[rank]])
        self.boundary = None if self.last else model.interfaces[split.boundaries[rank]] \
            if split.boundaries[rank] in model.interfaces else None
        self.locked = split.locked
        # complete unlock: this stage's input is I(x) of the cut below, predicted here from its own
        # copy of the data stream; the real activation from below only trains I, however late
        self.unlocked = bool(model.unlocked) and not split.locked
        self.below = (model.interfaces[split.boundaries[rank - 1]]
                      if self.unlocked and not self.first else None)
        self.num_classes = task.data.num_classes
        self.sampler = task.sampler
        self.batch = self.sampler.batch_size
        # SG quality (train.sg_quality): the cosine of each prediction to the gradient that comes
        # back for it
        self.sg_quality = bool(cfg.train.sg_quality)
        self.max_inflight = max_inflight(cfg.runtime)
        # stochastic updates (sec. 3.3): every stage draws every layer group's coin from the same
        # generator as the in-process run, and applies the coins of its own groups
        self.update_prob = float(cfg.train.update_prob)
        self.update_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.groups = len(model.blocks) + 1  # each block with the interface above it, then the head
        # the stage's own parameters: Adam as in the in-process run (synthesizers in their own
        # group)
        self.opt, self.sched = build_optimizer(cfg, *stage_parameters(self.net), steps)
        # the boundary's M waits for gradients from above; I of the cut below for activations
        # from below
        self.up = self.down = None
        if self.boundary is not None:
            self.synth_opt, self.synth_sched = build_synthesizer_optimizer(
                cfg, self.boundary.synthesizer, steps)
            self.up = Inbox(self.out_shape, rank + 1, _TAG_GRAD, self.batch, device)
        if self.below is not None:
            self.input_opt, self.input_sched = build_synthesizer_optimizer(
                cfg, self.below.input_model, steps)
            self.down = Inbox(self.in_shape, rank - 1, _TAG_ACT, self.batch, device)
        self.sends: deque = deque()  # outstanding isend works (and the tensors they read)
        # (work, buffer) of the next input from below (no synthetic inputs)
        self.act_recv = None
        self.step = 0
        # statistics since the last report, each as (the step it belongs to, value); a late target
        # belongs to the step of its prediction
        self.stale: list[tuple[int, int]] = []
        self.sg_losses: list[tuple[int, float]] = []
        self.cosines: list[tuple[int, float]] = []
        self.in_stale: list[tuple[int, int]] = []
        self.in_losses: list[tuple[int, float]] = []
        # the values of the task's step: the loss (last stage), the inner interfaces' losses
        self.values: dict[str, list[tuple[int, torch.Tensor | float]]] = defaultdict(list)
        self.upd: list[bool] = []  # this step's update coins
        self.grad_above: torch.Tensor | None = None  # locked: the gradient from above

    # -- messages
    def _send(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self.sends.append((dist.isend(tensor, dst, tag=tag), tensor))
        while len(self.sends) > 4 * self.max_inflight + 4:
            self.sends.popleft()[0].wait()

    def _recv(self, shape, dtype, src: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src, tag=tag)
        return buf

    def flush(self) -> None:
        while self.sends:
            self.sends.popleft()[0].wait()

    # -- one step
    def train_step(self) -> None:
        self.step += 1
        data = None
        self.upd = upd = self.draw_updates()
        if self.first:
            x, y = self.sampler.next()
            data = x
        elif self.unlocked:  # nothing from below is waited for: the input is I(data)
            data, y = self.sampler.next()
            h_hat, snapshot = self.predict(self.below.input_model, (data,))
            self.down.pending.append((self.step, h_hat, snapshot, upd[self.lo - 1]))
            x = h_hat.detach().requires_grad_(True)
        else:
            y = self.sampler.next_labels()  # the same batch as stage 0's: no label message
            shape = (self.batch, *self.in_shape)
            work, x = self.act_recv or irecv(shape, self.rank - 1, _TAG_ACT, self.device)
            work.wait()
            # post the next receive at once, so the next activation arrives while this step computes
            self.act_recv = (irecv(shape, self.rank - 1, _TAG_ACT, self.device)
                             if self.step < self.steps else None)
            x.requires_grad_(True)
        self.opt.zero_grad(set_to_none=True)
        # the task's own step on this stage's slice; above the head's stage, the backward starts
        # from the gradient top_gradient gives
        values = self.task.slice_step(self.net, self.inner, x, y, data,
                                      top=None if self.last else self.top_gradient)
        for tag, value in values.items():  # detached scalars, read at the next report
            self.values[tag].append((self.step, value))
        if self.locked and self.boundary is not None:  # train_only: M learns from the true one
            self.train_synthesizer(self.up.pending.popleft(), self.grad_above)
        if not self.first:
            self._send(x.grad, self.rank - 1, _TAG_GRAD)
        self.skip_updates(upd)
        self.opt.step()
        self.sched.step()
        if not self.locked:
            self.take_targets()

    def top_gradient(self, out: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """The gradient of this stage's output that its backward starts from: the synthetic one,
        at once (nothing above is waited for), or, locked, the true one from above.  Sends the
        output on first (with synthetic inputs it is only the target of ``I`` above)."""
        self._send(out.detach(), self.rank + 1, _TAG_ACT)
        if self.locked:
            if self.boundary is not None:  # train_only: the synthesizer learns from it too
                self.up.pending.append((self.step,
                                        *self.predict(self.boundary.synthesizer, (out, ctx)),
                                        self.upd[self.hi - 1]))
            self.grad_above = self._recv(out.shape, out.dtype, self.rank + 1, _TAG_GRAD)
            return self.grad_above
        delta_hat, snapshot = self.predict(self.boundary.synthesizer, (out, ctx))
        self.up.pending.append((self.step, delta_hat, snapshot, self.upd[self.hi - 1]))
        return injected(delta_hat.detach(), self.boundary.scale, out.shape[0])

    def draw_updates(self) -> list[bool]:
        """Which layer groups update this step: every stage draws all groups' coins, as the
        in-process engine does (:mod:`sgrun.updates`), and applies those of its own groups."""
        return update_coins(self.groups, self.update_prob, self.update_gen)

    def skip_updates(self, upd: list[bool]) -> None:
        """Drop the gradients of this stage's groups that do not update this step; the boundary's
        synthesizer and the input model below follow their groups' coins when their targets
        arrive."""
        if self.update_prob >= 1.0:
            return
        names = self.net.names
        skipped = [self.net.blocks[k - self.lo] for k in range(self.lo, self.hi) if not upd[k]]
        skipped += [self.net.interfaces[names[k - self.lo]] for k in range(self.lo, self.hi)
                    if not upd[k] and names[k - self.lo] in self.net.interfaces]
        if self.net.head is not None and not upd[-1]:
            skipped.append(self.net.head)
        drop_gradients(skipped)

    @staticmethod
    def predict(synth: nn.Module, args: tuple) -> tuple[torch.Tensor, dict]:
        """``synth(*args)``, its graph on a snapshot of the synthesizer's weights (which may have
        moved on by the time the target arrives)."""
        snapshot = {k: p.detach().clone().requires_grad_(True) for k, p in synth.named_parameters()}
        return functional_call(synth, {**snapshot, **dict(synth.named_buffers())}, args), snapshot

    def take_targets(self, drain: bool = False) -> None:
        """Train the synthesizers on the targets that have come back: gradients from above for the
        boundary's ``M``, real activations from below for ``I`` of the cut below.  Wait while
        ``max_inflight`` batches wait for theirs (with ``drain``: until none waits)."""
        for inbox, train in ((self.up, self.train_synthesizer),
                             (self.down, self.train_input_model)):
            while inbox is not None and (
                    got := inbox.take(drain or len(inbox.pending) >= self.max_inflight)):
                train(*got)

    def train_synthesizer(self, waiting: tuple, grad: torch.Tensor) -> None:
        """Regress ``M``'s prediction of an earlier batch on the gradient that came back for it."""
        step, delta_hat, snapshot, update = waiting
        # the per-example target, as in sgrun.dni.interface
        target = per_example(grad)
        diff = delta_hat.detach() - target
        self.sg_losses.append((step, float(regression_loss(diff))))
        if self.sg_quality:  # mean over examples, as sgrun.dni.gradient_quality measures it
            self.cosines.append((step, float(example_cosine(delta_hat.detach(), target))))
        self._late_step(self.boundary.synthesizer, self.synth_opt, self.synth_sched, delta_hat,
                        snapshot, regression_grad(diff), update)
        self.stale.append((step, self.step - step))

    def train_input_model(self, waiting: tuple, h: torch.Tensor) -> None:
        """Regress ``I``'s prediction of an earlier batch on the real activation that produced it
        below: the gradient of ``mean_i ||h_hat_i - h_i||^2``, as in
        :mod:`sgrun.dni.synthetic_input`."""
        step, h_hat, snapshot, update = waiting
        diff = h_hat.detach() - h
        self.in_losses.append((step, float(regression_loss(diff))))
        self._late_step(self.below.input_model, self.input_opt, self.input_sched, h_hat, snapshot,
                        regression_grad(diff), update)
        self.in_stale.append((step, self.step - step))

    @staticmethod
    def _late_step(module: nn.Module, opt, sched, pred: torch.Tensor, snapshot: dict,
                   grad_pred: torch.Tensor, update: bool) -> None:
        """One optimizer step of ``module`` with the gradient its prediction had on the snapshot; a
        skipped update (stochastic updates) leaves it and its Adam moments alone, as in process."""
        params = dict(module.named_parameters())
        if update:
            grads = torch.autograd.grad(pred, [snapshot[k] for k in snapshot], grad_pred)
            for k, g in zip(snapshot, grads):
                params[k].grad = g
        else:
            for p in params.values():
                p.grad = None
        opt.step()
        sched.step()

    def state(self, full_names: dict[int, str]) -> dict:
        """This stage's weights under the full model's names."""
        return {full_names[id(t)]: t.detach().clone() for t in self._tensors()}

    def _tensors(self):
        owned = [self.net]
        if self.boundary is not None:
            owned.append(self.boundary.synthesizer)  # its input model (complete unlock) runs above
        if self.below is not None:
            owned.append(self.below.input_model)
        for module in owned:
            yield from module.parameters()
            yield from module.buffers()

    def finite_check_values(self) -> dict[str, float]:
        """What the divergence guard checks: the sums of this stage's losses since the last
        report."""
        values = {tag: float(sum(float(v) for _, v in entries))
                  for tag, entries in self.values.items()}
        if self.boundary is not None:
            values[f"dni/{self.split.boundaries[self.rank]}/sg_loss"] = float(
                sum(v for _, v in self.sg_losses))
        if self.below is not None:
            values[f"dni/{self.split.boundaries[self.rank - 1]}/input_loss"] = float(
                sum(v for _, v in self.in_losses))
        return values

    def report(self) -> dict:
        r = {"stale": self.stale, "sg": self.sg_losses, "cos": self.cosines,
             "values": {tag: [(step, float(v)) for step, v in entries]
                        for tag, entries in self.values.items()},
             "in_stale": self.in_stale, "in_loss": self.in_losses}
        self.stale, self.sg_losses, self.cosines, self.values = [], [], [], defaultdict(list)
        self.in_stale, self.in_losses = [], []
        return r


# --------------------------------------------------------------------------- a stage's process


def stage_device(device_name: str, rank: int, world: int) -> torch.device:
    """The device of stage ``rank``: on CUDA, one GPU of this machine per stage process here
    (nccl refuses two ranks on one GPU, and gloo sends no CUDA tensors); under torchrun the
    processes of this machine are ``LOCAL_WORLD_SIZE``, this one ``LOCAL_RANK``."""
    device = device_of(device_name)
    if device.type != "cuda":
        return device
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count()
    if gpus < here:
        raise ConfigError(f"runtime=pipeline with device=cuda needs a GPU for each stage process: "
                          f"{here} stages on this machine, {gpus} GPU(s) here: set device=cpu, or "
                          "start one stage per GPU machine with torchrun (see the README)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def stage_main(rank: int, world: int, cfg: DictConfig, out_dir: str, errors=None) -> dict | None:
    """Everything one process does; rank 0 also evaluates and logs.  Returns rank 0's result."""
    from sgrun.pipeline.schedules import ScheduledStage  # it builds on Stage

    cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
    device = stage_device(cfg.device, rank, world)
    backend = (cfg.runtime.backend if cfg.runtime.backend != "auto"
               else ("nccl" if device.type == "cuda" else "gloo"))
    torch.set_flush_denormal(True)
    use_deterministic(bool(cfg.deterministic), device)
    torch.manual_seed(cfg.seed)
    # the in-process run's task (same seed: same weights, same batches): every stage draws the same
    # batches itself, so stages above the first take their labels from it (no label messages), and
    # with synthetic inputs their data too (nothing below is waited for)
    task = Classification(cfg, device)
    model = annotated(task.model, cfg, tuple(task.data.shape), task.data.num_classes)
    split = plan_split(model, cfg.runtime)
    if split.stages != world:
        raise ConfigError(f"{world} processes for {split.stages} stages: start as many processes "
                          "as runtime.stages")
    model.train()
    full_names = {id(t): k for k, t in list(model.named_parameters()) + list(model.named_buffers())}
    steps, lr = int(cfg.train.steps), float(cfg.optim.lr)
    eval_every, log_every = int(cfg.train.eval_every), int(cfg.train.log_every)
    check_schedule(cfg, split)
    kind = Stage if cfg.runtime.get("schedule", "dni") == "dni" else ScheduledStage
    stage = kind(cfg, rank, split, task, steps, device)

    timeout = datetime.timedelta(seconds=float(cfg.runtime.timeout))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    writer = Writer(Path(out_dir) / "tb" / "pipeline") if rank == 0 else None
    curves = Curves(writer, split, log_every, steps) if rank == 0 else None
    if rank == 0:
        log.info("%s", task.describe())
        log.info("%s per stage", budget_line(cfg, steps, lr, log_every, eval_every,
                                             torch.get_num_threads()))
    # training seconds at each evaluation (the slowest stage's, without evaluations)
    seconds: list[float] = []
    # per boundary: [sum, count, max] of the gradient targets' staleness, then of the input targets'
    staleness: dict[str, list[float]] = ({} if split.locked
                                         else {b: [0.0, 0.0, 0.0] * 2 for b in split.boundaries})
    result = None
    try:
        tick, t_train = time.time(), 0.0
        with progress(steps, show=rank == 0) as bar:  # rank 0 draws it
            for step in range(1, steps + 1):
                stage.train_step()
                bar.update(1)
                evaluating = step % eval_every == 0 or step == steps
                if evaluating or step % log_every == 0:
                    # the divergence guard of the in-process engine, on this stage's losses
                    # since the last report
                    check_finite(stage.finite_check_values(), step, lr, None)
                if evaluating:
                    if not stage.locked:
                        stage.take_targets(drain=True)
                    stage.flush()
                    t_train += time.time() - tick
                    gathered = [None] * world if rank == 0 else None
                    dist.gather_object((stage.state(full_names), stage.report(), t_train), gathered,
                                       dst=0, group=ctrl)
                    if rank == 0:
                        state = {}
                        for part in gathered:
                            state.update(part[0])
                        model.load_state_dict(state)
                        writer.scalars(task.evaluate(step), step)
                        seconds.append(round(max(p[2] for p in gathered), 3))
                        rate = step * stage.batch / max(seconds[-1], 1e-9)
                        writer.scalar("perf/samples_per_sec", rate, step)
                        curves.add(gathered)
                        curves.write(upto=step)
                        for s, cut in enumerate(staleness):
                            for k, stale in ((0, gathered[s][1]["stale"]),
                                             (3, gathered[s + 1][1]["in_stale"])):
                                acc, late = staleness[cut], [v for _, v in stale]
                                acc[k], acc[k + 1] = acc[k] + sum(late), acc[k + 1] + len(late)
                                acc[k + 2] = max([acc[k + 2], *late])
                        log.info("step %d/%d  %.0f samples/s (the slowest stage's training time)",
                                 step, steps, rate)
                        bar.set_postfix(samples_per_s=f"{rate:.0f}")
                        if len(seconds) == 1 and step < steps:
                            log.info("%s", estimate_line(step, seconds[0], steps))
                    # every stage restarts its clock after rank 0's evaluation, so that no stage
                    # counts the time it would otherwise spend waiting on the evaluating stage as
                    # training time
                    dist.barrier(group=ctrl)
                    tick = time.time()
        if rank == 0:
            stale = {cut: {"mean": acc[0] / max(acc[1], 1), "max": int(acc[2])}
                     for cut, acc in staleness.items()}
            if stage.unlocked:  # how late the real activations came to train the synthetic inputs
                for cut, acc in staleness.items():
                    stale[cut].update(input_mean=acc[3] / max(acc[4], 1), input_max=int(acc[5]))
            metrics = task.final_metrics(steps)
            metrics.update(seconds=seconds,
                           samples_per_sec=steps * stage.batch / max(seconds[-1], 1e-9),
                           stages=world, boundaries=list(split.boundaries), locked=split.locked,
                           staleness=stale)
            result = {"metrics": metrics,
                      "state": {k: v.cpu() for k, v in model.state_dict().items()}}
        dist.barrier(group=ctrl)
    finally:
        if writer is not None:
            writer.close()
        dist.destroy_process_group()
    return result


class Curves:
    """Rank 0's TensorBoard curves of every stage's values, written at each evaluation.

    The in-process engine logs the mean of each value over every ``train.log_every`` steps; so does
    this, from the ``(step, value)`` pairs the stages gather at evaluations (a late target counts at
    the step of its prediction, so an interval is written once every value of it has come)."""

    def __init__(self, writer: Writer, split: Split, log_every: int, steps: int) -> None:
        self.writer, self.split, self.log_every, self.steps = writer, split, log_every, steps
        self.pending: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def add(self, gathered: list) -> None:
        cuts = self.split.boundaries
        for s, (_, rep, _) in enumerate(gathered):
            for tag, entries in rep["values"].items():  # the loss: the last stage's
                self.pending[tag] += entries
            if s < len(cuts):
                self.pending[f"pipeline/{cuts[s]}/staleness"] += rep["stale"]
                self.pending[f"dni/{cuts[s]}/sg_loss"] += rep["sg"]
                self.pending[f"dni/{cuts[s]}/target_cosine"] += rep["cos"]
            if s > 0:  # the synthetic inputs of the cut below this stage
                self.pending[f"pipeline/{cuts[s - 1]}/input_staleness"] += rep["in_stale"]
                self.pending[f"dni/{cuts[s - 1]}/input_loss"] += rep["in_loss"]

    def write(self, upto: int) -> None:
        """Write every logging interval that ends at or before step ``upto``."""
        for tag, entries in self.pending.items():
            intervals: dict[int, list[float]] = defaultdict(list)
            later = []
            for step, value in entries:
                end = min(-(-step // self.log_every) * self.log_every, self.steps)
                if end <= upto:
                    intervals[end].append(value)
                else:
                    later.append((step, value))
            for end in sorted(intervals):
                values = intervals[end]
                if tag.endswith("staleness"):
                    self.writer.scalar(f"{tag}_mean", sum(values) / len(values), end)
                    self.writer.scalar(f"{tag}_max", max(values), end)
                else:
                    self.writer.scalar(tag, sum(values) / len(values), end)
            self.pending[tag] = later


def stop_with(parent: int, every: float = 0.5) -> None:
    """End this process as soon as ``parent`` (the ``sgrun`` process that started the stages) is
    gone: a SIGKILLed ``sgrun`` must not leave its stages training on, writing into a folder whose
    lock died with it."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="sgrun-parent-watch", daemon=True).start()


def spawned(rank: int, world: int, cfg: dict, out_dir: str, port: int, threads: int,
            errors, parent: int) -> None:
    """Entry of a process started by :func:`train_pipeline`."""
    stop_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops everyone
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    # log lines on stdout, as Hydra's console handler writes the launching process's: stderr
    # keeps only the run's error
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    # what goes to the parent: (rank, message, traceback or None, (errno, path) of a failed write
    # or None)
    try:
        result = stage_main(rank, world, cfg, out_dir)
        if result is not None:  # rank 0: the metrics and the assembled weights, for the parent
            write_bytes_atomic(Path(out_dir) / RESULT, saved_bytes(result))  # whole or nothing
    except OutputWriteError as e:
        errors.put((rank, str(e), None, (e.errno, str(e.path))))
        raise SystemExit(3) from None
    except SgrunError as e:
        errors.put((rank, str(e), None, None))
        raise SystemExit(3) from None
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        errors.put((rank, f"{type(e).__name__}: {e}", traceback.format_exc(), None))
        raise SystemExit(3) from None


def full_model(cfg: DictConfig, shape: tuple[int, ...], classes: int) -> nn.Module:
    """The whole feed-forward model, as the in-process run builds it (same seed, same weights)."""
    model = build_model(cfg.model, in_shape=shape, num_classes=classes,
                        placement=placement_of(cfg.dni))
    return annotated(model, cfg, shape, classes)


def annotated(model: nn.Module, cfg: DictConfig, shape: tuple[int, ...], classes: int) -> nn.Module:
    """``model`` with what the split needs to know of it: its input shape, classes and context."""
    model.in_shape, model.num_classes = shape, classes
    model.context_dim = classes if cfg.dni.conditioned else 0
    return model
