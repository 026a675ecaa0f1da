"""``runtime=pipeline``: every stage of a feed-forward net in its own process, joined by DNI.

Jaderberg et al. 2017, sec. 1: a module joined to the next by a synthetic gradient need not wait
for it.  Here the network is split at ``runtime.boundaries`` (cuts such as ``h2``) into ``S`` stages;
stage ``s`` runs in process (rank) ``s`` and talks to its neighbours with ``torch.distributed``
point-to-point messages (gloo on CPU, nccl on GPU).

One step of stage ``s`` (:class:`Stage`), DNI pipeline:

1. take a batch of activations from stage ``s-1`` (stage 0 samples the data; every stage draws the
   same batches from its own sampler with the same seed, so labels are never sent, and the receive
   of the next batch is posted at once so that it arrives while this one computes);
2. forward through its blocks (interfaces inside the stage work as in the in-process run);
3. ask the boundary synthesizer for ``delta_hat = M(h_out, c)`` and backpropagate it at once:
   the stage updates without waiting for anything above it;
4. send ``h_out`` on, send the gradient that reached its input back to ``s-1`` (the bootstrapped
   target of the synthesizer below), step its optimizer;
5. whenever the gradient for an earlier batch comes back from ``s+1``, however late, regress the
   synthesizer's prediction for that batch on it.  The prediction's graph is kept on a snapshot
   of the synthesizer's weights taken at step 3, so a late target trains the synthesizer with the
   gradient it would have had then (delayed-gradient SGD).  At most ``runtime.max_inflight`` batches
   wait for their target; a stage that is that far ahead blocks.  How many steps late each target
   arrives (staleness) is logged.

With synthetic inputs (``dni=complete_unlock|complete_unlock_cdni``, sec. 3.3) the stages are
unlocked forwards too: every stage draws the same batches from its own copy of the data (same seed),
and stage ``s+1`` runs on ``h_hat = I(x)`` of the cut below without waiting for stage ``s``.  The real
activation that stage ``s`` sends is only ``I``'s regression target, taken whenever it arrives (on
a snapshot of ``I``'s weights, like the synthesizer's), at most ``max_inflight`` batches late; the
gradient w.r.t. ``h_hat`` goes back to stage ``s`` as its synthesizer's target, as in
:mod:`sgrun.dni.forward`.

Stochastic updates (``train.update_prob`` < 1, sec. 3.3): every stage draws every layer group's
coin from the in-process run's generator and drops the gradients of its own skipped groups; a
boundary synthesizer or input model whose group was skipped at the step of its prediction is left
alone when that prediction's target arrives.

The last stage computes the loss and its ordinary backward.  With ``dni=none`` the same split is
trained by plain backprop across the processes (the locked baseline): a stage sends ``h_out`` and
waits for its gradient before it updates.  With ``dni.mode=train_only`` it is locked the same way
but the synthesizers still run and learn from the true gradient: the DNI pipeline's compute, with
the locking as the only difference.

With ``max_inflight=1`` nothing overlaps and a DNI run (with or without synthetic inputs) equals the
in-process run bit for bit (same threads per process); with ``S=1`` the pipeline is the in-process run.

Test error is measured by stage 0 on the assembled model at every evaluation point: every stage
first waits for its outstanding targets, then the stages' weights are gathered on rank 0.
TensorBoard tags (rank 0): ``error/test``, ``loss/train``, ``perf/samples_per_sec``,
``pipeline/<cut>/staleness_mean``, ``pipeline/<cut>/staleness_max``, ``dni/<cut>/sg_loss``; with
synthetic inputs also ``pipeline/<cut>/input_staleness_mean|max`` and ``dni/<cut>/input_loss``.

Launch: ``sgrun runtime=pipeline`` starts the ``S`` processes itself on this machine; across machines
start one ``sgrun runtime=pipeline ...`` per stage with ``torchrun`` (``--nnodes``, ``--node-rank``,
``--master-addr``), which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import signal
import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.func import functional_call

from sgrun.build import build_model, build_optimizer, build_synthesizer_optimizer, device_of, placement_of
from sgrun.checkpoint import Interrupted
from sgrun.data.images import load_images
from sgrun.errors import ConfigError, SgrunError
from sgrun.metrics import Writer

log = logging.getLogger("sgrun")

RESULT = "pipeline_result.pt"
_TAG_ACT, _TAG_GRAD = 1, 3


# --------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class Split:
    """Stage ``s`` holds blocks ``ranges[s][0] .. ranges[s][1] - 1``; ``boundaries[s]`` is its top cut."""

    boundaries: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    locked: bool  # no interfaces at all: plain backprop across the stages

    @property
    def stages(self) -> int:
        return len(self.ranges)


def plan_split(model: nn.Module, runtime: DictConfig) -> Split:
    """Check ``runtime.stages`` / ``runtime.boundaries`` against the model's cuts and interfaces."""
    cuts = list(model.cut_names)
    stages = int(runtime.stages)
    if stages < 1:
        raise ConfigError(f"runtime.stages must be >= 1 (got {stages}): set runtime.stages=2")
    if stages > len(cuts) + 1:
        raise ConfigError(f"runtime.stages={stages} but this model has only {len(cuts)} cuts "
                          f"({', '.join(cuts)}), so at most {len(cuts) + 1} stages: lower runtime.stages "
                          "or use more model.layers")
    placed = list(model.interfaces)
    # locked: no interfaces (backprop), or interfaces that only learn (dni.mode=train_only)
    locked = not placed or all(model.interfaces[c].mode == "train_only" for c in placed)
    given = runtime.boundaries
    if given in (None, "auto"):
        boundaries = balanced_boundaries(model, stages)
    else:
        boundaries = [str(b) for b in given]
        unknown = [b for b in boundaries if b not in cuts]
        if unknown:
            raise ConfigError(f"runtime.boundaries: no cut named {', '.join(map(repr, unknown))}: valid cuts are "
                              f"{', '.join(cuts)}, e.g. runtime.boundaries=[{cuts[len(cuts) // 2]}]")
        if len(boundaries) != stages - 1 or len(set(boundaries)) != len(boundaries):
            raise ConfigError(f"runtime.boundaries needs {stages - 1} different cuts for runtime.stages={stages} "
                              f"(got {boundaries}): choose from {', '.join(cuts)} or set runtime.boundaries=auto")
        boundaries.sort(key=cuts.index)
    if not locked:
        missing = [b for b in boundaries if b not in placed]
        if missing:
            raise ConfigError(f"stage boundary {', '.join(missing)} has no interface (interfaces at "
                              f"{', '.join(placed)}): choose boundaries among them, or place interfaces there "
                              "(dni.cuts=[all])")
    edges = [0] + [cuts.index(b) + 1 for b in boundaries] + [len(cuts)]
    return Split(tuple(boundaries), tuple(zip(edges[:-1], edges[1:])), locked)


