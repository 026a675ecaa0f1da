"""``make reproduce``: run every paper preset as a resumable multirun (``make`` then writes the
report).

    python experiments/reproduce.py --profile cpu                   # every preset, seed 0
    python experiments/reproduce.py --profile cpu --seeds 3         # seeds 0, 1, 2
    python experiments/reproduce.py --profile smoke --only mnist_fcn,mnist_cnn
    python experiments/reproduce.py --profile cpu --launcher local  # a job per core, 1 thread each
    python experiments/reproduce.py --profile smoke -- data=synthetic model.layers=3
                                                                    # extra overrides

A preset runs as
``sgrun -m experiment=<preset> profile=<profile> hydra.sweep.dir=<runs>/<profile>/<preset>``.
The fixed folder is what makes a reproduction resumable: every job lands in the same folder each
time, and ``sgrun`` returns a finished run's metrics without training again when the folder's
``summary.json`` holds the same config. So after an interruption (Ctrl-C, a killed job, a reboot)
the same command trains only the runs that have no ``summary.json`` yet.

Seeds: seed 0 is the preset's own sweep, the very folders of ``sgrun -m experiment=<preset>
hydra.sweep.dir=...``; seed s > 0 is a second multirun of the same sweep with ``seed=s`` (its
folders end in ``,seed=s``). One multirun per seed keeps Hydra's job numbers, and so the folder
names, the same whatever ``--seeds`` is: raising ``--seeds`` later only adds runs.

A preset whose jobs fail (a job writes ``FAILED``) is reported and the next preset runs. The exit
code is 0 when every failure is a missing dataset (e.g. CIFAR-10, which cannot be downloaded
everywhere: the report says "dataset not available"), 1 when anything else failed, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from report import REFERENCE, ROOT, load_reference, paper_presets, shown
from rundirs import FAILED, Run, dataset_missing, first_line, load_run

from sgrun.errors import SgrunError
from sgrun.locks import folder_lock

STOP_GRACE_SECONDS = 10  # for the running job to write its checkpoint when we are interrupted


@dataclass
class Outcome:
    preset: str
    jobs: int
    finished: int
    finished_before: int
    failed: list[Run]
    error: str  # sgrun's own error when the sweep could not start
    minutes: float


def sgrun_command(preset: str, profile: str, sweep_dir: Path, seed: int, launcher: str | None,
                  extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "sgrun", "-m", f"experiment={preset}", f"profile={profile}",
           f"hydra.sweep.dir={sweep_dir}"]
    if seed:
        cmd.append(f"seed={seed}")
    if launcher:
        cmd.append(f"hydra/launcher={launcher}")
    return cmd + list(extra)


def job_runs(sweep_dir: Path) -> list[Run]:
    runs = ((load_run(job) for job in sorted(sweep_dir.iterdir()) if job.is_dir())
            if sweep_dir.is_dir() else [])
    return [run for run in runs if run is not None]


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` with its output appended to ``log_path``; stop it too if we are interrupted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        # Started in the repository, so that the default data_dir (data/) is found, and in its own
        # process group, so that stopping it also stops a launcher's worker processes.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            # Interrupted. The finished jobs are on disk already. sgrun answers SIGTERM by saving
            # the running job's checkpoint and recording that job as failed, then goes on with the
            # next job of the sweep: so give it a few seconds to save, then stop the whole sweep.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise


def reproduce_preset(preset: str, args, extra: list[str]) -> Outcome:
    sweep_dir = Path(args.runs).resolve() / args.profile / preset
    before = job_runs(sweep_dir)
    # a job that failed last time is run again; its old FAILED marker would report it failed even if
    # it succeeds now (sgrun writes FAILED on failure but never removes one)
    for run in before:
        if run.status == "failed" and not args.dry_run:
            (run.path / FAILED).unlink(missing_ok=True)
    start = time.time()
    log_path = sweep_dir / "reproduce.log"
    env = dict(os.environ)
    threads = args.threads or (1 if args.profile == "smoke" or args.launcher == "local" else None)
    if threads and "OMP_NUM_THREADS" not in env:
        # Smoke runs are a few steps on small tensors: torch's worker threads only add start-up and,
        # on a machine shared with other jobs, spin-waiting (measured here: 22 s instead of 1 s for
        # the 4 steps of a DNI FCN). The local launcher runs cores // threads jobs at once: one
        # thread each puts a job on every core.
        env["OMP_NUM_THREADS"] = str(threads)
    error = ""
    for seed in range(args.seeds):
        cmd = sgrun_command(preset, args.profile, sweep_dir, seed, args.launcher, extra)
        if args.dry_run:
            print(" ".join(cmd))
            continue
        print(f"  {preset}: seed {seed} running (log: {shown(log_path)})", flush=True)
        code = run_logged(cmd, log_path, env)
        # 1: some jobs failed (they wrote FAILED); else the sweep did not run
        if code not in (0, 1):
            error = _last_line(log_path) or f"sgrun exited with code {code}"
    after = job_runs(sweep_dir)
    return Outcome(preset=preset, jobs=len(after),
                   finished=sum(r.status == "finished" for r in after),
                   finished_before=sum(r.status == "finished" for r in before),
                   failed=[r for r in after if r.status == "failed"], error=error,
                   minutes=(time.time() - start) / 60)


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Overrides after -- go to every sweep.")
    parser.add_argument("--profile", default="cpu", help="paper | cpu | smoke (conf/profile/)")
    parser.add_argument("--seeds", type=int, default=1, help="run seeds 0 .. N-1 (default 1)")
    parser.add_argument("--only", default="",
                        help="comma-separated presets (default: every paper preset)")
    parser.add_argument("--runs", default=str(ROOT / "runs"),
                        help="runs go to <runs>/<profile>/<preset>/ (default: the repository's "
                             "runs/)")
    parser.add_argument("--launcher", default=None,
                        help="a Hydra launcher, e.g. local (conf/hydra/launcher/)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS, unless already set); "
                             "default: 1 for profile=smoke and --launcher local, torch's own "
                             "choice otherwise")
    parser.add_argument("--dry-run", action="store_true", help="print the sgrun commands only")
    args = parser.parse_args(argv)
    presets = paper_presets()
    chosen = [p.strip() for p in args.only.split(",") if p.strip()] or presets
    unknown = [p for p in chosen if p not in presets]
    if unknown:
        parser.error(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(presets)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1 (got {args.seeds})")

    pattern = load_reference(REFERENCE)["dataset_missing"]
    if args.dry_run:
        return reproduce_all(chosen, args, extra, pattern)
    profile_dir = Path(args.runs) / args.profile
    profile_dir.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(profile_dir, what="another make reproduce",
                         fix="give this one another folder with --runs (RUNS= for make)"):
            return reproduce_all(chosen, args, extra, pattern)
    except SgrunError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2


def reproduce_all(chosen: list[str], args, extra: list[str], pattern: str) -> int:
    print(f"reproduce: {len(chosen)} preset(s), profile {args.profile}, seeds 0..{args.seeds - 1}, "
          f"runs in {shown(Path(args.runs) / args.profile)}/", flush=True)
    start, status = time.time(), 0
    try:
        for preset in chosen:
            o = reproduce_preset(preset, args, extra)
            if args.dry_run:
                continue
            print(f"{preset:<22} {o.finished}/{o.jobs} runs finished ({o.finished_before} before), "
                  f"{len(o.failed)} failed, {o.minutes:.1f} min", flush=True)
            missing = [r for r in o.failed if dataset_missing(r, pattern)]
            if missing:
                print(f"{'':<22} dataset not available: {first_line(missing[0].message)}")
            others = [r for r in o.failed if r not in missing]
            if others:
                status = 1
                print(f"{'':<22} failed: {first_line(others[0].message)} (see "
                      f"{shown(others[0].path / FAILED)})")
            if o.error:
                status = 1
                print(f"{'':<22} sgrun could not run the sweep: {o.error}")
    except KeyboardInterrupt:
        print("reproduce: interrupted; run the same command again to finish the remaining runs",
              file=sys.stderr)
        return 130
    print(f"reproduce: done in {(time.time() - start) / 60:.1f} min", flush=True)
    return status


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill` stops the sweep as Ctrl-C does


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
