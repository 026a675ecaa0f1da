"""The installed ``sgrun`` command in a subprocess: a run, a multirun sweep, ``python -m sgrun``."""

import json
from pathlib import Path

import pytest
from clirun import SMOKE, sgrun

from sgrun import sweep, threads
from sgrun.cli import CONF_DIR
from sgrun.errors import ConfigError


def test_single_run_writes_summary_and_events(tmp_path):
    r = sgrun(*SMOKE, "hydra.run.dir=out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "test error" in r.stdout and "tensorboard --logdir" in r.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 4
    assert list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))


def test_python_dash_m_works_too(tmp_path):
    r = sgrun(*SMOKE, "hydra.run.dir=out", cwd=tmp_path, module=True)
    assert r.returncode == 0, r.stderr


def test_multirun_sweep_runs_every_job(tmp_path):
    r = sgrun("-m", *SMOKE, "dni=none,every_layer,cdni", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 3
    assert ({json.loads(p.read_text())["choices"]["dni"] for p in summaries}
            == {"bprop", "dni", "cdni"})


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    # model.layers=1 is refused; the layers=3 job must still finish and keep its result
    r = sgrun("-m", *SMOKE, "model.layers=1,3", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 1
    assert "1 job(s) of the sweep failed" in r.stderr
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 1
    assert "model.layers" in next((tmp_path / "sweep").glob("*/FAILED")).read_text()
    # the sweep's table: folder, the choice that varies, the result or the error, the status
    rows = job_rows(r.stdout)
    assert [row.split()[1] for row in rows] == ["1", "3"]
    assert "model.layers must be >= 2" in rows[0] and rows[0].endswith("failed")
    assert "test error" in rows[1] and rows[1].endswith("finished")
    assert "sgrun: the sweep's 2 job(s) in sweep: 1 finished, 1 failed" in r.stdout


def job_rows(stdout: str) -> list[str]:
    """The rows of the table a sweep ends with (after its header line and column names)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("sgrun: the sweep's"))
    assert lines[start + 1].split()[:2] == ["job", "folder"]
    return [line.strip() for line in lines[start + 2:] if line.startswith("  ")]


HELP_GROUPS = ("model", "data", "dni", "optim", "runtime", "experiment", "profile",
               "hydra/launcher")


def help_sections(text: str) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` from the group list of ``sgrun --help``."""
    sections: dict[str, list[str]] = {}
    group = None
    for line in text.split("== Choose from")[1].split("== Config")[0].splitlines()[1:]:
        if line and not line.startswith(" "):
            group = line.split(":")[0]
            sections[group] = []
        elif line.startswith("  ") and group and line.strip():
            sections[group].append(line.lstrip(" *").split()[0])
    return sections


def test_help_says_what_sgrun_is_and_lists_every_choice(tmp_path):
    r = sgrun("--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('sgrun reproduces "Decoupled Neural Interfaces using Synthetic '
                               'Gradients" (Jaderberg et al. 2017)')
    intro = r.stdout.split("== Choose from")[0]
    for command in ("sgrun model=rnn dni=every_k", "sgrun experiment=<preset> profile=cpu",
                    "sgrun -m ", "make reproduce"):
        assert command in intro
    assert "powered by Hydra" not in r.stdout
    sections = help_sections(r.stdout)
    assert list(sections) == list(HELP_GROUPS)  # and no internal group (demo, model_dni, ...)
    conf = Path(CONF_DIR)
    for group in HELP_GROUPS:
        files = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert sorted(set(sections[group]) - {"basic"}) == files, group
    assert "basic" in sections["hydra/launcher"]
    listed = r.stdout.split("== Choose from")[1].split("== Config")[0]
    for internal in ("demo:", "model_dni:", "experiment_profile:", "data/default", "mnist_fcn_cpu",
                     "rnn_cdni", "feedforward_smoke"):
        assert internal not in listed
    # every option has its file's one-line summary, and the defaults are marked as chosen
    assert "  * fcn   A fully connected net" in r.stdout
    assert "  * basic  Hydra's default" in r.stdout


def test_help_marks_the_choices_of_the_command_line(tmp_path):
    r = sgrun("model=rnn", "hydra/launcher=local", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    chosen = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("  * ")]
    assert chosen == ["rnn", "copy", "every_k", "adam", "inprocess", "paper", "local"]


def test_every_option_has_a_one_line_summary():
    from sgrun.help import GROUPS, option_files, summary

    conf = Path(CONF_DIR)
    for group, _ in GROUPS:
        for name in option_files(conf, group):
            text = summary(conf / group / f"{name}.yaml")
            where = f"conf/{group}/{name}.yaml: its first comment line {text!r}"
            assert text and len(text) <= 70, where


TIMING = ("seconds", "minutes")  # wall-clock values; *_per_sec too


def untimed(summary: dict) -> dict:
    return {k: v for k, v in summary["metrics"].items()
            if k not in TIMING and not k.endswith("_per_sec")}


@pytest.mark.slow
def test_both_launchers_give_the_same_numbers(tmp_path):
    # 30 steps: enough for 1 and 2 torch threads to end apart. Without OMP_NUM_THREADS joblib's
    # workers start on cores // n_jobs threads, the basic launcher on torch's default; null
    # runtime.threads must mean the same count in every job.
    sweep = ["-m", "data=synthetic", "device=cpu", "train.steps=30", "seed=0,1"]
    unset = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", threads.ENV)
    results = {}
    # two workers whatever the core count:
    # the jobs (and the sweep's callbacks) go to other processes
    local = ["hydra/launcher=local", "hydra.launcher.n_jobs=2"]
    for name, launcher in (("basic", []), ("local", local)):
        r = sgrun(*sweep, *launcher, f"hydra.sweep.dir={name}", cwd=tmp_path, unset=unset)
        assert r.returncode == 0, r.stderr
        folders = sorted((tmp_path / name).glob("*/summary.json"))
        summaries = [json.loads(p.read_text()) for p in folders]
        assert len(summaries) == 2
        # the model's checksum (the event files hold wall-clock times, so they differ)
        results[name] = [(untimed(s), s["files"]["model.pt"], s["threads"]) for s in summaries]
        rows = job_rows(r.stdout)  # the sweep's table, whichever launcher ran the jobs
        assert [row.split()[:2] for row in rows] == [[p.parent.name, str(seed)]
                                                     for seed, p in enumerate(folders)]
        assert all("test error" in row and row.endswith("finished") for row in rows)
    assert results["basic"] == results["local"]  # metrics, model.pt checksums and thread counts
    count = results["basic"][0][2]
    assert f"{count} torch thread(s)" in (next((tmp_path / "local").glob("*/cli.log"))).read_text()


def test_null_threads_is_the_sweep_commands_count(monkeypatch):
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.resolve_threads(None) == 2 and threads.resolve_threads(3) == 3
    monkeypatch.setattr(threads, "cores", lambda: 8)
    assert threads.parallel_jobs(None) == 4  # 4 jobs x 2 threads fill the 8 cores
    assert threads.parallel_jobs(1) == 8 and threads.parallel_jobs(16) == 1
    assert threads.parallel_jobs("auto") == 1  # a pipeline job spreads over every core itself
    monkeypatch.setenv(threads.ENV, "0")
    with pytest.raises(ConfigError, match="SGRUN_THREADS"):
        threads.default_threads()


def test_the_table_lists_only_this_sweeps_jobs(tmp_path, monkeypatch):
    jobs = (("old_job", "earlier", 0), ("0_seed=0", "this", 0), ("1_seed=1", "this", 1))
    for folder, token, num in jobs:  # an earlier sweep's job in the same folder has another token
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(sweep.ENV, token)
        sweep.record_job(tmp_path / folder, num, ["data=synthetic", f"seed={num}"])
    traceback = "Traceback (most recent call last):\n  ...\nValueError: bad\n"
    (tmp_path / "1_seed=1" / "FAILED").write_text(traceback)
    jobs = sweep.sweep_jobs(tmp_path, "this")
    assert [(j.folder.name, j.status, j.result) for j in jobs] == [
        ("0_seed=0", "unfinished", "-"), ("1_seed=1", "failed", "ValueError: bad")]
    text = sweep.table(jobs, tmp_path)
    assert text.splitlines()[1].split() == ["job", "folder", "seed", "result", "status"]
    assert "1 failed, 1 unfinished" in text.splitlines()[0]