def balanced_boundaries(model: nn.Module, stages: int) -> list[str]:
    """Boundaries that balance the stages' compute: multiply-adds of each block and of the
    synthesizer above it, counted on one example, split so the largest stage is smallest."""
    costs = block_costs(model)
    n = len(costs)
    best: tuple[float, tuple[int, ...]] | None = None

    def search(start: int, left: int, chosen: tuple[int, ...]):
        nonlocal best
        if left == 1:
            parts = list(zip((0,) + chosen, chosen + (n,)))
            worst = max(sum(costs[a:b]) for a, b in parts)
            if best is None or worst < best[0]:
                best = (worst, chosen)
            return
        for end in range(start + 1, n - left + 2):
            search(end, left - 1, chosen + (end,))

    search(0, stages, ())
    return [model.cut_names[e - 1] for e in best[1]]


def block_costs(model: nn.Module) -> list[float]:
    """Multiply-adds per example of each block together with the gradient synthesizer of the cut
    above it and the input synthesizer of the cut below it (complete unlock)."""
    model = copy.deepcopy(model)  # the counting forward must not touch the BatchNorm statistics
    counts: dict[nn.Module, float] = {}

    def hook(module, inputs, output):
        w = module.weight
        per_out = w[0].numel()  # in_features, or in_channels * kh * kw
        counts[module] = counts.get(module, 0.0) + per_out * output[0].numel()

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    shape = getattr(model, "in_shape", None)
    try:
        with torch.enable_grad():  # interfaces run their synthesizers only when gradients are on
            was = model.training
            model.train()
            x = torch.zeros(2, *shape)
            ctx = torch.zeros(2, model.context_dim) if model.context_dim else None
            model(x, ctx)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    def cost(module: nn.Module | None) -> float:
        return 0.0 if module is None else sum(counts.get(m, 0.0) for m in module.modules())

    costs = [cost(block) for block in model.blocks]
    costs[-1] += cost(model.head)
    for i, name in enumerate(model.cut_names):
        if name in model.interfaces:
            iface = model.interfaces[name]
            costs[i] += cost(iface.synthesizer)  # M(h) runs below the cut, I(x) above it
            costs[min(i + 1, len(costs) - 1)] += cost(getattr(iface, "input_model", None))
    return costs


