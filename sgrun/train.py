"""``run(cfg, out_dir) -> metrics`` and the one training loop, :func:`fit`, that every task goes
through.

``run`` checks the config, refuses to write over a finished run, resumes an interrupted one, builds
the task of the model family (:mod:`sgrun.tasks`) and writes ``summary.json`` (final metrics +
resolved config) and ``model.pt`` next to the TensorBoard events.  ``fit`` owns what is the same for
every task: the optimizers and their schedule, stochastic layer updates, the progress bar, the
log / eval / checkpoint cadence, the divergence guard and the final metrics.  One step, top to
bottom:

    batch = task.next_batch()
    opt.zero_grad(); values = task.train_step(batch)    # forward + one backward
    skip_updates(...)                                   # train.update_prob < 1 (sec. 3.3)
    opt.step(); sched.step()
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sgrun import sweep
from sgrun.build import build_optimizer, check_family_data, device_of
from sgrun.checkpoint import Checkpointer, rng_state, set_rng_state
from sgrun.checks import check_config
from sgrun.errors import ConfigError, OutputWriteError, SgrunError, output_fix
from sgrun.guard import check_finite
from sgrun.locks import RUN_FIX, SWEEP_JOB_FIX, folder_lock
from sgrun.metrics import (
    NullWriter,
    Writer,
    file_records,
    verify_file,
    write_bytes_atomic,
    write_json_atomic,
)
from sgrun.tasks import TASKS, Task
from sgrun.threads import resolve_threads
from sgrun.updates import skip_updates

log = logging.getLogger("sgrun")

SUMMARY = "summary.json"
MODEL = "model.pt"


@dataclass
class Session:
    """What a training loop needs besides the config: device, writer, checkpoints, resumed state."""

    device: torch.device
    writer: NullWriter
    ckpt: Checkpointer
    config: dict
    resumed: dict | None = None  # the loop's own state from the checkpoint; None for a fresh run
    started: float = field(default_factory=time.time)
    minutes_before: float = 0.0  # time spent before the resume

    def minutes(self) -> float:
        return self.minutes_before + (time.time() - self.started) / 60

    def step_done(self, step: int, total: int, loop_state) -> None:
        """Call after every step: saves a checkpoint on schedule or on SIGINT/SIGTERM (then
        stops)."""
        self.ckpt.step_done(step, total, lambda: {
            "config": self.config, "rng": rng_state(), "minutes": self.minutes(),
            "loop": loop_state()})


def task_class(cfg: DictConfig) -> type[Task]:
    """The task of the model family; refuses a runtime or a feature the task cannot honour."""
    family = cfg.model.family
    if family not in TASKS:
        raise ConfigError(f"model.family must be one of {', '.join(TASKS)} (got {family!r}): "
                          "choose model=fcn|cnn|rnn|hrnn")
    runtime = cfg.runtime.name
    if runtime not in ("inprocess", "pipeline"):
        raise ConfigError(f"runtime must be inprocess or pipeline (got {runtime!r}): "
                          "choose runtime=inprocess|pipeline")
    if runtime == "pipeline":
        if cfg.get("resume"):
            raise ConfigError(f"resume={cfg.resume}: runtime=pipeline keeps no checkpoint, so "
                              "there is nothing to continue: run the command without resume= "
                              "(it trains from step 0)")
        if int(cfg.checkpoint.every) > 0:
            raise ConfigError(f"checkpoint.every={cfg.checkpoint.every}: runtime=pipeline keeps "
                              "no checkpoint: set checkpoint.every=0")
    check_family_data(cfg)
    cls = TASKS[family]
    if float(cfg.train.update_prob) < 1.0 and not cls.stochastic_updates:
        raise ConfigError(f"train.update_prob={cfg.train.update_prob} needs layers updated in "
                          f"groups (sec. 3.3), which model={cfg.model.name} does not have: set "
                          "train.update_prob=1.0, or use model=fcn|cnn")
    return cls


def run(cfg: DictConfig, out_dir: str | Path, writer: NullWriter | None = None) -> dict:
    """Train what ``cfg`` describes, log under ``out_dir``, and return the final metrics.

    A folder that holds this run's checkpoint resumes from it (``resume=<dir>`` names it
    explicitly); a folder that holds its finished summary returns it without training.
    """
    check_config(cfg)
    task_cls = task_class(cfg)
    out_dir = Path(cfg.resume) if cfg.get("resume") else Path(out_dir)
    config = identity_of(cfg)
    finished = finished_run(config, out_dir)
    if finished is not None:
        log.info("%s already holds this finished run: nothing to do", out_dir)
        return finished
    if cfg.get("resume") and not out_dir.is_dir():
        what = "a file, not a folder" if out_dir.exists() else "no such folder"
        raise SgrunError(f"resume={out_dir}: {what}: give the folder of an interrupted run")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.runtime.name == "pipeline" and os.environ.get("RANK", "0") != "0":
        # under torchrun, rank 0 holds the folder
        return _run(cfg, out_dir, config, task_cls, writer)
    with folder_lock(out_dir, fix=folder_fix()):
        return _run(cfg, out_dir, config, task_cls, writer)


def folder_fix() -> str:
    """The fix for a run folder this command cannot use: a sweep job's, or a single run's."""
    return SWEEP_JOB_FIX if os.environ.get(sweep.ENV) else RUN_FIX


def _run(cfg: DictConfig, out_dir: Path, config: dict, task_cls: type[Task],
         writer: NullWriter | None) -> dict:
    finished = finished_run(config, out_dir)  # another process may have finished it while we waited
    if finished is not None:
        return finished
    ckpt = Checkpointer(out_dir, every=cfg.checkpoint.every, enabled=cfg.checkpoint.every > 0)
    saved = ckpt.load() if out_dir.exists() else None
    if cfg.get("resume") and saved is None:
        raise SgrunError(f"resume={out_dir}: no checkpoint there: give the folder of an "
                         "interrupted run")
    if saved is not None and saved["config"] != config:
        changed = ", ".join(config_changes(saved["config"], config)[:3])
        if cfg.get("resume"):
            raise SgrunError(f"resume={out_dir}: this command changes the interrupted run's "
                             f"config ({changed}): resume with the run's own settings, or drop "
                             "resume= to start a new run")
        raise SgrunError(f"{out_dir} holds the checkpoint of a run with another config "
                         f"({changed}): {folder_fix()} (the interrupted run stays there)")
    # Zero-initialised synthesizers drive values into float32 denormals, which are ~10x slower on
    # x86 CPUs; flushing them to zero changes nothing measurable and keeps DNI fast.
    torch.set_flush_denormal(True)
    device = device_of(cfg.device)
    use_deterministic(bool(cfg.deterministic), device)
    torch.manual_seed(cfg.seed)
    session = Session(device, NullWriter(), ckpt, config)
    if saved is not None:
        set_rng_state(saved["rng"])
        session.resumed, session.minutes_before = saved["loop"], saved["minutes"]
        log.info("resuming %s from step %d", out_dir, saved["loop"]["step"])
    try:
        return _train_and_save(cfg, out_dir, task_cls, writer, saved, session, ckpt, device)
    except OutputWriteError as e:
        fix = output_fix(e.errno, e.path or out_dir)
        if ckpt.last_step is not None:
            then = (f"the last good checkpoint (step {ckpt.last_step}) is kept: {fix}, "
                    f"then continue the run with resume={out_dir}")
        else:
            then = f"no checkpoint had been written yet: {fix} and run the command again"
        raise OutputWriteError(f"{e}; {then} (the run is not marked finished)") from None


def _train_and_save(cfg, out_dir, task_cls, writer, saved, session, ckpt, device) -> dict:
    # on resume, events logged after the checkpoint are dropped so that curves do not double back
    session.writer = writer or Writer(out_dir / "tb",
                                      purge_step=saved["loop"]["step"] + 1 if saved else 0)
    try:
        with ckpt, torch_threads(cfg.runtime) as threads:
            if cfg.runtime.name == "pipeline":
                from sgrun.pipeline import (  # its own processes; imports torch.distributed
                    pipeline_threads,
                    train_pipeline,
                )

                metrics, model = train_pipeline(cfg, session)
                threads = pipeline_threads(cfg)
            else:
                task = task_cls(cfg, device)
                metrics, model = fit(task, cfg, session)
        if model is None:
            # a pipeline stage other than rank 0 under torchrun: rank 0 writes the results
            return metrics
        metrics["minutes"] = session.minutes()
        session.writer.hparams(hparams_of(cfg),
                               {k: v for k, v in metrics.items() if k != "history"})
    finally:
        session.writer.close()
    # The files the summary vouches for come first (the closed event files, the model); the
    # summary, written last, marks the run finished.
    files = file_records(out_dir / "tb", out_dir)
    # without optimizer state; on the CPU, so that a model trained on a GPU loads anywhere
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    files[MODEL] = write_bytes_atomic(out_dir / MODEL, saved_bytes(weights))
    write_json_atomic(out_dir / SUMMARY, {
        "status": "finished",
        "metrics": metrics,
        "threads": threads,  # torch threads (per process for a pipeline): they change the numbers
        "files": files,
        "choices": choices_of(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
    })
    ckpt.clear()
    return metrics


def use_deterministic(on: bool, device: torch.device) -> None:
    """``deterministic=true``: torch's deterministic algorithms, in this process (a run's, or a
    pipeline stage's)."""
    if on and device.type == "cuda":
        # deterministic cuBLAS needs a fixed workspace (torch refuses matmuls without it)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=False)


