"""Runs that survive: kill and resume, signals, corrupt checkpoints, a full disk, divergence."""

import errno
import json
import signal
import subprocess
import time

import pytest
import torch
from clirun import sgrun
from configs import make_cfg

from sgrun import checkpoint as ck
from sgrun.errors import SgrunError
from sgrun.tasks.classification import BatchSampler
from sgrun.train import run

pytestmark = pytest.mark.slow  # several processes per test (make test-fast skips them)

RUN = ["data=synthetic", "device=cpu", "dni=every_layer", "dni.synthesizer.hidden=32",
       "train.steps=120", "train.batch_size=32", "train.log_every=20", "train.eval_every=40",
       "optim.lr=1e-3", "checkpoint.every=10"]


def finished(folder):
    summary = json.loads((folder / "summary.json").read_text())
    return summary["metrics"]["history"], torch.load(folder / "model.pt")


def assert_same_run(a, b):
    (hist_a, model_a), (hist_b, model_b) = finished(a), finished(b)
    assert hist_a == hist_b
    assert model_a.keys() == model_b.keys()
    for k in model_a:
        assert torch.equal(model_a[k], model_b[k]), k  # bit-identical parameters and BN statistics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    r = sgrun(*RUN, "hydra.run.dir=run", cwd=folder)
    assert r.returncode == 0, r.stderr
    return folder / "run"


