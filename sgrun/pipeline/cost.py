"""What a pipeline of ``S`` stages on ``S`` devices should train per second, from measured times.

Inputs, measured by :mod:`sgrun.bench_pipeline` (:mod:`sgrun.pipeline.timing`, one thread per
stage): per stage the seconds of its forward, backward and optimizer step on one batch, of its
boundary synthesizer's prediction and of its regression on the target, of a forward and backward
on one micro-batch for some micro-batch counts, and the bytes of the activation it sends up (its
gradient comes back at the same size); and a :class:`Link`: seconds per message,
``latency + bytes / bandwidth``.

Each method is a small simulation of the loop that :mod:`sgrun.pipeline.stage` or torch's schedule
runs, every operation starting when its stage is free and its message has arrived:

- ``dni``: each stage runs forward, sends ``h`` up, predicts the synthetic gradient, runs backward
  with it, sends its input gradient down, steps; then regresses its synthesizer on every target
  that has come back, waiting for the oldest while ``max_inflight`` wait.  The step time is that of
  the slowest stage unless the round trip of a target, over ``max_inflight`` steps, is longer;
  staleness is how many steps late each target is taken (at most ``max_inflight - 1``).
- ``locked``: stop-and-wait backprop across the stages (``dni=none``), and with
  ``synthesizers=True`` the same with the synthesizers running and learning
  (``dni.mode=train_only``).
- ``gpipe``: ``M`` micro-batches, all forwards then all backwards, then one optimizer step;
  ``1f1b``: ``min(M, S - s)`` forwards at stage ``s``, then one backward and one forward in turn.
  For equal stages and free messages both take ``(M + S - 1)`` micro-batch forward+backward times
  per step: the bubble, the share of each stage's time it waits, is ``(S - 1) / (M + S - 1)``
  (:func:`bubble`).

``run_seconds`` adds what a measured run pays besides the steady state: the pipeline fills again
after each evaluation (``segments``), and a DNI stage waits for its last targets there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

METHODS = ("dni", "locked", "locked_dni", "gpipe", "1f1b")


@dataclass(frozen=True)
class StageTimes:
    """Seconds of one stage's parts on one batch, and the bytes of its message."""

    fwd: float                  # forward of its blocks (with the loss on the last stage)
    bwd: float                  # backward
    update: float               # optimizer step of its own parameters
    syn_fwd: float = 0.0        # the boundary synthesizer's prediction (0: none)
    syn_update: float = 0.0     # its regression on one target: gradient and optimizer step
    data: float = 0.0           # drawing the batch
    act_bytes: int = 0          # the activation sent up; its gradient comes back at this size
    # (count M, forward, backward) of one of M micro-batches (GPipe, 1F1B), per measured count
    mb: tuple[tuple[int, float, float], ...] = ()

    def micro(self, microbatches: int) -> tuple[float, float]:
        """Forward and backward seconds of one of ``microbatches`` micro-batches: measured for
        that count, else the measured count nearest to it scaled by the size, else the batch's
        share."""
        for m, f, b in self.mb:
            if m == microbatches:
                return f, b
        if self.mb:
            m, f, b = min(self.mb, key=lambda e: abs(math.log(e[0] / microbatches)))
            return f * m / microbatches, b * m / microbatches
        return self.fwd / microbatches, self.bwd / microbatches


