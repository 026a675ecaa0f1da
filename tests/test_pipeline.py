"""runtime=pipeline: one process per stage (sgrun/pipeline.py).

Every run here is the installed ``sgrun`` in a subprocess, on the generated dataset.  Runs that are
compared bit for bit use one torch thread per process on both sides.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import clirun
import pytest
import torch
from clirun import log_lines_above_the_bar, on_terminal, sgrun
from configs import make_cfg

from sgrun.errors import ConfigError, SgrunError
from sgrun.pipeline import block_costs, plan_split
from sgrun.pipeline.stage import full_model

pytestmark = pytest.mark.slow  # several processes per test (make test-fast skips them)

TINY = ["data=synthetic", "device=cpu", "profile=paper", "train.steps=12", "train.eval_every=6",
        "train.batch_size=32", "train.log_every=6", "checkpoint.every=0"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def trained(tmp_path: Path, name: str, *overrides: str, env=None) -> tuple[dict, dict]:
    return clirun.trained(tmp_path, name, *TINY, *overrides, env=env)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"differ: {differ}"


PIPE = ["runtime=pipeline", "runtime.threads=1"]


def test_one_stage_is_the_in_process_run(tmp_path):
    m_in, w_in = trained(tmp_path, "in", "dni=every_layer", env=ONE_THREAD)
    m_pipe, w_pipe = trained(tmp_path, "pipe", "dni=every_layer", *PIPE, "runtime.stages=1")
    assert_same_weights(w_in, w_pipe)
    assert m_in["history"] == m_pipe["history"]


def test_two_stages_without_overlap_equal_in_process_dni_bit_for_bit(tmp_path):
    m_in, w_in = trained(tmp_path, "in", "dni=every_layer", "model.layers=4", env=ONE_THREAD)
    m_pipe, w_pipe = trained(tmp_path, "pipe", "dni=every_layer", "model.layers=4", *PIPE,
                             "runtime.stages=2", "runtime.max_inflight=1",
                             "runtime.boundaries=[h2]")
    # synthesizers and BatchNorm statistics included
    assert_same_weights(w_in, w_pipe)
    assert m_in["history"] == m_pipe["history"]
    assert m_pipe["staleness"] == {"h2": {"mean": 0.0, "max": 0}}


def test_cdni_three_stages_without_overlap_equal_in_process(tmp_path):
    _, w_in = trained(tmp_path, "in", "dni=cdni", "model.layers=4", env=ONE_THREAD)
    _, w_pipe = trained(tmp_path, "pipe", "dni=cdni", "model.layers=4", *PIPE, "runtime.stages=3",
                        "runtime.max_inflight=1")
    assert_same_weights(w_in, w_pipe)


def test_locked_pipeline_with_learning_synthesizers_equals_train_only(tmp_path):
    # dni.mode=train_only: the true gradient crosses the stages,
    # the synthesizers still learn from it
    only = ["dni=every_layer", "dni.mode=train_only", "model.layers=4"]
    _, w_in = trained(tmp_path, "in", *only, env=ONE_THREAD)
    m_pipe, w_pipe = trained(tmp_path, "pipe", *only, *PIPE, "runtime.stages=2",
                             "runtime.max_inflight=3")
    assert_same_weights(w_in, w_pipe)
    assert m_pipe["locked"] is True


def test_locked_pipeline_is_backprop(tmp_path):
    _, w_in = trained(tmp_path, "in", "dni=none", "model.layers=4", env=ONE_THREAD)
    m_pipe, w_pipe = trained(tmp_path, "pipe", "dni=none", "model.layers=4", *PIPE,
                             "runtime.stages=3")
    assert_same_weights(w_in, w_pipe)
    assert m_pipe["locked"] is True and m_pipe["staleness"] == {}


def test_overlap_changes_the_run_and_staleness_stays_bounded(tmp_path):
    _, w_in = trained(tmp_path, "in", "dni=every_layer", env=ONE_THREAD)
    m, w = trained(tmp_path, "pipe", "dni=every_layer", *PIPE, "runtime.max_inflight=3",
                   "train.steps=30", "train.eval_every=10")
    stale = m["staleness"]["h1"]
    assert 0 <= stale["mean"] <= stale["max"] <= 2  # at most max_inflight - 1 steps late
    assert m["samples_per_sec"] > 0 and len(m["seconds"]) == len(m["history"]) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "pipe" / "tb" / "pipeline")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"error/test", "loss/train", "perf/samples_per_sec", "pipeline/h1/staleness_mean",
            "pipeline/h1/staleness_max", "dni/h1/sg_loss"} <= tags


def test_complete_unlock_two_stages_without_overlap_equal_in_process(tmp_path):
    # stage 1 runs on I(x) from its own copy of the batches; h from stage 0 only trains I
    unlock = ["dni=complete_unlock", "model.layers=4"]
    m_in, w_in = trained(tmp_path, "in", *unlock, env=ONE_THREAD)
    m_pipe, w_pipe = trained(tmp_path, "pipe", *unlock, *PIPE, "runtime.stages=2",
                             "runtime.max_inflight=1", "runtime.boundaries=[h2]")
    # input models, synthesizers and BatchNorm statistics included
    assert_same_weights(w_in, w_pipe)
    assert m_in["history"] == m_pipe["history"]
    assert m_pipe["staleness"] == {"h2": {"mean": 0.0, "max": 0, "input_mean": 0.0, "input_max": 0}}


def test_complete_unlock_cdni_three_stages_without_overlap_equal_in_process(tmp_path):
    unlock = ["dni=complete_unlock_cdni", "model.layers=4"]
    _, w_in = trained(tmp_path, "in", *unlock, env=ONE_THREAD)
    _, w_pipe = trained(tmp_path, "pipe", *unlock, *PIPE, "runtime.stages=3",
                        "runtime.max_inflight=1")
    assert_same_weights(w_in, w_pipe)


def test_complete_unlock_overlap_bounds_both_stalenesses(tmp_path):
    m, _ = trained(tmp_path, "pipe", "dni=complete_unlock", *PIPE, "runtime.max_inflight=3",
                   "train.steps=30", "train.eval_every=10")
    stale = m["staleness"]["h1"]
    assert (0 <= stale["mean"] <= stale["max"] <= 2
            and 0 <= stale["input_mean"] <= stale["input_max"] <= 2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "pipe" / "tb" / "pipeline")).Reload()
    assert {"pipeline/h1/input_staleness_mean", "pipeline/h1/input_staleness_max",
            "dni/h1/input_loss", "dni/h1/sg_loss"} <= set(events.Tags()["scalars"])


def curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder)).Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def test_pipeline_logs_every_log_every_steps_as_the_engine_does(tmp_path):
    # log_every=4 with evaluations at 6 and 12: the intervals 1-4, 5-8 and 9-12, the second one
    # spanning an evaluation; without overlap the stages' curves are the in-process run's
    every = ["dni=every_layer", "model.layers=4", "train.log_every=4"]
    trained(tmp_path, "in", *every, env=ONE_THREAD)
    trained(tmp_path, "pipe", *every, *PIPE, "runtime.max_inflight=1", "runtime.boundaries=[h2]")
    ours, engine = curves(tmp_path / "pipe" / "tb" / "pipeline"), curves(tmp_path / "in" / "tb")
    # the boundary's synthesizer, and those inside each stage (h1 in stage 0, h3 in stage 1)
    for tag in ("loss/train", "dni/h2/sg_loss", "dni/h1/sg_loss", "dni/h3/sg_loss"):
        assert [s for s, _ in ours[tag]] == [4, 8, 12], tag
        assert [v for _, v in ours[tag]] == pytest.approx([v for _, v in engine[tag]], rel=1e-5)
    assert [s for s, _ in ours["pipeline/h2/staleness_max"]] == [4, 8, 12]
    assert [s for s, _ in ours["error/test"]] == [6, 12]
    # SG quality: the cosine of each prediction to the gradient that came back for it
    assert [s for s, _ in ours["dni/h2/target_cosine"]] == [4, 8, 12]
    assert all(-1 <= v <= 1 for _, v in ours["dni/h2/target_cosine"])
    trained(tmp_path, "quiet", *every, *PIPE, "train.sg_quality=false")
    assert "dni/h1/target_cosine" not in curves(tmp_path / "quiet" / "tb" / "pipeline")


@pytest.mark.parametrize("dni, stages", [("every_layer", "2"), ("complete_unlock", "3")])
def test_stochastic_updates_without_overlap_equal_in_process(tmp_path, dni, stages):
    # every stage draws all groups' coins;
    # skipped boundary synthesizers and input models stay put too
    sto = [f"dni={dni}", "model.layers=4", "train.update_prob=0.5"]
    _, w_in = trained(tmp_path, "in", *sto, env=ONE_THREAD)
    _, w_pipe = trained(tmp_path, "pipe", *sto, *PIPE, f"runtime.stages={stages}",
                        "runtime.max_inflight=1")
    _, w_all = trained(tmp_path, "all", f"dni={dni}", "model.layers=4", env=ONE_THREAD)
    assert_same_weights(w_in, w_pipe)
    assert not all(torch.equal(w_in[k], w_all[k]) for k in w_in)  # the coins did skip updates


@pytest.mark.parametrize("overrides, words", [
    (["runtime.stages=4"], ["runtime.stages=4", "at most 3 stages"]),
    (["runtime.stages=0"], ["runtime.stages must be >= 1"]),
    (["runtime.boundaries=[h7]"], ["no cut named 'h7'", "h1, h2"]),
    (["model.layers=4", "runtime.stages=3", "runtime.boundaries=[h1]"], ["needs 2 different cuts"]),
    (["dni.cuts=[h1]", "model.layers=4", "runtime.boundaries=[h2]"],
     ["boundary h2 has no interface"]),
    (["runtime.max_inflight=0"], ["runtime.max_inflight must be >= 1"]),
    (["model=rnn", "data=copy"], ["runtime=pipeline runs feed-forward models"]),
    (["checkpoint.every=5"], ["checkpoint.every=5: runtime=pipeline keeps no checkpoint",
                              "set checkpoint.every=0"]),
    (["resume=elsewhere"], ["resume=elsewhere: runtime=pipeline keeps no checkpoint",
                            "without resume="]),
])
def test_bad_pipeline_settings_are_one_line(tmp_path, overrides, words):
    done = sgrun(*TINY, "dni=every_layer", *PIPE, *overrides, f"hydra.run.dir={tmp_path / 'run'}",
                 cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-1500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


@pytest.mark.parametrize("gpus, local, refused", [(1, None, True), (2, None, False),
                                                   (1, "1", False), (1, "2", True)])
def test_a_pipeline_on_cuda_needs_a_gpu_per_stage_process(monkeypatch, gpus, local, refused):
    """Two stage processes on one GPU fail in nccl ("Duplicate GPU detected") and in gloo (no CUDA
    tensors), as a GPU machine showed: refused before any process starts.  Under torchrun only
    this machine's processes (LOCAL_WORLD_SIZE) count."""
    from sgrun.pipeline.stage import stage_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if local is not None:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        monkeypatch.setenv("LOCAL_RANK", "0")
    if refused:
        with pytest.raises(ConfigError, match=r"needs a GPU for each stage process: \d stages on "
                           rf"this machine, {gpus} GPU\(s\) here: set device=cpu"):
            stage_device("cuda", 1, 2)
    else:
        assert stage_device("cuda", 1, 2) == torch.device("cuda", 0 if local else 1)
    assert stage_device("cpu", 1, 2) == torch.device("cpu")


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        done = sgrun(*TINY, "dni=every_layer", *PIPE, f"runtime.port={port}",
                     f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"sgrun: error: runtime.port={port} is in use: "
                                   "set runtime.port=0 (any free port) or another port")


