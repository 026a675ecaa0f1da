"""One engine for every task: budgets as they run, each family's own data and demo budget, features
honoured or refused, one progress bar and one divergence guard."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import log_lines_above_the_bar, on_terminal, sgrun
from configs import PRESETS, make_cfg
from omegaconf import OmegaConf

import sgrun as package
from sgrun.cli import CONF_DIR
from sgrun.errors import ConfigError, SgrunError
from sgrun.guard import check_finite
from sgrun.tasks import TASKS
from sgrun.train import budget_line, estimate_line, run, task_class

FAMILIES = {"fcn": ("feedforward", "mnist"), "cnn": ("feedforward", "mnist"),
            "rnn": ("rnn", "copy"), "hrnn": ("hrnn", "digits")}


@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_brings_its_own_data_and_demo_budget(model):
    family, data = FAMILIES[model]
    cfg = make_cfg(f"model={model}")
    assert cfg.model.family == family and cfg.data.name == data
    demo = OmegaConf.load(Path(CONF_DIR) / "demo" / f"{model}.yaml")
    assert cfg.train.steps == demo.train.steps and cfg.optim.lr == demo.optim.lr


def test_an_explicit_dataset_wins_over_the_familys():
    assert make_cfg("model=rnn", "data=ptb").data.name == "ptb"
    assert make_cfg("model=hrnn", "data=digits_mnist").data.mode == "images"


def _leaves(node, prefix=""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            yield from _leaves(value, path + ".")
        else:
            yield path


@pytest.mark.parametrize("preset", PRESETS)
def test_no_demo_budget_reaches_a_preset(preset):
    """Every key a family's demo budget sets is set by each preset of that family again, so the
    paper profile of a preset is the preset's own (the demo file comes first in the defaults
    list)."""
    cfg = make_cfg(f"experiment={preset}")
    demo = OmegaConf.load(Path(CONF_DIR) / "demo" / f"{cfg.model.name}.yaml")
    unset = object()
    for key in _leaves(demo):
        assert any(OmegaConf.select(part, key, default=unset) is not unset
                   for part in _preset_files(preset)), f"{preset} does not set {key}"


def _preset_files(preset: str):
    """A preset's own file and the presets it includes through its defaults list."""
    part = OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{preset}.yaml")
    yield part
    for entry in part.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            yield from _preset_files(entry)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("profile", ["paper", "cpu", "smoke"])
def test_the_composed_config_is_the_budget_that_runs(preset, profile):
    """No multiplier is applied after composition: --cfg job shows the steps and learning rate."""
    cfg = make_cfg(f"experiment={preset}", f"profile={profile}")
    assert set(cfg.profile) == {"name"}
    assert isinstance(cfg.train.steps, int) and isinstance(cfg.optim.lr, float)
    if profile == "smoke":
        assert cfg.train.steps == 4


def test_mnist_fcn_cpu_budget_is_shown_as_it_runs():
    cfg = make_cfg("experiment=mnist_fcn", "profile=cpu")
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.eval_every) == (15000, 3e-4, 150)


def test_profile_files_are_not_copies_of_each_other():
    files = sorted((Path(CONF_DIR) / "experiment_profile").glob("*.yaml"))
    bodies = {}
    for f in files:
        body = "\n".join(ln for ln in f.read_text().splitlines() if not ln.startswith("#"))
        if body.startswith("defaults:") and body.count("\n") == 1:
            continue  # a one-line include of the shared file
        assert body not in bodies, (
            f"{f.name} repeats {bodies.get(body)}: include it with a defaults list")
        bodies[body] = f.name


def test_every_model_has_a_target():
    for f in (Path(CONF_DIR) / "model").glob("*.yaml"):
        assert OmegaConf.load(f).get("_target_"), f.name


def test_registry_covers_every_family():
    families = {OmegaConf.load(f).family for f in (Path(CONF_DIR) / "model").glob("*.yaml")}
    assert families == set(TASKS)