def saved_bytes(obj) -> bytes:
    """``obj`` as ``torch.save`` writes it, in memory (for
    :func:`~sgrun.metrics.write_bytes_atomic`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@contextlib.contextmanager
def torch_threads(runtime: DictConfig):
    """An in-process run's torch threads: ``runtime.threads``, or for ``null`` the thread count of
    the ``sgrun`` command that was started, in every job whichever launcher runs it
    (:mod:`sgrun.threads`); yields the count.  The setting is process-wide, so it is restored
    afterwards.  A pipeline sets its stages' own (yields None)."""
    before = torch.get_num_threads()
    threads = None
    if runtime.name == "inprocess":
        threads = resolve_threads(runtime.get("threads"))
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def fit(task: Task, cfg: DictConfig, session: Session) -> tuple[dict, nn.Module]:
    """Train ``task`` for ``train.steps`` optimizer steps; returns its final metrics and model."""
    t = cfg.train
    steps, eval_every, log_every = int(t.steps), int(t.eval_every), int(t.log_every)
    writer, model = session.writer, task.model
    task.writer = writer
    opt, sched = build_optimizer(cfg, *task.parameter_groups(), steps)
    update_prob = float(t.update_prob)
    groups = task.layer_groups() if update_prob < 1.0 else []
    update_gen = torch.Generator().manual_seed(cfg.seed + 1)
    sums: dict[str, torch.Tensor] = {}  # detached step values since the last logging step
    seconds: list[float] = []  # training seconds at each evaluation (without evaluation time)
    first, tick_step, skipped, last_ckpt = 1, 0, 0, None
    if session.resumed is not None:
        r = session.resumed
        task.load_state_dict(r["task"])
        opt.load_state_dict(r["opt"])
        sched.load_state_dict(r["sched"])
        update_gen.set_state(r["update_gen"])
        # the checkpoint is read onto the CPU: the running sums go back to the run's device
        sums = {k: v.to(session.device) for k, v in r["sums"].items()}
        seconds, skipped = list(r["seconds"]), r["skipped"]
        tick_step, first, last_ckpt = r["tick_step"], r["step"] + 1, r["step"]
    lr = float(cfg.optim.lr)
    log.info("%s", task.describe())
    log.info("%s", budget_line(cfg, steps, lr, log_every, eval_every, torch.get_num_threads()))
    # the run's time, logged once at the measured speed
    estimated, timed_from, eval_before = False, 0.0, 0.0

    def loop_state() -> dict:
        nonlocal last_ckpt
        # never checkpoint a diverged run
        check_finite({k: float(v) for k, v in sums.items()}, step, lr, last_ckpt)
        last_ckpt = step
        return {"step": step, "task": task.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "update_gen": update_gen.get_state(),
                "sums": {k: v.clone() for k, v in sums.items()},
                "seconds": list(seconds), "skipped": skipped, "tick_step": tick_step}

    seconds_before = seconds[-1] if seconds else 0.0  # training seconds before a resume
    tick = time.time()
    loop_start, eval_time = tick - seconds_before, 0.0
    model.train()
    step = first - 1
    with progress(steps, first - 1) as bar:
        for step in range(first, steps + 1):
            task.step = step
            logging_step = step % log_every == 0 or step == steps
            batch = task.next_batch()
            if logging_step and not task.diagnose_after_step:
                writer.scalars(task.diagnostics(batch), step)
            opt.zero_grad(set_to_none=True)
            values = task.train_step(batch)
            skipped += skip_updates(groups, update_prob, update_gen)
            opt.step()
            sched.step()
            for tag, value in values.items():  # in place: no new tensor per step
                if tag in sums:
                    sums[tag].add_(value)
                else:
                    sums[tag] = value.clone()

            if logging_step:
                count = step - tick_step
                totals = {tag: float(v) for tag, v in sums.items()}
                check_finite(totals, step, lr, last_ckpt)
                now = time.time()
                logged = task.log_values(totals, count)
                logged[f"perf/{task.unit}_per_sec"] = (count * task.units_per_step()
                                                       / max(now - tick, 1e-9))
                logged["perf/steps_per_sec"] = count / max(now - tick, 1e-9)
                logged["optim/lr"] = opt.param_groups[0]["lr"]
                if update_prob < 1.0:
                    logged["updates/skipped_groups"] = skipped
                writer.scalars(logged, step)
                if task.diagnose_after_step:
                    writer.scalars(task.diagnostics(batch), step)
                sums.clear()
                tick, tick_step = time.time(), step
                first_tag = next(iter(values), None)
                shown = ({first_tag.split("/")[-1]: f"{logged[first_tag]:.3f}"}
                         if first_tag in logged else {})
                bar.set_postfix(**shown, **task.progress())
            if task.evaluates and (step % eval_every == 0 or step == steps):
                t_eval = time.time()
                seconds.append(round(t_eval - loop_start - eval_time, 3))
                writer.scalars(task.evaluate(step), step)
                eval_time += time.time() - t_eval
            if not estimated and step < steps:  # timed from the end of the first step (its warm-up)
                now = time.time()
                if step == first:
                    timed_from, eval_before = now, eval_time
                elif logging_step or now - timed_from - (eval_time - eval_before) >= ESTIMATE_AFTER:
                    timed = now - timed_from - (eval_time - eval_before)
                    log.info("%s", estimate_line(step - first, timed, steps - first + 1, first > 1))
                    estimated = True
            bar.update(1)
            session.step_done(step, steps, loop_state)
            if task.should_stop():
                break
    metrics = task.final_metrics(step)
    if seconds:
        metrics["seconds"] = seconds
        done = (step - first + 1) * task.units_per_step()
        metrics[f"{task.unit}_per_sec"] = done / max(seconds[-1] - seconds_before, 1e-9)
    if update_prob < 1.0:
        metrics["skipped_groups"] = skipped
        log.info("stochastic updates: %d of %d layer-group updates skipped", skipped,
                 step * len(groups))
    return metrics, model


