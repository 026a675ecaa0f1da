"""The installed ``sgrun`` command in a subprocess: a run, a multirun sweep, ``python -m sgrun``."""

import json

from clirun import SMOKE, sgrun


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
    assert {json.loads(p.read_text())["choices"]["dni"] for p in summaries} == {"bprop", "dni", "cdni"}


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    # model.layers=1 is refused; the layers=3 job must still finish and keep its result
    r = sgrun("-m", *SMOKE, "model.layers=1,3", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 1
    assert "1 job(s) of the sweep failed" in r.stderr
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 1
    assert "model.layers" in next((tmp_path / "sweep").glob("*/FAILED")).read_text()


def test_help_lists_the_groups(tmp_path):
    r = sgrun("--help", cwd=tmp_path)
    assert r.returncode == 0
    for group in ("model:", "dni:", "data:", "profile:", "experiment:"):
        assert group in r.stdout
