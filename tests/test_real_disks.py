"""Faults on real file systems: small disks that fill, and read-only mounts (tmpfs, as root).

The other fault tests simulate a full disk (``/dev/full``, a failing ``fsync``); these fill a real
one, so that every write sgrun makes (checkpoint, events, model, summary, Hydra's own files) meets
the error where it really happens.  Each case: one line naming the file and a fix, a non-zero exit,
nothing reported as finished that is not, and the run continued or redone once there is space.
"""

import hashlib
import json
import re

import pytest
import torch
from clirun import SMOKE, remount, sgrun

pytestmark = pytest.mark.slow  # a few runs per test (make test-fast skips them)

# 40 steps of the smoke FCN; its checkpoint (weights, synthesizers, Adam's moments) is about 5 MB
RUN = [*SMOKE, "train.steps=40", "train.log_every=1"]


def one_line(r) -> str:
    assert r.returncode != 0, r.stdout[-1000:]
    assert "Traceback" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sgrun: error: "), lines
    return lines[0]


def files_of(folder) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_a_disk_that_fills_between_checkpoints_keeps_the_last_and_resumes(tmp_path, small_disk):
    # 7 MB holds the first checkpoint (5 MB) but not a second one next to it (written aside,
    # then renamed over the first)
    disk = small_disk("7m")
    r = sgrun(*RUN, "checkpoint.every=5", f"hydra.run.dir={disk / 'run'}", cwd=tmp_path)
    line = one_line(r)
    assert f"could not write checkpoint {disk / 'run' / 'checkpoint.pt'}" in line, line
    assert "No space left on device" in line
    assert "the last good checkpoint (step 5) is kept" in line and "free some space" in line
    assert not (disk / "run" / "summary.json").exists()
    assert not (disk / "run" / "checkpoint.pt.tmp").exists()  # no half-written file left behind
    remount(disk, "size=30m")  # space freed
    command = re.search(r"resume=(\S+)", line).group(1)
    again = sgrun(*RUN, "checkpoint.every=5", f"resume={command}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    # the resumed run is the uninterrupted one
    whole = sgrun(*RUN, "checkpoint.every=5", "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed = json.loads((disk / "run" / "summary.json").read_text())["metrics"]
    reference = json.loads((tmp_path / "whole" / "summary.json").read_text())["metrics"]
    assert resumed["history"] == reference["history"]
    a, b = torch.load(disk / "run" / "model.pt"), torch.load(tmp_path / "whole" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_disk_too_small_for_the_first_checkpoint_claims_none(tmp_path, small_disk):
    disk = small_disk("2m")
    r = sgrun(*RUN, "checkpoint.every=5", f"hydra.run.dir={disk / 'run'}", cwd=tmp_path)
    line = one_line(r)
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert "no earlier checkpoint exists" in line and "kept" not in line
    assert not (disk / "run" / "summary.json").exists()
    assert not (disk / "run" / "checkpoint.pt").exists()


def test_a_disk_that_fills_with_the_final_model_leaves_no_finished_run(tmp_path, small_disk):
    # 1 MB holds the events and Hydra's files, not the 1.6 MB model: the run must not count as
    # finished, and once there is space the same command trains it again instead of saying
    # "already holds this finished run"
    disk = small_disk("1m")
    args = [*RUN, "checkpoint.every=0", f"hydra.run.dir={disk / 'run'}"]
    line = one_line(sgrun(*args, cwd=tmp_path))
    assert "model.pt" in line and "No space left on device" in line and "free some space" in line
    assert not (disk / "run" / "summary.json").exists()
    assert not (disk / "run" / "model.pt").exists()
    remount(disk, "size=30m")
    again = sgrun(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already holds" not in again.stdout + again.stderr
    summary = json.loads((disk / "run" / "summary.json").read_text())
    assert summary["metrics"]["history"]
    assert torch.load(disk / "run" / "model.pt")


def test_a_finished_run_on_a_read_only_mount_is_intact(tmp_path, small_disk):
    disk = small_disk("30m")
    args = [*SMOKE, f"hydra.run.dir={disk / 'run'}"]
    assert sgrun(*args, cwd=tmp_path).returncode == 0
    before = files_of(disk / "run")
    remount(disk, "ro")
    line = one_line(sgrun(*args, cwd=tmp_path))
    assert "cannot write" in line and "Read-only file system" in line and "hydra.run.dir=" in line
    line = one_line(sgrun(*args, "seed=1", cwd=tmp_path))  # another run into the same folder
    assert "cannot write" in line
    assert files_of(disk / "run") == before
    remount(disk, "rw")
    again = sgrun(*args, cwd=tmp_path)
    assert again.returncode == 0
    assert "already holds this finished run" in again.stdout + again.stderr
    assert {k: v for k, v in files_of(disk / "run").items() if k.name != "cli.log"} == {
        k: v for k, v in before.items() if k.name != "cli.log"}


def test_a_sweep_into_a_read_only_mount_is_one_line(tmp_path, small_disk):
    disk = small_disk("30m")
    remount(disk, "ro")
    line = one_line(sgrun("-m", *SMOKE, "seed=0,1", f"hydra.sweep.dir={disk / 'sweep'}",
                          cwd=tmp_path))
    assert "cannot write" in line and str(disk) in line
    assert not list(disk.iterdir())


def test_a_sweep_on_a_disk_that_fills_is_redone_by_the_same_command(tmp_path, small_disk):
    # job 0's first checkpoint fits, its second does not; job 1 finds the disk full at once.
    # Both are marked failed (not finished); with space again the same sweep command resumes
    # job 0 from its checkpoint, trains job 1 and finishes both
    disk = small_disk("7m")
    sweep = ["-m", *RUN, "checkpoint.every=5", "seed=0,1", f"hydra.sweep.dir={disk / 'sweep'}"]
    r = sgrun(*sweep, cwd=tmp_path)
    assert r.returncode == 1 and "2 job(s) of the sweep failed" in r.stderr.strip().splitlines()[-1]
    jobs = sorted(p for p in (disk / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((job / "FAILED").exists() for job in jobs)
    assert not any((job / "summary.json").exists() for job in jobs)
    remount(disk, "size=40m")
    again = sgrun(*sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 finished" in again.stdout
    assert "from step 5" in (jobs[0] / "cli.log").read_text()
    assert all((job / "summary.json").exists() and not (job / "FAILED").exists() for job in jobs)


def test_a_pipeline_on_a_disk_that_fills_is_one_line_and_runs_again(tmp_path, small_disk):
    # rank 0 hands the assembled weights to the launching process through a file: on a full disk
    # that write is one line with its fix (it was torch's internal error and a traceback), no
    # half-written file stays, and the same command runs once there is space
    disk = small_disk("1m")
    args = ["data=synthetic", "device=cpu", "train.steps=12", "train.eval_every=6",
            "train.batch_size=32", "dni=every_layer", "runtime=pipeline", "runtime.threads=1",
            f"hydra.run.dir={disk / 'run'}"]
    line = one_line(sgrun(*args, cwd=tmp_path))
    assert "pipeline stage 0: could not write" in line and "No space left on device" in line
    assert "free some space and run the command again" in line and "not marked finished" in line
    assert not [p.name for p in (disk / "run").iterdir() if p.name.endswith((".pt", ".tmp"))]
    assert not (disk / "run" / "summary.json").exists()
    remount(disk, "size=30m")
    again = sgrun(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (disk / "run" / "summary.json").exists() and (disk / "run" / "model.pt").exists()
