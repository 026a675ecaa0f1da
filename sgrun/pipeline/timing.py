"""Measured inputs of the cost model (:mod:`sgrun.pipeline.cost`): each stage's parts timed on
one thread, as its process runs them, and the time of a message between two processes.

:func:`measure_stages` builds the stages exactly as a ``runtime=pipeline`` run of the same config
does (same split, same optimizers, same synthesizers) and times, per stage and batch: drawing the
batch, the forward (with the loss on the last stage), the boundary synthesizer's prediction, the
backward (with the synthetic gradient where there is one), the optimizer step, the synthesizer's
regression on a target, and a forward and backward on one micro-batch for each micro-batch count
asked for.  Inputs from another stage and targets are random tensors of the right shapes; every
time is the median of ``repeats`` after ``warmup`` unmeasured rounds.

:func:`measure_stages` times all stages at once, one process each: a stage shares the machine
with the others as it does in the DNI pipeline (on a loaded machine, with everything else too).
With ``turns=True`` the stages take turns instead, as stop-and-wait backprop runs them.

:func:`measure_link` sends messages back and forth between two ``gloo`` processes on this machine,
and times torch's GPipe and 1F1B schedules on two stages with nothing to compute, to find each
one's own cost per micro-batch operation.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sgrun.dni.units import injected
from sgrun.errors import ConfigError
from sgrun.pipeline.cost import Link, StageTimes
from sgrun.pipeline.split import plan_split
from sgrun.pipeline.stage import Stage, annotated
from sgrun.tasks.classification import Classification


def compose(overrides: list[str]) -> DictConfig:
    """The config ``sgrun <overrides>`` would run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sgrun.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


class _Clock:
    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {}
        self.last = time.perf_counter()

    def start(self) -> None:
        self.last = time.perf_counter()

    def lap(self, name: str, keep: bool) -> None:
        now = time.perf_counter()
        if keep:
            self.parts.setdefault(name, []).append(now - self.last)
        self.last = now

    def median(self, name: str) -> float:
        return statistics.median(self.parts[name]) if name in self.parts else 0.0


def measure_stages(cfg: DictConfig, microbatches: Iterable[int] = (), repeats: int = 5,
                   warmup: int = 2, turns: bool = False) -> list[StageTimes]:
    """Per-stage times of ``cfg``'s split (see the module docstring), with micro-batch times for
    each count in ``microbatches`` that divides the batch.  Every stage is timed in its own
    process on one thread, all at the same time (as the DNI pipeline runs them: they share the
    machine's memory and whatever else runs on it); a stage that is done keeps running until
    all are.

    ``turns``: the stages take turns as stop-and-wait backprop runs them (forward up the stages,
    backward down, each stage idle while it waits for its neighbour's message, which is a
    4-byte one here), so that each part is timed as it runs right after such a wait; the waits
    themselves are not timed, and no micro-batch is."""
    import torch.multiprocessing as mp

    if cfg.dni.get("synthetic_input") is not None:
        raise ConfigError(f"dni={cfg.dni.name}: the stage timings cover DNI, cDNI and backprop "
                          "splits, not synthetic inputs: time dni=every_layer|cdni|none")
    container = OmegaConf.to_container(cfg, resolve=True)
    stages = int(cfg.runtime.stages)
    ctx = mp.get_context("spawn")
    results, done = ctx.SimpleQueue(), ctx.Value("i", 0)
    barrier = ctx.Barrier(stages)
    counts = [] if turns else [int(m) for m in microbatches]
    port = None
    if turns:
        from sgrun.pipeline.launch import free_port
        port = free_port(0)
    mp.start_processes(_measure_worker, args=(container, counts, repeats, warmup, barrier, done,
                                              results, port), nprocs=stages, start_method="spawn")
    got = dict(results.get() for _ in range(stages))
    return [got[rank] for rank in range(stages)]