def start_and_stop(tmp_path, sig, after_checkpoints=2):
    """Start the run, wait until it has written checkpoints, then send ``sig``."""
    exe = subprocess.run(["which", "sgrun"], capture_output=True, text=True).stdout.strip()
    proc = subprocess.Popen([exe, *RUN, "hydra.run.dir=run"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt, prev = tmp_path / "run" / ck.NAME, tmp_path / "run" / ck.PREVIOUS
    deadline = time.time() + 120
    while (not (ckpt.exists() and (after_checkpoints < 2 or prev.exists()))
           and time.time() < deadline):
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path, uninterrupted):
    code, _ = start_and_stop(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL  # it really was killed mid-run
    assert not (tmp_path / "run" / "summary.json").exists()
    r = sgrun(*RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "run", uninterrupted)
    # a finished run keeps its summary and model only
    assert not (tmp_path / "run" / ck.NAME).exists()


def test_sigkills_at_random_moments_then_reruns_give_the_uninterrupted_result(tmp_path,
                                                                              uninterrupted):
    """Killed again and again at moments drawn at random (before, during and between checkpoint
    writes, at start-up or during the final outputs), the same command run again each time ends
    with the uninterrupted run's history and weights; no kill leaves a folder reported finished
    before it is."""
    import random

    exe = subprocess.run(["which", "sgrun"], capture_output=True, text=True).stdout.strip()
    # the moments are drawn over a whole run's length on this machine, as it is loaded now
    started = time.time()
    assert sgrun(*RUN, "hydra.run.dir=timed", cwd=tmp_path).returncode == 0
    length = time.time() - started
    rng = random.Random(20261204)
    kills, finished = 0, False
    for attempt in range(6):
        proc = subprocess.Popen([exe, *RUN, "hydra.run.dir=run"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # the first kill inside the run for sure, the later ones anywhere up to its length
        low = 0.1 if attempt == 0 else 0.0
        try:
            proc.wait(timeout=length * rng.uniform(low, 0.9 if attempt == 0 else 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            kills += 1
            if (tmp_path / "run" / "summary.json").exists():  # written last, after the model
                assert (tmp_path / "run" / "model.pt").is_file()
            continue
        assert proc.returncode == 0, proc.stderr.read()[-1500:]
        finished = True
        break
    if not finished:  # the last start runs to the end
        r = sgrun(*RUN, "hydra.run.dir=run", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-1500:]
    assert kills >= 1
    assert_same_run(uninterrupted, tmp_path / "run")


def test_sigterm_saves_and_says_how_to_continue(tmp_path, uninterrupted):
    code, err = start_and_stop(tmp_path, signal.SIGTERM, after_checkpoints=1)
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("sgrun: error: interrupted at step")
    assert (tmp_path / "run" / ck.NAME).exists()
    r = sgrun(*RUN, f"resume={tmp_path / 'run'}", "hydra.run.dir=elsewhere", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "run", uninterrupted)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    code, _ = start_and_stop(tmp_path, signal.SIGKILL)
    path = tmp_path / "run" / ck.NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    r = sgrun(*RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fails its checksum" in r.stdout + r.stderr
    assert_same_run(tmp_path / "run", uninterrupted)


def test_no_intact_checkpoint_is_one_clear_error_and_touches_nothing(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ck.NAME).write_bytes(b"SGRUN-CKPT1 0000\nnot a checkpoint")
    (folder / ck.PREVIOUS).write_bytes(b"truncated")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    r = sgrun(*RUN, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and "no usable checkpoint" in line[0] and "delete" in line[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before


def test_checkpoint_of_another_config_is_refused(tmp_path, monkeypatch):
    code, _ = start_and_stop(tmp_path, signal.SIGKILL, after_checkpoints=1)
    before = (tmp_path / "run" / ck.NAME).read_bytes()
    r = sgrun(*RUN, "seed=7", "hydra.run.dir=run", cwd=tmp_path)
    assert (r.returncode == 2
            and "checkpoint of a run with another config (seed: 0 -> 7)" in r.stderr)
    assert "delete" not in r.stderr  # deleting would destroy the interrupted run
    r = sgrun(*RUN, "seed=7", f"resume={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2 and "changes the interrupted run's config (seed: 0 -> 7)" in r.stderr
    assert "delete" not in r.stderr and "drop resume=" in r.stderr
    # a sweep's job is told to move the sweep, not itself (its folder is the sweep's choice)
    from sgrun import sweep
    monkeypatch.setenv(sweep.ENV, "a-sweep")
    with pytest.raises(SgrunError, match=r"another config \(seed: 0 -> 7\): run the sweep into "
                                         r"another folder with hydra.sweep.dir=<dir> \(the "):
        run(make_cfg(*RUN, "seed=7"), tmp_path / "run")
    assert (tmp_path / "run" / ck.NAME).read_bytes() == before


def test_resume_of_a_folder_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    r = sgrun(*RUN, f"resume={tmp_path / 'empty'}", cwd=tmp_path)
    assert r.returncode == 2 and "no checkpoint there" in r.stderr


@pytest.mark.parametrize("what, make", [("no such folder", None),
                                        ("a file, not a folder", "write_text")])
def test_resume_of_what_is_not_a_folder_says_which(tmp_path, what, make):
    target = tmp_path / "given"
    if make:
        target.write_text("x\n")
    r = sgrun(*RUN, f"resume={target}", cwd=tmp_path)
    assert r.returncode == 2 and f"resume={target}: {what}:" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ck.NAME
    ck.write_checkpoint(path, {"step": 1})
    good = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", no_space)
    with pytest.raises(SgrunError, match=r"could not write checkpoint .*No space left.*"
                                         r"the last good checkpoint \(step 1\) is kept.*resume="):
        ck.write_checkpoint(path, {"step": 2}, kept_step=1)
    assert path.read_bytes() == good
    assert not path.with_name(path.name + ".tmp").exists()
    assert ck.read_checkpoint(path) == {"step": 1}


def test_divergence_stops_naming_step_and_interface(tmp_path, monkeypatch):
    real_next = BatchSampler.next
    calls = {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        x, y = real_next(self)
        return (x * float("nan"), y) if calls["n"] >= 30 else (x, y)

    monkeypatch.setattr(BatchSampler, "next", poisoned)
    with pytest.raises(SgrunError, match=r"interface h1 became non-finite by step (30|40)"):
        run(make_cfg(*RUN), tmp_path)
    state = ck.read_checkpoint(tmp_path / ck.NAME)
    assert state["loop"]["step"] < 30  # the last good checkpoint, from before the divergence
    assert not (tmp_path / "summary.json").exists()


def test_same_seed_same_result_in_process(tmp_path):
    a = run(make_cfg(*RUN, "train.steps=40"), tmp_path / "a")
    b = run(make_cfg(*RUN, "train.steps=40"), tmp_path / "b")
    assert a["history"] == b["history"]
    sa, sb = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpointer_names_the_step_of_the_checkpoint_it_kept(tmp_path, monkeypatch):
    c = ck.Checkpointer(tmp_path, every=2)
    c.step_done(2, 10, lambda: {"loop": {"step": 2}})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", no_space)
    with pytest.raises(SgrunError, match=r"\(step 2\) is kept: free some space, then continue"):
        c.step_done(4, 10, lambda: {"loop": {"step": 4}})
    assert ck.read_checkpoint(tmp_path / ck.NAME) == {"loop": {"step": 2}}