# --------------------------------------------------------------------------- one stage


class StageNet(nn.Module):
    """Blocks ``lo .. hi-1`` of a :class:`~sgrun.models.feedforward.FeedForward`, their interior
    interfaces, and the head if this is the last stage (the boundary interface is the caller's)."""

    def __init__(self, model: nn.Module, lo: int, hi: int, last: bool) -> None:
        super().__init__()
        self.names = model.cut_names[lo:hi]
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        inner = self.names if last else self.names[:-1]
        self.interfaces = nn.ModuleDict({n: model.interfaces[n] for n in inner if n in model.interfaces})
        self.head = model.head if last else None
        self.unlocked = bool(model.unlocked)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None, x: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the data input, which interfaces with synthetic inputs predict from."""
        for name, block in zip(self.names, self.blocks):
            h = block(h)
            if name in self.interfaces:
                h = self.interfaces[name](h, context, x) if self.unlocked else self.interfaces[name](h, context)
        return self.head(h) if self.head is not None else h


def irecv(shape: tuple[int, ...], src: int, tag: int, device: torch.device) -> tuple:
    """A posted receive of a float tensor: ``(work, buffer)``."""
    buf = torch.empty(shape, device=device)
    return dist.irecv(buf, src, tag=tag), buf


class Inbox:
    """Predictions of one synthesizer waiting for their targets from one neighbour (however late),
    and the receive posted for the next target."""

    def __init__(self, shape: tuple[int, ...], src: int, tag: int, batch: int, device: torch.device) -> None:
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
    """The training loop of one stage (see the module docstring)."""

    def __init__(self, cfg: DictConfig, rank: int, split: Split, model: nn.Module, steps: int, lr: float,
                 device: torch.device, sampler) -> None:
        self.rank, self.split, self.device, self.steps = rank, split, device, steps
        self.first, self.last = rank == 0, rank == split.stages - 1
        lo, hi = split.ranges[rank]
        self.lo, self.hi = lo, hi
        self.net = StageNet(model, lo, hi, self.last)
        self.in_shape = tuple(model.in_shape) if self.first else tuple(model.cut_shapes[model.cut_names[lo - 1]])
        self.out_shape = None if self.last else tuple(model.cut_shapes[split.boundaries[rank]])
        self.boundary = None if self.last else model.interfaces[split.boundaries[rank]] \
            if split.boundaries[rank] in model.interfaces else None
        self.locked = split.locked
        # complete unlock: this stage's input is I(x) of the cut below, predicted here from its own
        # copy of the data stream; the real activation from below only trains I, however late
        self.unlocked = bool(model.unlocked) and not split.locked
        self.below = model.interfaces[split.boundaries[rank - 1]] if self.unlocked and not self.first else None
        self.conditioned = bool(cfg.dni.conditioned) and bool(model.interfaces)
        self.num_classes = model.num_classes
        self.batch = sampler.batch_size
        self.sampler = sampler
        self.max_inflight = int(cfg.runtime.max_inflight)
        # stochastic updates (sec. 3.3): every stage draws every layer group's coin from the same
        # generator as the in-process run, and applies the coins of its own groups
        self.update_prob = float(cfg.train.update_prob)
        self.update_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        self.groups = len(model.blocks) + 1  # each block with the interface above it, then the head
        # the stage's own parameters: Adam as in the in-process run (synthesizers in their own group)
        self.opt, self.sched = build_optimizer(cfg, self.net, steps, lr)
        # the boundary's M waits for gradients from above; I of the cut below for activations from below
        self.up = self.down = None
        if self.boundary is not None:
            self.synth_opt, self.synth_sched = build_synthesizer_optimizer(cfg, self.boundary.synthesizer, steps, lr)
            self.up = Inbox(self.out_shape, rank + 1, _TAG_GRAD, self.batch, device)
        if self.below is not None:
            self.input_opt, self.input_sched = build_synthesizer_optimizer(cfg, self.below.input_model, steps, lr)
            self.down = Inbox(self.in_shape, rank - 1, _TAG_ACT, self.batch, device)
        self.sends: deque = deque()    # outstanding isend works (and the tensors they read)
        self.act_recv = None           # (work, buffer) of the next input from below (no synthetic inputs)
        self.step = 0
        # statistics since the last report
        self.stale: list[int] = []
        self.sg_losses: list[float] = []
        self.in_stale: list[int] = []
        self.in_losses: list[float] = []
        self.losses: list[float] = []

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
        upd = self.draw_updates()
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
            self.act_recv = irecv(shape, self.rank - 1, _TAG_ACT, self.device) if self.step < self.steps else None
            x.requires_grad_(True)
        n = y.shape[0]
        ctx = nn.functional.one_hot(y, self.num_classes).float() if self.conditioned else None
        self.opt.zero_grad(set_to_none=True)
        out = self.net(x, ctx, data)
        if self.last:
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            self.losses.append(float(loss.detach()))
        else:
            self._send(out.detach(), self.rank + 1, _TAG_ACT)  # with synthetic inputs: I's target
            if self.locked:  # wait for the true gradient from above
                if self.boundary is not None:  # train_only: the synthesizer learns from it too
                    self.up.pending.append((self.step, *self.predict(self.boundary.synthesizer, (out, ctx)),
                                            upd[self.hi - 1]))
                grad = self._recv(out.shape, out.dtype, self.rank + 1, _TAG_GRAD)
                out.backward(grad)
                if self.boundary is not None:
                    self.train_synthesizer(self.up.pending.popleft(), grad)
            else:
                # the synthetic gradient now, and the update with it: nothing above is waited for
                delta_hat, snapshot = self.predict(self.boundary.synthesizer, (out, ctx))
                out.backward(delta_hat.detach() * (self.boundary.scale / n))
                self.up.pending.append((self.step, delta_hat, snapshot, upd[self.hi - 1]))
        if not self.first:
            self._send(x.grad, self.rank - 1, _TAG_GRAD)
        self.skip_updates(upd)
        self.opt.step()
        self.sched.step()
        if not self.locked:
            self.take_targets()

    def draw_updates(self) -> list[bool]:
        """Which layer groups update this step (all, without a draw, when ``update_prob`` is 1)."""
        if self.update_prob >= 1.0:
            return [True] * self.groups
        return [bool(torch.rand((), generator=self.update_gen) < self.update_prob) for _ in range(self.groups)]

    def skip_updates(self, upd: list[bool]) -> None:
        """Drop the gradients of this stage's groups that do not update this step (as
        :func:`sgrun.train.skip_updates` does in process); the boundary's synthesizer and the input
        model below follow their groups' coins when their targets arrive."""
        if self.update_prob >= 1.0:
            return
        skipped = [self.net.blocks[k - self.lo] for k in range(self.lo, self.hi) if not upd[k]]
        skipped += [self.net.interfaces[self.net.names[k - self.lo]] for k in range(self.lo, self.hi)
                    if not upd[k] and self.net.names[k - self.lo] in self.net.interfaces]
        if self.net.head is not None and not upd[-1]:
            skipped.append(self.net.head)
        for module in skipped:
            for p in module.parameters():
                p.grad = None

    @staticmethod
    def predict(synth: nn.Module, args: tuple) -> tuple[torch.Tensor, dict]:
        """``synth(*args)``, its graph on a snapshot of the synthesizer's weights (which may have moved
        on by the time the target arrives)."""
        snapshot = {k: p.detach().clone().requires_grad_(True) for k, p in synth.named_parameters()}
        return functional_call(synth, {**snapshot, **dict(synth.named_buffers())}, args), snapshot

    def take_targets(self, drain: bool = False) -> None:
        """Train the synthesizers on the targets that have come back: gradients from above for the
        boundary's ``M``, real activations from below for ``I`` of the cut below.  Wait while
        ``max_inflight`` batches wait for theirs (with ``drain``: until none waits)."""
        for inbox, train in ((self.up, self.train_synthesizer), (self.down, self.train_input_model)):
            while inbox is not None and (got := inbox.take(drain or len(inbox.pending) >= self.max_inflight)):
                train(*got)

    def train_synthesizer(self, waiting: tuple, grad: torch.Tensor) -> None:
        """Regress ``M``'s prediction of an earlier batch on the gradient that came back for it."""
        step, delta_hat, snapshot, update = waiting
        n = grad.shape[0]
        diff = delta_hat.detach() - grad * n  # the per-example target, as in sgrun.dni.interface
        self.sg_losses.append(float(diff.pow(2).flatten(1).sum(1).mean()))
        self._late_step(self.boundary.synthesizer, self.synth_opt, self.synth_sched, delta_hat, snapshot,
                        diff * (2.0 / n), update)
        self.stale.append(self.step - step)

    def train_input_model(self, waiting: tuple, h: torch.Tensor) -> None:
        """Regress ``I``'s prediction of an earlier batch on the real activation that produced it
        below: the gradient of ``mean_i ||h_hat_i - h_i||^2``, as in :mod:`sgrun.dni.forward`."""
        step, h_hat, snapshot, update = waiting
        n = h.shape[0]
        diff = h_hat.detach() - h
        self.in_losses.append(float(diff.pow(2).flatten(1).sum(1).mean()))
        self._late_step(self.below.input_model, self.input_opt, self.input_sched, h_hat, snapshot,
                        diff * (2.0 / n), update)
        self.in_stale.append(self.step - step)

    @staticmethod
    def _late_step(module: nn.Module, opt, sched, pred: torch.Tensor, snapshot: dict, grad_pred: torch.Tensor,
                   update: bool) -> None:
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

    def report(self) -> dict:
        r = {"stale": self.stale, "sg": self.sg_losses, "loss": self.losses, "in_stale": self.in_stale,
             "in_loss": self.in_losses}
        self.stale, self.sg_losses, self.losses, self.in_stale, self.in_losses = [], [], [], [], []
        return r


