"""runtime.schedule=gpipe|1f1b (torch.distributed.pipelining) and the pipeline cost model.

Runs compared bit for bit use one torch thread per process on both sides.
"""

from pathlib import Path

import clirun
import pytest
import torch
from clirun import sgrun
from configs import make_cfg
from torch import nn

from sgrun.errors import ConfigError
from sgrun.pipeline import cost, plan_split
from sgrun.pipeline.split import check_schedule, max_inflight
from sgrun.pipeline.stage import full_model

TINY = ["data=synthetic", "device=cpu", "profile=paper", "train.steps=12", "train.eval_every=6",
        "train.batch_size=32", "train.log_every=6", "checkpoint.every=0", "model.layers=4",
        "dni=none"]
PIPE = ["runtime=pipeline", "runtime.threads=1"]


def trained(tmp_path: Path, name: str, *overrides: str, env=None) -> tuple[dict, dict]:
    return clirun.trained(tmp_path, name, *TINY, *overrides, env=env)


def differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_gpipe_with_one_microbatch_is_the_in_process_bprop_run(tmp_path):
    m_in, w_in = trained(tmp_path, "in", env={"OMP_NUM_THREADS": "1"})
    m_pipe, w_pipe = trained(tmp_path, "gpipe", *PIPE, "runtime.schedule=gpipe",
                             "runtime.microbatches=1")
    assert not differing(w_in, w_pipe)  # BatchNorm statistics included
    assert m_in["history"] == m_pipe["history"]
    assert m_pipe["locked"] is True and m_pipe["staleness"] == {}


def accumulated(tmp_path: Path, microbatches: int) -> dict:
    """In-process Bprop with gradient accumulation over ``microbatches`` micro-batches: the
    gradients of the micro-batches' mean losses summed, then divided by their number."""
    from sgrun.build import build_images, build_optimizer
    from sgrun.tasks.classification import BatchSampler

    cfg = make_cfg(*TINY, f"data_dir={tmp_path / 'data'}")
    steps, batch = int(cfg.train.steps), int(cfg.train.batch_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)  # as every pipeline stage does before building the model
        data = build_images(cfg)
        model = full_model(cfg, tuple(data.shape), data.num_classes).train()
        opt, sched = build_optimizer(cfg, list(model.parameters()), [], steps)
        sampler = BatchSampler(data.train_x, data.train_y, batch, cfg.seed, torch.device("cpu"))
        for _ in range(steps):
            x, y = sampler.next()
            opt.zero_grad(set_to_none=True)
            for xc, yc in zip(x.tensor_split(microbatches), y.tensor_split(microbatches)):
                nn.functional.cross_entropy(model(xc), yc).backward()
            for p in model.parameters():
                p.grad.div_(microbatches)
            opt.step()
            sched.step()
        return {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, stages", [("gpipe", 2), ("1f1b", 2), ("1f1b", 3)])
def test_microbatched_schedules_equal_in_process_gradient_accumulation(tmp_path, schedule, stages):
    # With 4 micro-batches each is normalised by its own BatchNorm statistics, so the run is not
    # full-batch Bprop; it is, bit for bit, the same micro-batches accumulated in one process
    _, w_pipe = trained(tmp_path, schedule, *PIPE, f"runtime.schedule={schedule}",
                        "runtime.microbatches=4", f"runtime.stages={stages}")
    assert not differing(accumulated(tmp_path, 4), w_pipe)
    _, w_full = trained(tmp_path, "in", env={"OMP_NUM_THREADS": "1"})
    assert differing(w_full, w_pipe)  # BatchNorm on micro-batches is another computation


def test_microbatch_gradients_are_the_batch_gradient_up_to_rounding_but_for_batchnorm():
    # Why a micro-batched run differs from the in-process one: the mean of the micro-batches' mean
    # losses is the batch's mean loss, but their gradients are summed in another order (equal to
    # a few ulps, not bit for bit), and BatchNorm in training normalises each micro-batch by its
    # own statistics (a real difference)
    cfg = make_cfg("data=synthetic", "model=fcn", "model.layers=4", "dni=none")
    torch.manual_seed(0)
    model = full_model(cfg, (1, 8, 8), 10)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))

    def grads(micro: int, train: bool) -> list[torch.Tensor]:
        model.train(train)
        model.zero_grad(set_to_none=True)
        for xc, yc in zip(x.tensor_split(micro), y.tensor_split(micro)):
            nn.functional.cross_entropy(model(xc), yc).backward()
        return [p.grad / micro for p in model.parameters()]

    # fixed statistics (eval mode): the same gradient to rounding
    for a, b in zip(grads(1, False), grads(4, False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # batch statistics: BatchNorm makes the micro-batched gradient another one
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5)
               for a, b in zip(grads(1, True), grads(4, True)))