@dataclass(frozen=True)
class Link:
    """A message between neighbouring stages takes ``latency + bytes / bandwidth`` seconds; in
    torch's schedules every micro-batch forward or backward also costs its stage ``op_overhead``
    seconds (posting and waiting for its messages, the schedule's own bookkeeping): GPipe's, and
    1F1B's own where it was measured."""

    latency: float
    bandwidth: float  # bytes per second
    op_overhead: float = 0.0
    op_overhead_1f1b: float | None = None  # None: as GPipe's

    def time(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth if nbytes else 0.0

    def overhead(self, kind: str) -> float:
        """The schedule's cost per micro-batch forward or backward (``kind``: gpipe or 1f1b)."""
        if kind == "1f1b" and self.op_overhead_1f1b is not None:
            return self.op_overhead_1f1b
        return self.op_overhead


FREE = Link(0.0, math.inf)


@dataclass(frozen=True)
class Prediction:
    method: str
    step_seconds: float            # steady state
    samples_per_sec: float
    busy: float                    # the stages' mean share of the step spent computing
    staleness_mean: float | None = None
    staleness_max: int | None = None


def bubble(stages: int, microbatches: int) -> float:
    """The share of each stage's time that GPipe and 1F1B leave idle, for equal stages and free
    messages: ``(S - 1) / (M + S - 1)``."""
    if stages < 1 or microbatches < 1:
        raise ValueError("stages and microbatches must be >= 1")
    return (stages - 1) / (microbatches + stages - 1)


def one_device(stages: list[StageTimes], batch: int) -> Prediction:
    """The same model trained by backprop in one process on one device."""
    t = sum(s.data + s.fwd + s.bwd + s.update for s in stages)
    return Prediction("one_device", t, batch / t, 1.0)


# --------------------------------------------------------------------------- simulations


def _dni_segment(stages: list[StageTimes], link: Link, steps: int, k: int):
    """``steps`` steps of the DNI pipeline from an idle start and a final drain: the finishing
    time of every step at every stage (before its target regressions) and the staleness of
    every target taken."""
    n = len(stages)
    ready = [0.0] * n
    fwd_end = [[0.0] * steps for _ in range(n)]
    bwd_end = [[0.0] * steps for _ in range(n)]
    step_end = [[0.0] * steps for _ in range(n)]
    pending: list[list[int]] = [[] for _ in range(n)]
    stale: list[int] = []

    def arrival(s: int, t: int) -> float:  # the target of step t, at stage s, from s + 1
        return bwd_end[s + 1][t] + link.time(stages[s].act_bytes)

    for t in range(steps):
        for s, st in enumerate(stages):
            start = ready[s] + st.data
            if s > 0:
                start = max(start, fwd_end[s - 1][t] + link.time(stages[s - 1].act_bytes))
            fwd_end[s][t] = start + st.fwd
            bwd_end[s][t] = fwd_end[s][t] + (st.syn_fwd if s < n - 1 else 0.0) + st.bwd
            step_end[s][t] = bwd_end[s][t] + st.update
        for s in range(n - 1):  # the last stage has no synthesizer waiting for targets
            now = step_end[s][t]
            pending[s].append(t)
            while pending[s]:
                oldest = pending[s][0]
                if arrival(s, oldest) > now and len(pending[s]) < k:
                    break
                now = max(now, arrival(s, oldest)) + stages[s].syn_update
                stale.append(t - oldest)
                pending[s].pop(0)
            ready[s] = now
        ready[n - 1] = step_end[n - 1][t]
    done = []
    for s in range(n):
        now = ready[s]
        for oldest in pending[s]:  # the drain before an evaluation
            now = max(now, arrival(s, oldest)) + stages[s].syn_update
        done.append(now)
    return step_end, stale, max(done)


def _locked_segment(stages: list[StageTimes], link: Link, steps: int, synthesizers: bool) -> float:
    """Stop-and-wait backprop: forward up the stages, backward down, each stage stepping as soon
    as it has sent its input gradient."""
    n = len(stages)
    ready = [0.0] * n
    for _ in range(steps):
        fwd_end = [0.0] * n
        for s, st in enumerate(stages):
            start = ready[s] + st.data
            if s > 0:
                start = max(start, fwd_end[s - 1] + link.time(stages[s - 1].act_bytes))
            fwd_end[s] = start + st.fwd
        grad_at = math.inf
        for s in reversed(range(n)):
            st = stages[s]
            syn = synthesizers and s < n - 1
            start = fwd_end[s] + (st.syn_fwd if syn else 0.0)
            if s < n - 1:
                start = max(start, grad_at)
            sent = start + st.bwd + (st.syn_update if syn else 0.0)
            if s > 0:
                grad_at = sent + link.time(stages[s - 1].act_bytes)
            ready[s] = sent + st.update
    return max(ready)


def schedule_order(kind: str, stages: int, stage: int, microbatches: int) -> list[tuple[str, int]]:
    """The order in which stage ``stage`` runs forwards (``"F"``) and backwards (``"B"``) of the
    micro-batches in torch's ``ScheduleGPipe`` and ``Schedule1F1B``."""
    m = microbatches
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if kind != "1f1b":
        raise ValueError(f"no schedule {kind!r}")
    warm = min(m, stages - stage)
    order = [("F", i) for i in range(warm)]
    f = warm
    for b in range(m):
        order.append(("B", b))
        if f < m:
            order.append(("F", f))
            f += 1
    return order


def _scheduled_segment(stages: list[StageTimes], link: Link, steps: int, kind: str,
                       microbatches: int) -> float:
    """GPipe or 1F1B steps: every operation once its stage is free and its input has arrived."""
    n, m = len(stages), microbatches
    orders = [schedule_order(kind, n, s, m) for s in range(n)]
    extra = link.overhead(kind)
    micro = [tuple(t + extra for t in st.micro(m)) for st in stages]
    msg = [link.time(st.act_bytes / m) for st in stages]
    ready = [0.0] * n
    for _ in range(steps):
        end: dict[tuple[str, int, int], float] = {}
        clock = [ready[s] + stages[s].data for s in range(n)]
        pos = [0] * n
        while any(pos[s] < len(orders[s]) for s in range(n)):
            moved = False
            for s in range(n):
                while pos[s] < len(orders[s]):
                    op, i = orders[s][pos[s]]
                    if op == "F":
                        dep = 0.0 if s == 0 else end.get(("F", s - 1, i))
                        dep = dep if dep is None or s == 0 else dep + msg[s - 1]
                    else:
                        dep = end.get(("F", s, i)) if s == n - 1 else end.get(("B", s + 1, i))
                        dep = dep if dep is None or s == n - 1 else dep + msg[s]
                    if dep is None:
                        break
                    clock[s] = max(clock[s], dep) + (micro[s][0] if op == "F" else micro[s][1])
                    end[(op, s, i)] = clock[s]
                    pos[s] += 1
                    moved = True
            if not moved:
                raise RuntimeError(f"{kind}: the schedule deadlocks")  # not for valid orders
        ready = [clock[s] + stages[s].update for s in range(n)]
    return max(ready)


def fit_op_overhead(link: Link, act_bytes: float, microbatches: int, measured: float,
                    stages: int = 2, kind: str = "gpipe") -> float:
    """The ``op_overhead`` with which a ``kind`` (gpipe, 1f1b) step of ``stages`` stages that
    compute nothing and send ``act_bytes`` per batch takes ``measured`` seconds (0 if the messages
    alone take that)."""
    null = [StageTimes(0.0, 0.0, 0.0, act_bytes=int(act_bytes))] * stages

    def step(overhead: float) -> float:
        probe = Link(link.latency, link.bandwidth, overhead, overhead)
        return _scheduled_segment(null, probe, 1, kind, microbatches)

    lo, hi = 0.0, max(measured, 0.0)
    if step(lo) >= measured:
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step(mid) < measured else (lo, mid)
    return (lo + hi) / 2


# --------------------------------------------------------------------------- predictions


def run_seconds(method: str, stages: list[StageTimes], link: Link, steps: int, segments: int = 1,
                max_inflight: int = 2, microbatches: int = 1) -> float:
    """Training seconds of a run of ``steps`` steps with ``segments`` evaluations (the pipeline
    starts empty after each), as the benchmark measures them."""
    per = [steps // segments + (1 if i < steps % segments else 0) for i in range(segments)]
    total = 0.0
    for n in (p for p in per if p):
        if method == "dni":
            total += _dni_segment(stages, link, n, max_inflight)[2]
        elif method in ("locked", "locked_dni"):
            total += _locked_segment(stages, link, n, method == "locked_dni")
        elif method in ("gpipe", "1f1b"):
            total += _scheduled_segment(stages, link, n, method, microbatches)
        elif method == "one_device":
            total += n * one_device(stages, 1).step_seconds
        else:
            raise ValueError(f"no method {method!r}: choose from {', '.join(METHODS)}")
    return total


def predict(method: str, stages: list[StageTimes], link: Link, batch: int, max_inflight: int = 2,
            microbatches: int = 1, steps: int = 64) -> Prediction:
    """Steady-state step time, samples/s, busy share and (DNI) staleness of ``method``."""
    if method == "1f1b" and microbatches < len(stages):
        raise ValueError(f"1f1b needs microbatches >= stages ({microbatches} < {len(stages)})")
    half = steps // 2
    work = sum(s.data + s.fwd + s.bwd + s.update for s in stages)
    if method == "dni":
        ends, stale, _ = _dni_segment(stages, link, steps, max_inflight)
        step = max(e[-1] - e[half - 1] for e in ends) / (steps - half)
        work += sum(s.syn_fwd + s.syn_update for s in stages[:-1])
        tail = stale[len(stale) // 2:] or [0]
        mean, worst = sum(tail) / len(tail), max(tail)
    else:
        whole, first = (run_seconds(method, stages, link, n, 1, max_inflight, microbatches)
                        for n in (steps, half))
        step = (whole - first) / (steps - half)
        if method == "locked_dni":
            work += sum(s.syn_fwd + s.syn_update for s in stages[:-1])
        if method in ("gpipe", "1f1b"):
            work = sum(s.data + s.update + microbatches * sum(s.micro(microbatches))
                       for s in stages)
        mean = worst = None
    return Prediction(method, step, batch / step, work / (len(stages) * step), mean, worst)


def deeper(stages: list[StageTimes], count: int) -> list[StageTimes]:
    """``count`` stages made of measured ones: the first, then copies of the last stage's blocks
    carrying the first stage's synthesizer and message, then the last (a model ``count / S``
    times as deep, one measured stage per device)."""
    if count < 2 or len(stages) < 2:
        raise ValueError("deeper needs two measured stages and count >= 2")
    first, last = stages[0], stages[-1]
    middle = replace(last, syn_fwd=first.syn_fwd, syn_update=first.syn_update,
                     act_bytes=first.act_bytes, data=0.0)
    return [first] + [middle] * (count - 2) + [last]


def speedup(method: str, stages: list[StageTimes], link: Link, batch: int, **kw) -> float:
    """Samples/s of ``method`` over those of the same model by backprop on one device."""
    rate = predict(method, stages, link, batch, **kw).samples_per_sec
    return rate / one_device(stages, batch).samples_per_sec