@pytest.mark.parametrize("model", ["rnn", "hrnn"])
def test_stochastic_updates_are_refused_where_there_are_no_layer_groups(model):
    cfg = make_cfg(f"model={model}", "train.update_prob=0.5")
    with pytest.raises(ConfigError, match="train.update_prob=0.5 .* model=fcn"):
        task_class(cfg)


def test_stochastic_updates_skip_and_count(tmp_path):
    cfg = make_cfg("data=synthetic", "device=cpu", "profile=smoke", "train.update_prob=0.5",
                   "train.steps=8", "model.layers=3", "dni=every_layer")
    metrics = run(cfg, tmp_path)
    # three layer groups, each skipped with probability 1/2
    assert 0 < metrics["skipped_groups"] < 8 * 3


def test_the_family_and_the_dataset_must_match(tmp_path):
    with pytest.raises(ConfigError,
                       match="model=rnn trains on copy, repeat_copy, ptb, not data=mnist"):
        run(make_cfg("model=rnn", "data=mnist", "profile=smoke"), tmp_path)


def test_threads_reach_every_task(tmp_path, monkeypatch):
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    run(make_cfg("data=synthetic", "device=cpu", "profile=smoke", "runtime.threads=1"), tmp_path)
    assert seen and seen[0] == 1


def test_the_guard_names_the_interface_and_the_checkpoint():
    with pytest.raises(SgrunError,
                       match=r"interface h2 became non-finite by step 7.*checkpoint \(step 5\)"):
        check_finite({"loss/train": 1.0, "dni/h2/sg_loss": float("nan")}, 7, 1e-3, 5)
    with pytest.raises(SgrunError, match="training loss .* no checkpoint had been written yet"):
        check_finite({"loss/train": float("inf")}, 3, 1e-3, None)
    check_finite({"loss/train": 1.0}, 3, 1e-3, None)


def test_one_progress_bar_and_one_guard_in_the_package():
    sources = {p: p.read_text() for p in Path(package.__file__).parent.rglob("*.py")}
    bars = [p for p, s in sources.items() if re.search(r"\btqdm\(", s)]
    guards = [p for p, s in sources.items() if re.search(r"def check_finite\b", s)]
    assert [p.name for p in bars] == ["train.py"] and [p.name for p in guards] == ["guard.py"]


def test_on_a_terminal_the_bar_is_drawn_and_log_lines_go_above_it(tmp_path):
    code, shown = on_terminal("data=synthetic", "device=cpu", "train.steps=40",
                              "train.eval_every=10", "train.log_every=10", cwd=tmp_path)
    assert code == 0, shown[-2000:]
    assert "train: 100%" in shown and "40/40" in shown
    assert shown.count("test error") >= 4  # every evaluation's line is there, none overwritten
    assert not log_lines_above_the_bar(shown)


def test_the_end_line_names_the_option_as_typed(tmp_path):
    r = sgrun("data=synthetic", "profile=smoke", "dni=every_layer", cwd=tmp_path)
    end = [ln for ln in r.stdout.splitlines() if "finished in" in ln]
    assert r.returncode == 0 and end and "model=fcn data=synthetic dni=every_layer " in end[0]