# --------------------------------------------------------------------------- refusals


def schedule_cfg(*overrides: str):
    cfg = make_cfg(*TINY, "runtime=pipeline", *overrides)
    return cfg, plan_split(full_model(cfg, (1, 28, 28), 10), cfg.runtime)


@pytest.mark.parametrize("overrides, words", [
    (["runtime.schedule=pipedream"], ["runtime.schedule must be dni, gpipe or 1f1b"]),
    (["runtime.schedule=gpipe", "runtime.microbatches=0"],
     ["runtime.microbatches must be an integer >= 1"]),
    (["runtime.schedule=gpipe", "runtime.microbatches=5"],
     ["does not divide train.batch_size=32", "runtime.microbatches=4"]),
    (["runtime.schedule=1f1b", "runtime.microbatches=1"],
     ["1f1b needs runtime.microbatches >= runtime.stages", "runtime.microbatches=2"]),
    (["runtime.microbatches=4"], ["needs runtime.schedule=gpipe or 1f1b"]),
    (["runtime.schedule=gpipe", "dni=every_layer"], ["trains by backprop alone", "dni=none"]),
    (["runtime.schedule=gpipe", "dni=every_layer", "dni.mode=train_only"],
     ["trains by backprop alone"]),
    (["runtime.schedule=gpipe", "runtime.max_inflight=3"], ["applies to runtime.schedule=dni"]),
    (["runtime.max_inflight=many"], ["runtime.max_inflight must be >= 1 or auto"]),
])
def test_a_schedule_the_pipeline_cannot_honour_is_refused(overrides, words):
    cfg, split = schedule_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        check_schedule(cfg, split)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_max_inflight_auto_and_honoured_values():
    assert max_inflight(schedule_cfg()[0].runtime) == 2  # the DNI pipeline's default
    for overrides in (["runtime.schedule=gpipe"], ["runtime.schedule=1f1b",
                                                   "runtime.microbatches=2"]):
        cfg, split = schedule_cfg(*overrides)
        check_schedule(cfg, split)
        assert max_inflight(cfg.runtime) == 1
    cfg, split = schedule_cfg("runtime.schedule=gpipe", "runtime.max_inflight=1")
    check_schedule(cfg, split)  # one batch in flight is what GPipe does


@pytest.mark.parametrize("overrides, words", [
    (["runtime.schedule=gpipe", "runtime.microbatches=5"], ["does not divide"]),
    (["runtime.schedule=1f1b"], ["1f1b needs runtime.microbatches >= runtime.stages"]),
])
def test_bad_schedule_on_the_command_line_is_one_line(tmp_path, overrides, words):
    done = sgrun(*TINY, *PIPE, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-1500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


# --------------------------------------------------------------------------- the cost model


def equal(stages: int, fwd=1.0, bwd=2.0, update=0.0, **kw) -> list[cost.StageTimes]:
    return [cost.StageTimes(fwd=fwd, bwd=bwd, update=update, **kw) for _ in range(stages)]


def test_bubble_formula():
    assert cost.bubble(1, 1) == 0.0
    assert cost.bubble(2, 1) == pytest.approx(0.5)
    assert cost.bubble(4, 4) == pytest.approx(3 / 7)
    assert cost.bubble(8, 32) == pytest.approx(7 / 39)
    with pytest.raises(ValueError):
        cost.bubble(0, 4)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages, micro", [(2, 4), (4, 4), (4, 8), (8, 16), (3, 7)])
def test_scheduled_pipelines_on_equal_stages_have_the_bubble(kind, stages, micro):
    # equal stages, free messages, micro-batches of a 1/M share: (M + S - 1) (f + b) per step
    p = cost.predict(kind, equal(stages), cost.FREE, batch=64, microbatches=micro)
    assert p.step_seconds == pytest.approx((micro + stages - 1) * 3.0 / micro)
    assert 1 - p.busy == pytest.approx(cost.bubble(stages, micro))
    assert p.samples_per_sec == pytest.approx(64 / p.step_seconds)


def test_schedule_orders_follow_torch():
    # ScheduleGPipe: all forwards, then all backwards; Schedule1F1B: min(M, S - s) forwards at
    # stage s, then one backward and one forward in turn
    assert cost.schedule_order("gpipe", 2, 0, 3) == [("F", 0), ("F", 1), ("F", 2),
                                                     ("B", 0), ("B", 1), ("B", 2)]
    assert cost.schedule_order("1f1b", 2, 0, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2),
                                                    ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert cost.schedule_order("1f1b", 2, 1, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1),
                                                    ("F", 2), ("B", 2)]