def test_auto_boundaries_balance_the_synthesizers():
    # 4-layer FCN with DNI: three 1024-wide synthesizers dominate; 2 stages put one of them below
    # and two above (h1), 3 stages one synthesizer each
    cfg = make_cfg("data=synthetic", "model=fcn", "model.layers=4", "dni=every_layer",
                   "runtime=pipeline")
    model = full_model(cfg, (1, 28, 28), 10)
    assert plan_split(model, cfg.runtime).boundaries == ("h1",)
    cfg.runtime.stages = 3
    assert plan_split(model, cfg.runtime).boundaries == ("h1", "h2")
    cfg.runtime.stages = 5
    with pytest.raises(ConfigError, match="at most 4 stages"):
        plan_split(model, cfg.runtime)


def test_input_synthesizer_is_counted_above_its_cut():
    # I(x) of cut h1 runs in the stage above h1, so it adds to the cost of block 2, not block 1
    def costs(dni):
        cfg = make_cfg("data=synthetic", "model=fcn", "model.layers=3", f"dni={dni}",
                       "runtime=pipeline")
        return block_costs(full_model(cfg, (1, 28, 28), 10))

    dni, unlock = costs("every_layer"), costs("complete_unlock")
    # two hidden layers of 1024, then the cut's 256 units
    i_cost = 784 * 1024 + 1024 * 1024 + 1024 * 256
    assert unlock[0] == dni[0]
    assert unlock[1] == dni[1] + 2 * i_cost  # I of h1, and I of h2 (whose consumer is the head)