def _measure_worker(rank: int, container: dict, counts: list[int], repeats: int, warmup: int,
                    barrier, done, results, port: int | None = None) -> None:
    torch.set_num_threads(1)
    cfg = OmegaConf.create(container)
    stage = _build_stage(cfg, rank)
    if port is not None:
        _take_turns(stage, port, repeats, warmup, results)
        return
    barrier.wait()
    clock, mclocks = _Clock(), {m: _Clock() for m in counts if stage.batch % m == 0}
    act_bytes, rounds = 0, 0
    with done.get_lock():
        total = done.value
    while rounds < warmup + repeats or total < barrier.parties:
        keep = warmup <= rounds < warmup + repeats
        out = _one_step(stage, clock, keep)
        act_bytes = 0 if stage.last else out.numel() * out.element_size()
        for m, mclock in mclocks.items():
            _one_micro(stage, stage.batch // m, mclock, keep)
        rounds += 1
        with done.get_lock():
            if rounds == warmup + repeats:
                done.value += 1
            total = done.value
    mb = tuple((m, c.median("fwd"), c.median("bwd")) for m, c in mclocks.items())
    results.put((rank, _stage_times(clock, act_bytes, mb)))


def _stage_times(clock: _Clock, act_bytes: int, mb: tuple = ()) -> StageTimes:
    """The medians of ``clock``'s parts."""
    return StageTimes(fwd=clock.median("fwd"), bwd=clock.median("bwd"),
                      update=clock.median("update"), syn_fwd=clock.median("syn_fwd"),
                      syn_update=clock.median("syn_update"), data=clock.median("data"),
                      act_bytes=act_bytes, mb=mb)


def _take_turns(stage: Stage, port: int, repeats: int, warmup: int, results) -> None:
    """``warmup + repeats`` steps of every stage in stop-and-wait order (see
    :func:`measure_stages`)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    s, n = stage.rank, stage.split.stages
    dist.init_process_group("gloo", rank=s, world_size=n)
    token = torch.zeros(1)
    try:
        def below() -> None:  # the activation from below
            if s > 0:
                dist.recv(token, s - 1)

        def above() -> None:  # the activation goes up, its gradient comes back
            if s < n - 1:
                dist.send(token, s + 1)
                dist.recv(token, s + 1)

        def down() -> None:  # the gradient of the input goes back down
            if s > 0:
                dist.send(token, s - 1)

        clock = _Clock()
        out = None
        for r in range(warmup + repeats):
            below()
            out = _one_step(stage, clock, warmup <= r, waits=(above, down))
        results.put((s, _stage_times(clock, 0 if stage.last else out.numel() * out.element_size())))
    finally:
        dist.destroy_process_group()


def _build_stage(cfg: DictConfig, rank: int) -> Stage:
    """Stage ``rank`` as a pipeline process builds it (same seed, same weights and split)."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    task = Classification(cfg, device)
    model = annotated(task.model, cfg, tuple(task.data.shape), task.data.num_classes).train()
    return Stage(cfg, rank, plan_split(model, cfg.runtime), task, 10**9, device)


def _input(stage: Stage, n: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The data (first stage) or a random activation from below, and the labels."""
    if stage.first:
        x, y = stage.sampler.next()
        return x[:n], y[:n]
    y = stage.sampler.next_labels()[:n]
    return torch.randn(n, *stage.in_shape).requires_grad_(True), y


def _one_step(stage: Stage, clock: _Clock, keep: bool, waits: tuple | None = None
              ) -> torch.Tensor:
    """One step's parts, in the order :meth:`Stage.train_step` runs them; ``waits``: what to wait
    for after the forward and after the backward (not timed), as stop-and-wait backprop does."""
    clock.start()
    x, y = _input(stage, stage.batch)
    n = y.shape[0]
    clock.lap("data", keep)
    ctx = stage.task.context(y)
    stage.opt.zero_grad(set_to_none=True)
    out = stage.net(x, ctx, x if stage.unlocked else None)
    loss = stage.task.loss(out, y) if stage.last else None
    clock.lap("fwd", keep)
    synthetic = stage.boundary is not None and not stage.last
    if synthetic:
        delta_hat, snapshot = stage.predict(stage.boundary.synthesizer, (out, ctx))
        clock.lap("syn_fwd", keep)
    if waits is not None:
        waits[0]()
        clock.start()
    if loss is not None:
        loss.backward()
    elif synthetic:
        out.backward(injected(delta_hat.detach(), stage.boundary.scale, n))
    else:
        out.backward(torch.randn_like(out) / n)
    clock.lap("bwd", keep)
    if waits is not None:
        waits[1]()
        clock.start()
    stage.opt.step()
    stage.sched.step()
    clock.lap("update", keep)
    if synthetic:
        target = torch.randn_like(out) / n
        clock.start()
        stage.train_synthesizer((stage.step, delta_hat, snapshot, True), target)
        clock.lap("syn_update", keep)
    return out.detach()


def _one_micro(stage: Stage, n: int, clock: _Clock, keep: bool) -> None:
    """The forward and backward of one micro-batch of ``n`` examples (backprop, no synthesizer)."""
    x, y = _input(stage, n)
    clock.start()
    out = stage.net(x, None, None)
    loss = stage.task.loss(out, y) if stage.last else None
    clock.lap("fwd", keep)
    if loss is not None:
        loss.backward()
    else:
        out.backward(torch.randn_like(out) / n)
    clock.lap("bwd", keep)


# --------------------------------------------------------------------------- messages


class _Null(nn.Module):
    """A stage with (almost) nothing to compute, to time a schedule's own cost."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.w


def _ping(rank: int, port: int, sizes: list[int], repeats: int, probe: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        times = []
        for size in sizes:
            buf = torch.zeros(max(1, size // 4))
            rounds = []  # seconds of each round trip, the first two left out (warm-up)
            dist.barrier()
            for _ in range(repeats + 2):
                start = time.perf_counter()
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                rounds.append(time.perf_counter() - start)
            # the median round trip: one late wake-up of either process moves a mean by far more
            # than the message costs
            times.append(statistics.median(rounds[2:]) / 2)
        steps = {kind: {m: _null_schedule(rank, *probe[:2], m, repeats, kind) for m in probe[2]
                        if m >= 2 or kind == "gpipe"} for kind in ("gpipe", "1f1b")}
        if rank == 0:
            results.put((times, steps))
    finally:
        dist.destroy_process_group()


def _null_schedule(rank: int, batch: int, width: int, microbatches: int, repeats: int,
                   kind: str = "gpipe") -> float:
    """Median seconds of a ``kind`` (gpipe, 1f1b) step over two :class:`_Null` stages whose
    messages are those of the real stages."""
    from torch.distributed import pipelining

    from sgrun.pipeline.split import TORCH_SCHEDULES

    mb = batch // microbatches
    stage = pipelining.PipelineStage(
        _Null(), rank, 2, torch.device("cpu"),
        input_args=torch.empty(mb, width).requires_grad_(rank == 1),
        output_args=torch.empty(mb, width).requires_grad_(True))
    schedule = getattr(pipelining, TORCH_SCHEDULES[kind])(stage, microbatches,
                                                          loss_fn=lambda out, _: out.mean())
    x = torch.randn(batch, width)
    times = []
    for _ in range(repeats + 2):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            schedule.step(x, return_outputs=False)
        else:
            schedule.step(target=x, return_outputs=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def measure_link(nbytes: int, batch: int, microbatches: Iterable[int] = (), repeats: int = 100
                 ) -> tuple[Link, dict]:
    """The :class:`Link` between two processes on this machine: latency and bandwidth from the
    one-way seconds of a 4-byte message and of one of ``nbytes`` (a batch's activation), and the
    per-operation overhead of each of torch's schedules (GPipe, 1F1B), fitted to its steps with
    nothing to compute and the same messages, for each count in ``microbatches``."""
    import torch.multiprocessing as mp

    from sgrun.pipeline import cost
    from sgrun.pipeline.launch import free_port

    sizes = [4, max(8, int(nbytes))]
    width = max(1, int(nbytes) // 4 // batch)
    counts = [int(m) for m in microbatches if batch % int(m) == 0]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_ping, args=(free_port(0), sizes, repeats, (batch, width, counts), results),
                       nprocs=2, start_method="spawn")
    (small, large), steps = results.get()
    extra = large - small
    link = cost.Link(small, (sizes[1] - sizes[0]) / extra if extra > 0 else float("inf"))
    fitted = {kind: {m: cost.fit_op_overhead(link, 4 * width * batch, m, t, kind=kind)
                     for m, t in by_count.items()} for kind, by_count in steps.items()}
    if fitted["gpipe"]:
        link = cost.Link(link.latency, link.bandwidth, statistics.mean(fitted["gpipe"].values()),
                         (statistics.mean(fitted["1f1b"].values()) if fitted["1f1b"] else None))
    return link, {"one_way": dict(zip(sizes, (small, large))),
                  "null_gpipe_step": steps["gpipe"], "op_overhead": fitted["gpipe"],
                  "null_1f1b_step": steps["1f1b"], "op_overhead_1f1b": fitted["1f1b"]}