def test_micro_batch_times_measured_or_scaled():
    st = cost.StageTimes(fwd=4.0, bwd=8.0, update=0.0, mb=((4, 1.5, 3.0), (16, 0.5, 1.0)))
    assert st.micro(4) == (1.5, 3.0)             # measured
    assert st.micro(6) == pytest.approx((1.0, 2.0))  # the nearest measured count, by size
    assert cost.StageTimes(fwd=4.0, bwd=8.0, update=0.0).micro(4) == (1.0, 2.0)
    # measured micro-batches slower than a 1/M share lengthen the step accordingly
    slow = [cost.StageTimes(fwd=1.0, bwd=2.0, update=0.0, mb=((4, 0.5, 1.0),))] * 2
    p = cost.predict("gpipe", slow, cost.FREE, batch=64, microbatches=4)
    assert p.step_seconds == pytest.approx(5 * 1.5)


def test_dni_pipeline_runs_at_its_slowest_stage():
    stages = [cost.StageTimes(1.0, 2.0, 0.1, syn_fwd=0.2, syn_update=0.3),
              cost.StageTimes(1.5, 3.0, 0.2)]
    p = cost.predict("dni", stages, cost.FREE, batch=100, max_inflight=2)
    # stage 0: 1 + 0.2 + 2 + 0.1 + 0.3 = 3.6 s; stage 1: 4.7 s sets the pace
    assert p.step_seconds == pytest.approx(4.7)
    assert p.samples_per_sec == pytest.approx(100 / 4.7)
    assert p.staleness_max <= 1


def test_dni_round_trip_and_max_inflight():
    # with max_inflight=1 stage 0 waits for each target: its forward 1, a message 0.5, stage 1's
    # forward and backward 3, a message 0.5, then its regression 0.3; with 2 in flight the round
    # trip hides behind the next step, and each target comes one step late
    stages = [cost.StageTimes(1.0, 2.0, 0.1, syn_fwd=0.2, syn_update=0.3, act_bytes=1000),
              cost.StageTimes(1.0, 2.0, 0.1)]
    link = cost.Link(latency=0.5, bandwidth=1e12)
    one = cost.predict("dni", stages, link, batch=10, max_inflight=1)
    assert one.step_seconds == pytest.approx(1 + 0.5 + 3 + 0.5 + 0.3, rel=1e-6)
    assert one.staleness_max == 0
    two = cost.predict("dni", stages, link, batch=10, max_inflight=2)
    assert two.step_seconds == pytest.approx(1 + 0.2 + 2 + 0.1 + 0.3)
    assert two.staleness_mean == pytest.approx(1.0) and two.staleness_max == 1
    # a synthesizer time given to the last stage is ignored: it has none
    top = [stages[0], cost.StageTimes(1.0, 2.0, 0.1, syn_fwd=5.0, syn_update=5.0)]
    assert cost.predict("dni", top, link, 10).step_seconds == pytest.approx(two.step_seconds)


def test_locked_and_one_device():
    stages = [cost.StageTimes(1.0, 2.0, 0.5, syn_fwd=0.1, syn_update=0.2, act_bytes=100),
              cost.StageTimes(1.0, 2.0, 0.5)]
    link = cost.Link(latency=0.25, bandwidth=1e12)
    # stop-and-wait: both forwards and backwards, two messages, stage 0's update (stage 1 steps
    # while stage 0 runs its backward)
    locked = cost.predict("locked", stages, link, batch=10)
    assert locked.step_seconds == pytest.approx(6 + 0.5 + 0.5, rel=1e-6)
    # with the synthesizers learning: stage 0 also regresses before its backward ends
    # (the prediction overlaps stage 1's work)
    train_only = cost.predict("locked_dni", stages, link, batch=10)
    assert train_only.step_seconds == pytest.approx(7 + 0.2, rel=1e-6)
    assert cost.one_device(stages, 10).step_seconds == pytest.approx(7.0)
    # DNI: stage 0's 1 + 0.1 + 2 + 0.5 + 0.2 sets the pace
    assert cost.speedup("dni", stages, link, 10) == pytest.approx(7.0 / 3.8)


def test_run_seconds_pays_the_fill_after_every_evaluation():
    stages = equal(2, update=0.0)
    steady = cost.predict("dni", stages, cost.FREE, batch=1).step_seconds
    one = cost.run_seconds("dni", stages, cost.FREE, steps=20, segments=1)
    five = cost.run_seconds("dni", stages, cost.FREE, steps=20, segments=5)
    assert one == pytest.approx(20 * steady + 1.0)      # the first forward of stage 0, once
    assert five == pytest.approx(20 * steady + 5 * 1.0)  # and after each evaluation
    assert cost.run_seconds("one_device", stages, cost.FREE, 20) == pytest.approx(120.0)