# --------------------------------------------------------------------------- processes


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def start_long_run(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A pipeline run that trains long enough to be interrupted; returns it and its stage pids."""
    env = {**os.environ, "SGRUN_DATA_DIR": str(tmp_path / "data")}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, "-m", "sgrun", *TINY, "dni=every_layer", *PIPE,
                             "train.steps=100000", "train.eval_every=100000",
                             f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 120
    stages: list[int] = []
    while time.time() < deadline:
        stages = [p for p in children_of(proc.pid)
                  if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        if len(stages) == 2 and (tmp_path / "run" / "tb" / "pipeline").exists():
            break
        time.sleep(0.3)
    assert len(stages) == 2, "the two stage processes did not start"
    time.sleep(2)  # let them train a little
    return proc, sorted(stages)


def test_a_stage_that_dies_stops_all_with_one_line(tmp_path):
    proc, stages = start_long_run(tmp_path)
    os.kill(stages[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith(
        "sgrun: error: pipeline stage 1 was killed (SIGKILL)")
    time.sleep(0.5)
    assert not any(alive(p) for p in stages)


def test_stages_end_when_sgrun_itself_is_killed(tmp_path):
    """A SIGKILLed sgrun cannot stop its stages; they notice and end, so that nothing goes on
    training into a folder whose lock died with sgrun."""
    proc, stages = start_long_run(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 15
    while any(alive(p) for p in stages) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in stages)


def test_ctrl_c_stops_every_process(tmp_path):
    proc, stages = start_long_run(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-1500:]
    assert "interrupted" in err.strip().splitlines()[-1]
    time.sleep(0.5)
    assert not any(alive(p) for p in stages)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_rank_0_draws_the_engine_bar_on_a_terminal(tmp_path):
    code, shown = on_terminal(*TINY, "dni=every_layer", *PIPE, "runtime.stages=2",
                              cwd=tmp_path)
    assert code == 0, shown[-2000:]
    # one bar (rank 0's), drawn from 0 to 12 and redrawn below each log line
    assert shown.count("train:   0%") == 1 and "train: 100%" in shown and "12/12" in shown
    assert "step 6/12" in shown and "step 12/12" in shown
    assert not log_lines_above_the_bar(shown)
    assert "leaked" not in shown


def test_torchrun_launch(tmp_path):
    """Across machines each stage is started by torchrun; here both on this one."""
    pytest.importorskip("torch.distributed.run")
    env = {**os.environ, "SGRUN_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    folder = tmp_path / "tr"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "sgrun", *TINY, "dni=every_layer",
                           "model.layers=4", "runtime=pipeline", "runtime.max_inflight=1",
                           "runtime.boundaries=[h2]", f"hydra.run.dir={folder}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _, w_in = trained(tmp_path, "in", "dni=every_layer", "model.layers=4", env=ONE_THREAD)
    assert_same_weights(w_in, torch.load(folder / "model.pt"))


def test_label_only_draws_follow_the_same_batches():
    # stages above the first take their labels from their own sampler instead of a message
    from sgrun.tasks.classification import BatchSampler
    x, y = torch.randn(50, 3), torch.arange(50)
    full, labels = (BatchSampler(x, y, 16, seed=3, device=torch.device("cpu")) for _ in range(2))
    for _ in range(7):  # past an epoch boundary (a fresh permutation)
        xb, yb = full.next()
        assert torch.equal(labels.next_labels(), yb) and torch.equal(xb, x[yb])


def test_a_stage_guards_the_interfaces_inside_it(monkeypatch):
    # stage 0 of 2 on a 4-layer FCN: its boundary is h2, the interface at h1 is inside it.  The
    # stage runs the task's step; a batch gone non-finite makes h1's synthetic gradient non-finite
    # and the stage's divergence guard names it (no other process is needed: nothing is sent)
    from sgrun.guard import check_finite
    from sgrun.pipeline.stage import Stage, annotated
    from sgrun.tasks.classification import Classification

    cfg = make_cfg(*TINY, "dni=every_layer", "model.layers=4", *PIPE, "runtime.boundaries=[h2]",
                   "runtime.max_inflight=2")
    torch.manual_seed(cfg.seed)
    task = Classification(cfg, torch.device("cpu"))
    model = annotated(task.model, cfg, tuple(task.data.shape), task.data.num_classes)
    stage = Stage(cfg, 0, plan_split(model, cfg.runtime), task, 2, torch.device("cpu"))
    assert [i.name for i in stage.inner] == ["h1"]
    sent = []
    monkeypatch.setattr(stage, "_send", lambda tensor, dst, tag: sent.append(tensor.shape))
    monkeypatch.setattr(stage, "take_targets", lambda drain=False: None)
    stage.train_step()
    assert sent == [(32, *model.cut_shapes["h2"])]  # h2 went on, the synthetic gradient came back
    check_finite(stage.finite_check_values(), 1, 1e-3, None)
    real_next = stage.sampler.next

    def poisoned():
        x, y = real_next()
        return x * float("nan"), y

    monkeypatch.setattr(stage.sampler, "next", poisoned)
    stage.train_step()
    with pytest.raises(SgrunError, match="interface h1 became non-finite by step 2"):
        check_finite(stage.finite_check_values(), 2, 1e-3, None)