def test_a_key_no_part_of_sgrun_reads_is_refused(tmp_path):
    r = sgrun("+foo=1", "data=synthetic", "profile=smoke", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'foo'" in r.stderr
    r = sgrun("+model.widht=3", "data=synthetic", "profile=smoke", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "'model.widht'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model", ["rnn", "hrnn", "cnn"])
def test_each_family_runs_as_typed_and_names_its_metric(tmp_path, model):
    """`sgrun model=<family>` (here with a few steps) trains on the family's data and prints its
    headline metric in words."""
    small = {"cnn": ["data=synthetic"], "rnn": [], "hrnn": []}[model]
    r = sgrun(f"model={model}", "train.steps=6", "train.eval_every=3", "train.log_every=3", *small,
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    finished = [ln for ln in r.stdout.splitlines() if "finished in" in ln]
    metric = {"rnn": "largest N solved", "hrnn": "held-out error of B", "cnn": "test error"}[model]
    assert finished and metric in finished[0] and "primary" not in finished[0]
    # the family's own default synthesizer, not the feed-forward default's name
    assert f"model={model} " in finished[0] and "dni=cdni" not in finished[0]


@pytest.mark.parametrize("args, fix", [
    (["model=rnn", "dni=cdni"], "dni=every_k"),
    (["model=fcn", "dni=every_k"], "dni=every_layer"),
    (["model=hrnn", "dni=every_layer"], "dni=message"),
])
def test_a_dni_choice_of_another_family_is_one_line(tmp_path, args, fix):
    r = sgrun(*args, "train.steps=2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and fix in r.stderr, r.stderr


@pytest.mark.slow
def test_ctrl_c_prints_the_command_that_continues_the_run(tmp_path):
    """The printed command (with resume=<folder>) continues from the checkpoint and finishes."""
    import os
    import shlex
    import signal
    import subprocess
    import time

    args = ["data=synthetic", "device=cpu", "train.steps=3000", "train.eval_every=3000",
            "hydra.run.dir=run"]
    env = {**os.environ, "SGRUN_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen(["sgrun", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "tb").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-800:]
    last = err.strip().splitlines()[-1]
    assert "checkpoint saved" in last and "continue it with: sgrun " in last
    command = shlex.split(last.split("continue it with: ", 1)[1])
    assert command[-1] == f"resume={(tmp_path / 'run').resolve()}"
    r = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-800:]
    assert "resuming" in r.stderr + r.stdout and "finished in" in r.stdout


def test_a_second_run_on_a_locked_folder_is_one_line(tmp_path):
    from sgrun.locks import folder_lock

    with folder_lock(tmp_path):
        with pytest.raises(SgrunError, match=r"is in use by another sgrun run \(PID \d+\)"):
            run(make_cfg("data=synthetic", "device=cpu", "profile=smoke"), tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_a_second_reproduce_on_the_same_runs_folder_is_one_line(tmp_path, capsys):
    import sys

    from sgrun.locks import folder_lock

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import reproduce

    (tmp_path / "smoke").mkdir()
    with folder_lock(tmp_path / "smoke"):
        code = reproduce.main(["--profile", "smoke", "--only", "mnist_fcn",
                               "--runs", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(r"smoke is in use by another make reproduce \(PID \d+\).*--runs", err[0])
    assert not (tmp_path / "smoke" / "mnist_fcn").exists()


def test_a_second_sweep_into_a_held_sweep_folder_is_one_line(tmp_path):
    from sgrun.locks import folder_lock

    (tmp_path / "sweep").mkdir()
    with folder_lock(tmp_path / "sweep"):
        r = sgrun("-m", "data=synthetic", "profile=smoke", "device=cpu", "seed=0,1",
                  "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"sweep is in use by another sgrun sweep \(PID \d+\)"
                                         r".*hydra.sweep.dir", lines[0])
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [".sgrun.lock"]  # no job ran


def test_a_sweep_job_whose_folder_is_in_use_writes_nothing_there(tmp_path):
    """The job fails (table, exit 1), but no FAILED lands in the folder of the run still going
    there, which would mark that run failed once it finishes."""
    from sgrun.locks import folder_lock

    held = tmp_path / "sweep" / "1_data=synthetic,device=cpu,profile=smoke,seed=1"
    held.mkdir(parents=True)
    with folder_lock(held):
        r = sgrun("-m", "data=synthetic", "profile=smoke", "device=cpu", "seed=0,1",
                  "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-800:]
    assert "1 job(s) of the sweep failed" in r.stderr.strip().splitlines()[-1]
    assert re.search(r"seed=1 .*in use by.*failed", r.stdout), r.stdout
    # the job's log line names the sweep's folder as the fix, not a single run's
    busy = [ln for ln in r.stdout.splitlines() if "job 1 failed" in ln]
    assert busy and busy[0].endswith("run the sweep into another folder with hydra.sweep.dir=<dir>")
    assert not (held / "FAILED").exists() and not (held / "summary.json").exists()
    assert (tmp_path / "sweep" / "0_data=synthetic,device=cpu,profile=smoke,seed=0"
            / "summary.json").is_file()


def test_the_lock_goes_with_the_process_that_held_it(tmp_path):
    """A SIGKILLed holder leaves no stale lock: the OS releases it with the process."""
    import signal
    import time

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from sgrun.locks import folder_lock\n"
        "with folder_lock(Path(sys.argv[1])):\n"
        "    print('held', flush=True); time.sleep(60)"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from sgrun.locks import folder_lock

    with pytest.raises(SgrunError, match=f"PID {holder.pid}"):
        with folder_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    with folder_lock(tmp_path):
        pass


def test_a_finished_run_vouches_for_its_model_and_a_broken_one_is_redone(tmp_path):
    import json

    cfg = make_cfg("data=synthetic", "device=cpu", "profile=smoke")
    first = run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["files"]["model.pt"]["bytes"] == (tmp_path / "model.pt").stat().st_size
    (tmp_path / "model.pt").write_bytes(b"truncated")
    again = run(cfg, tmp_path)  # redone, not reported as finished with a broken model
    assert again["test_error"] == first["test_error"] and torch.load(tmp_path / "model.pt")
    (tmp_path / "summary.json").write_text("{not json")
    # a corrupt summary blocks nothing
    assert run(cfg, tmp_path)["test_error"] == first["test_error"]


def test_a_finished_run_vouches_for_its_event_files(tmp_path, caplog):
    """The closed event files are listed in the summary; one cut short afterwards (a disk that
    filled as TensorBoard wrote its end) makes the run redone, not reported as finished."""
    import json

    cfg = make_cfg("data=synthetic", "device=cpu", "profile=smoke")
    first = run(cfg, tmp_path)
    files = json.loads((tmp_path / "summary.json").read_text())["files"]
    events = sorted(name for name in files if name.startswith("tb/"))
    assert events and all(files[n]["bytes"] == (tmp_path / n).stat().st_size for n in events)
    event = tmp_path / events[0]
    event.write_bytes(event.read_bytes()[:-7])
    with caplog.at_level("WARNING"):
        again = run(cfg, tmp_path)
    assert "fail their checksum: the run is redone" in caplog.text
    assert again["test_error"] == first["test_error"]


def test_a_paper_preset_points_to_its_cpu_budget():
    hint = "(for a CPU-sized run: add profile=cpu)"
    paper, cpu = make_cfg("experiment=mnist_fcn"), make_cfg("experiment=mnist_fcn", "profile=cpu")
    assert budget_line(paper, 500_000, 3e-5, 100, 5000, 2).endswith(hint)
    assert hint not in budget_line(cpu, 15_000, 3e-4, 100, 1000, 2)
    assert hint not in budget_line(make_cfg(), 3000, 1e-3, 100, 1000, 2)  # the demo fits a CPU


def test_the_run_time_at_the_measured_speed():
    assert (estimate_line(40, 10.0, 3000)
            == "budget: about 12 min for all 3000 steps at the measured 4 steps/s")
    assert (estimate_line(20, 5.0, 500_000)
            == "budget: about 2083 min (35 h) for all 500000 steps at the measured 4 steps/s")
    assert "the 100 remaining steps" in estimate_line(10, 5.0, 100, resumed=True)


def test_a_paper_preset_run_says_so_and_estimates_its_time(tmp_path):
    r = sgrun("experiment=mnist_fcn", "data=synthetic", "train.steps=6", "train.log_every=2",
              "device=cpu", "hydra.run.dir=out", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "budget: profile=paper, 6 steps" in out
    assert "1 torch thread(s) (for a CPU-sized run: add profile=cpu)" in out
    estimate = r"budget: about [\d.]+ min for all 6 steps at the measured \S+ steps/s"
    estimates = re.findall(estimate, out)
    assert len(estimates) == 1