def test_schedule_overhead_is_fitted_to_a_step_with_nothing_to_compute():
    link = cost.Link(latency=1e-4, bandwidth=1e9)
    null = [cost.StageTimes(0.0, 0.0, 0.0, act_bytes=4096)] * 2
    with_overhead = cost.Link(link.latency, link.bandwidth, op_overhead=2e-3)
    step = cost.predict("gpipe", null, with_overhead, batch=8, microbatches=4, steps=4).step_seconds
    assert cost.fit_op_overhead(link, 4096, 4, step) == pytest.approx(2e-3, rel=1e-6)
    assert cost.fit_op_overhead(link, 4096, 4, 0.0) == 0.0  # the messages alone take longer
    # each micro-batch forward and backward pays it: equal stages take (M + S - 1) (f + b + 2 o)
    p = cost.predict("gpipe", equal(2), with_overhead, batch=8, microbatches=4)
    assert p.step_seconds > (4 + 1) * (3.0 / 4 + 2 * 2e-3)
    # 1F1B's own overhead, fitted to its own null step, and used for 1F1B only
    own = cost.Link(link.latency, link.bandwidth, op_overhead=2e-3, op_overhead_1f1b=5e-4)
    step = cost.predict("1f1b", null, own, batch=8, microbatches=4, steps=4).step_seconds
    assert cost.fit_op_overhead(link, 4096, 4, step, kind="1f1b") == pytest.approx(5e-4, rel=1e-6)
    assert (cost.predict("gpipe", equal(2), own, batch=8, microbatches=4).step_seconds
            == p.step_seconds)
    assert (cost.predict("1f1b", equal(2), own, batch=8, microbatches=4).step_seconds
            < cost.predict("1f1b", equal(2), with_overhead, batch=8, microbatches=4).step_seconds)


def test_deeper_models_and_refusals():
    first = cost.StageTimes(1.0, 2.0, 0.1, syn_fwd=0.2, syn_update=0.3, data=0.05, act_bytes=8)
    last = cost.StageTimes(1.5, 3.0, 0.2)
    four = cost.deeper([first, last], 4)
    assert four[0] == first and four[-1] == last and len(four) == 4
    assert four[1].fwd == 1.5 and four[1].syn_fwd == 0.2 and four[1].act_bytes == 8
    assert four[1].data == 0.0
    with pytest.raises(ValueError, match="1f1b needs microbatches >= stages"):
        cost.predict("1f1b", four, cost.FREE, batch=8, microbatches=2)
    with pytest.raises(ValueError, match="no method"):
        cost.run_seconds("pipedream", four, cost.FREE, 4)


@pytest.mark.slow  # a process per stage
def test_stage_timings_measure_each_stage_of_a_split():
    from sgrun.pipeline.timing import compose, measure_stages

    base = ["model=fcn", "model.layers=4", "data=synthetic", "device=cpu", "runtime=pipeline",
            "train.batch_size=32"]
    dni = measure_stages(compose([*base, "dni=cdni"]), repeats=2, warmup=1)
    assert len(dni) == 2 and all(t.fwd > 0 and t.bwd > 0 for t in dni)
    assert dni[0].syn_fwd > 0 and dni[1].syn_fwd == 0  # the boundary's synthesizer runs below it
    locked = measure_stages(compose([*base, "dni=none"]), microbatches=[2], repeats=2, warmup=1)
    assert [m for m, _, _ in locked[0].mb] == [2]
    # stop-and-wait: three stages taking turns, no micro-batches
    turns = measure_stages(compose([*base, "dni=none", "runtime.stages=3"]), microbatches=[2],
                           repeats=2, warmup=1, turns=True)
    assert len(turns) == 3 and all(t.fwd > 0 and t.bwd > 0 and t.mb == () for t in turns)
    assert [t.act_bytes > 0 for t in turns] == [True, True, False]
    with pytest.raises(ConfigError, match="not synthetic inputs"):
        measure_stages(compose([*base, "dni=complete_unlock"]))


@pytest.mark.slow  # two processes
def test_the_link_is_measured_between_two_processes():
    from sgrun.pipeline.timing import measure_link

    link, raw = measure_link(4 * 32 * 64, 32, microbatches=[2], repeats=5)
    small, large = raw["one_way"].values()
    assert 0 < small and 0 < large and link.latency == small
    assert link.bandwidth > 0 and link.op_overhead >= 0
    assert list(raw["null_gpipe_step"]) == [2] and raw["null_gpipe_step"][2] > 0
    assert list(raw["null_1f1b_step"]) == [2] and raw["null_1f1b_step"][2] > 0
    assert link.op_overhead_1f1b is not None and link.op_overhead_1f1b >= 0