@contextlib.contextmanager
def progress(total: int, initial: int = 0, show: bool = True) -> Iterator[tqdm]:
    """The one progress bar of sgrun (``fit``'s, and the pipeline's rank 0's): drawn on a terminal
    only, with every log line written above it instead of onto it; ``show=False`` draws nothing."""
    # a thread lock, not tqdm's default multiprocessing one: a pipeline stage that is killed would
    # leak that one's semaphore (and Python would say so on the run's last line)
    tqdm.set_lock(threading.RLock())
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                   disable=None if show else True, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()


ESTIMATE_AFTER = 5.0  # seconds of training before the run's time is estimated (or the first log)


def budget_line(cfg: DictConfig, steps: int, lr: float, log_every: int, eval_every: int,
                threads: int) -> str:
    """The one line that says what a run will do; a paper preset points to its CPU-sized budget."""
    line = (f"budget: profile={cfg.profile.name}, {steps} steps, lr {lr:.3g}, "
            f"log every {log_every}, evaluate every {eval_every}, {threads} torch thread(s)")
    if cfg.profile.name == "paper" and cfg.get("name"):
        line += " (for a CPU-sized run: add profile=cpu)"
    return line


def estimate_line(done: int, seconds: float, total: int, resumed: bool = False) -> str:
    """How long ``total`` steps take at the speed of the first ``done`` (training only)."""
    rate = done / max(seconds, 1e-9)
    minutes = total / rate / 60
    shown = f"{minutes:.1f}" if minutes < 10 else f"{minutes:.0f}"
    hours = f" ({minutes / 60:.0f} h)" if minutes >= 120 else ""
    what = f"the {total} remaining steps" if resumed else f"all {total} steps"
    return f"budget: about {shown} min{hours} for {what} at the measured {rate:.3g} steps/s"