# --------------------------------------------------------------------------- a stage's process


def stage_main(rank: int, world: int, cfg: DictConfig, out_dir: str, errors=None) -> dict | None:
    """Everything one process does; rank 0 also evaluates and logs.  Returns rank 0's result."""
    from sgrun.train import BatchSampler, budget, classification_error

    cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
    device = device_of(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    backend = cfg.runtime.backend if cfg.runtime.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    data = load_images(cfg.data.name, cfg.data_dir, download=cfg.data.download,
                       **OmegaConf.to_container(cfg.data.options, resolve=True))
    model = full_model(cfg, tuple(data.shape), data.num_classes)
    split = plan_split(model, cfg.runtime)
    if split.stages != world:
        raise ConfigError(f"{world} processes for {split.stages} stages: start as many processes as runtime.stages")
    model.to(device).train()
    full_names = {id(t): k for k, t in list(model.named_parameters()) + list(model.named_buffers())}
    steps, lr, eval_every = budget(cfg)
    # every stage draws the same batches itself (same seed): stages above the first take their labels
    # from it (no label messages), and with synthetic inputs their data too (nothing below is waited for)
    sampler = BatchSampler(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed, device)
    stage = Stage(cfg, rank, split, model, steps, lr, device, sampler)

    timeout = datetime.timedelta(seconds=float(cfg.runtime.timeout))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    ctrl = dist.new_group(backend="gloo", timeout=timeout)
    writer = Writer(Path(out_dir) / "tb" / "pipeline") if rank == 0 else None
    history: list[tuple[int, float]] = []
    seconds: list[float] = []  # training seconds at each evaluation (the slowest stage's, without evaluations)
    # per boundary: [sum, count, max] of the gradient targets' staleness, then of the input targets'
    staleness: dict[str, list[float]] = {} if split.locked else {b: [0.0, 0.0, 0.0] * 2 for b in split.boundaries}
    result = None
    try:
        tick, t_train = time.time(), 0.0
        for step in range(1, steps + 1):
            stage.train_step()
            if step % eval_every == 0 or step == steps:
                if not stage.locked:
                    stage.take_targets(drain=True)
                stage.flush()
                t_train += time.time() - tick
                gathered = [None] * world if rank == 0 else None
                dist.gather_object((stage.state(full_names), stage.report(), t_train), gathered, dst=0, group=ctrl)
                if rank == 0:
                    state = {}
                    for part in gathered:
                        state.update(part[0])
                    model.load_state_dict(state)
                    err = classification_error(model, data.test_x, data.test_y, device)
                    history.append((step, err))
                    seconds.append(round(max(p[2] for p in gathered), 3))
                    rate = step * stage.batch / max(seconds[-1], 1e-9)
                    log_gathered(writer, split, gathered, step, err, rate)
                    for s, cut in enumerate(staleness):
                        for k, stale in ((0, gathered[s][1]["stale"]), (3, gathered[s + 1][1]["in_stale"])):
                            acc = staleness[cut]
                            acc[k], acc[k + 1] = acc[k] + sum(stale), acc[k + 1] + len(stale)
                            acc[k + 2] = max([acc[k + 2], *stale])
                    log.info("step %d/%d  test error %.2f%%  %.0f samples/s", step, steps, err, rate)
                # every stage restarts its clock after rank 0's evaluation, so that no stage counts
                # the time it would otherwise spend waiting on the evaluating stage as training time
                dist.barrier(group=ctrl)
                tick = time.time()
        if rank == 0:
            stale = {cut: {"mean": acc[0] / max(acc[1], 1), "max": int(acc[2])} for cut, acc in staleness.items()}
            if stage.unlocked:  # how late the real activations came to train the synthetic inputs
                for cut, acc in staleness.items():
                    stale[cut].update(input_mean=acc[3] / max(acc[4], 1), input_max=int(acc[5]))
            result = {"metrics": {"test_error": history[-1][1], "best_test_error": min(e for _, e in history),
                                  "steps": steps, "history": history, "seconds": seconds,
                                  "samples_per_sec": steps * stage.batch / max(seconds[-1], 1e-9),
                                  "stages": world, "boundaries": list(split.boundaries),
                                  "locked": split.locked, "staleness": stale},
                      "state": {k: v.cpu() for k, v in model.state_dict().items()}}
        dist.barrier(group=ctrl)
    finally:
        if writer is not None:
            writer.close()
        dist.destroy_process_group()
    return result


def log_gathered(writer: Writer, split: Split, gathered: list, step: int, err: float, rate: float) -> None:
    writer.scalar("error/test", err, step)
    writer.scalar("perf/samples_per_sec", rate, step)
    losses = gathered[-1][1]["loss"]
    if losses:
        writer.scalar("loss/train", sum(losses) / len(losses), step)
    for s, part in enumerate(gathered[:-1]):
        rep, cut = part[1], split.boundaries[s]
        if rep["stale"]:
            writer.scalar(f"pipeline/{cut}/staleness_mean", sum(rep["stale"]) / len(rep["stale"]), step)
            writer.scalar(f"pipeline/{cut}/staleness_max", max(rep["stale"]), step)
        if rep["sg"]:
            writer.scalar(f"dni/{cut}/sg_loss", sum(rep["sg"]) / len(rep["sg"]), step)
        above = gathered[s + 1][1]
        if above["in_stale"]:
            writer.scalar(f"pipeline/{cut}/input_staleness_mean", sum(above["in_stale"]) / len(above["in_stale"]), step)
            writer.scalar(f"pipeline/{cut}/input_staleness_max", max(above["in_stale"]), step)
            writer.scalar(f"dni/{cut}/input_loss", sum(above["in_loss"]) / len(above["in_loss"]), step)


def _spawned(rank: int, world: int, cfg: dict, out_dir: str, port: int, threads: int, errors) -> None:
    """Entry of a process started by :func:`train_pipeline`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops everyone
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        result = stage_main(rank, world, cfg, out_dir)
        if result is not None:
            torch.save(result, Path(out_dir) / RESULT)
    except SgrunError as e:
        errors.put((rank, str(e), None))
        raise SystemExit(3) from None
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        errors.put((rank, f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise SystemExit(3) from None


# --------------------------------------------------------------------------- the launcher


def free_port(port: int) -> int:
    """``port`` if it can be bound (0: any free port); a port in use is a one-line error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"runtime.port={port} is in use: set runtime.port=0 (any free port) or another port") from None
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def train_pipeline(cfg: DictConfig, session) -> tuple[dict, nn.Module | None]:
    """The ``runtime=pipeline`` loop: start the stages (or be one, under torchrun) and return
    rank 0's metrics and the assembled model."""
    if cfg.model.family != "feedforward":
        raise ConfigError(f"runtime=pipeline runs feed-forward models (model=fcn|cnn), not model={cfg.model.name}: "
                          "use runtime=inprocess")
    if cfg.dni.mode == "off" and cfg.dni.cuts:
        raise ConfigError("runtime=pipeline with dni.mode=off: use dni=none for the locked pipeline, or "
                          "dni.mode=synthetic")
    if int(cfg.runtime.max_inflight) < 1:
        raise ConfigError(f"runtime.max_inflight must be >= 1 (got {cfg.runtime.max_inflight}): "
                          "set runtime.max_inflight=2")
    out_dir = Path(session.ckpt.dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    data = load_images(cfg.data.name, cfg.data_dir, download=cfg.data.download,
                       **OmegaConf.to_container(cfg.data.options, resolve=True))
    shape, classes = tuple(data.shape), data.num_classes
    del data
    # the split is checked here too, so that a bad one is one line before any process starts
    plan_split(full_model(cfg, shape, classes), cfg.runtime)
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        result = stage_main(rank, world, cfg, str(out_dir))
        if rank != 0:
            return {"rank": rank}, None
    else:
        result = spawn_stages(cfg, container, out_dir, session)
    model = full_model(cfg, shape, classes)
    model.load_state_dict(result["state"])
    return result["metrics"], model


def full_model(cfg: DictConfig, shape: tuple[int, ...], classes: int) -> nn.Module:
    """The whole feed-forward model, as the in-process run builds it (same seed, same weights)."""
    model = build_model(cfg, in_shape=shape, num_classes=classes, placement=placement_of(cfg.dni))
    model.in_shape, model.num_classes = shape, classes
    model.context_dim = classes if cfg.dni.conditioned else 0
    return model


def spawn_stages(cfg: DictConfig, container: dict, out_dir: Path, session) -> dict:
    import torch.multiprocessing as mp

    world = int(cfg.runtime.stages)
    port = free_port(int(cfg.runtime.port))
    threads = int(cfg.runtime.threads) if cfg.runtime.threads not in (None, "auto") else max(1, (os.cpu_count() or 1) // world)
    (out_dir / RESULT).unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    log.info("pipeline: %d stages, %d thread(s) each, port %d", world, threads, port)
    procs = mp.start_processes(_spawned, args=(world, container, str(out_dir), port, threads, errors),
                               nprocs=world, join=False, start_method="spawn")
    try:
        while not procs.join(timeout=0.5):
            if session.ckpt.stop_signal is not None:
                raise Interrupted("interrupted: all pipeline stages stopped (pipeline runs keep no checkpoint)")
    except mp.ProcessExitedException as e:
        raise SgrunError(stage_failure(e, errors)) from None
    except mp.ProcessRaisedException as e:  # not expected: stages report through `errors`
        raise SgrunError(f"a pipeline stage failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        for p in procs.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    result = torch.load(out_dir / RESULT, weights_only=False)
    (out_dir / RESULT).unlink()
    return result


def stage_failure(e, errors) -> str:
    """The failing stage's own error, not its neighbours' broken connections."""
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    own = [r for r in reports if r[0] == e.error_index]
    first = own[0] if own else (reports[0] if reports else None)
    if e.exit_code is not None and e.exit_code < 0 and not own:
        name = signal.Signals(-e.exit_code).name
        return f"pipeline stage {e.error_index} was killed ({name}); all stages stopped: run again"
    if first is None:
        return f"pipeline stage {e.error_index} exited with code {e.exit_code}; all stages stopped"
    rank, message, trace = first
    if trace:
        log.error("pipeline stage %d:\n%s", rank, trace)
    return f"pipeline stage {rank}: {message}"