# Settings that change how a run is carried out, not what it computes: a run resumed or re-run with
# other values of these is still the same run.
OPERATIONAL = ("resume", "checkpoint", "device", "deterministic", "data_dir")


def identity_of(cfg: DictConfig) -> dict:
    """The resolved config that makes a run what it is (compared before resuming or skipping)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in OPERATIONAL:
        config.pop(key, None)
    return config


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf of two configs that differs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def finished_run(config: dict, out_dir: Path) -> dict | None:
    """The metrics of ``out_dir``'s finished run if it is this very config; another run is never
    overwritten."""
    path = out_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        # a summary cut short or corrupted marks nothing finished: the run is resumed or redone
        log.warning("%s is unreadable: the run there is not counted as finished", path)
        return None
    try:
        stored = {k: v for k, v in summary["config"].items() if k not in OPERATIONAL}
        same = stored == config
        files = summary.get("files", {})
    except (KeyError, TypeError, AttributeError):
        same, files = False, {}  # a summary.json that is not this run's: never written over
    if same and not all(verify_file(out_dir / name, record) for name, record in files.items()):
        log.warning("%s lists files that are missing or fail their checksum: the run is redone",
                    path)
        return None
    if not same:
        raise SgrunError(f"{out_dir} already holds a different finished run: choose another "
                         "folder with hydra.run.dir=<dir> (or hydra.sweep.dir=<dir> for -m), or "
                         "delete that one")
    return summary["metrics"]


def choices_of(cfg: DictConfig) -> dict:
    choices = {"experiment": cfg.get("name"), "model": cfg.model.name, "dni": cfg.dni.name,
               "data": cfg.data.name, "profile": cfg.profile.name, "seed": cfg.seed}
    if cfg.model.get("coupling"):
        choices["coupling"] = cfg.model.coupling  # the two-timescale runs differ only in this
    return choices


def hparams_of(cfg: DictConfig) -> dict:
    h = choices_of(cfg)
    h.update({"layers": cfg.model.get("layers", 0), "lr": cfg.optim.lr, "steps": cfg.train.steps,
              "update_prob": cfg.train.get("update_prob", 1.0)})
    return {k: ("" if v is None else v) for k, v in h.items()}
