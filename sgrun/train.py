"""``run(cfg, out_dir) -> metrics``: the training loops, readable top to bottom.

``run`` checks the config, refuses to write over a finished run, dispatches on the model family
(``feedforward`` here; the recurrent loops live in :mod:`sgrun.train_rnn`) and writes
``summary.json`` (final metrics + resolved config) next to the TensorBoard events.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sgrun.build import build_model, build_optimizer, device_of, placement_of
from sgrun.checkpoint import Checkpointer, rng_state, set_rng_state
from sgrun.checks import check_config
from sgrun.data.images import load_images
from sgrun.dni import gradient_quality, interfaces_of
from sgrun.errors import SgrunError
from sgrun.metrics import NullWriter, Writer, write_json_atomic

log = logging.getLogger("sgrun")

SUMMARY = "summary.json"


def budget(cfg: DictConfig) -> tuple[int, float, int]:
    """Steps, learning rate and evaluation interval: the preset's values rescaled by the profile
    (a shorter run is evaluated as many times as the full one)."""
    p = cfg.profile
    steps = max(1, int(round(cfg.train.steps * p.step_fraction)))
    eval_every = max(1, int(round(cfg.train.eval_every * p.step_fraction)))
    if p.get("max_steps"):
        steps = min(steps, int(p.max_steps))
    return steps, float(cfg.optim.lr) * float(p.lr_factor), eval_every


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
        """Call after every step: saves a checkpoint on schedule or on SIGINT/SIGTERM (then stops)."""
        self.ckpt.step_done(step, total, lambda: {
            "config": self.config, "rng": rng_state(), "minutes": self.minutes(), "loop": loop_state()})


def run(cfg: DictConfig, out_dir: str | Path, writer: NullWriter | None = None) -> dict:
    """Train what ``cfg`` describes, log under ``out_dir``, and return the final metrics.

    A folder that holds this run's checkpoint resumes from it (``resume=<dir>`` names it
    explicitly); a folder that holds its finished summary returns it without training.
    """
    check_config(cfg)
    out_dir = Path(cfg.resume) if cfg.get("resume") else Path(out_dir)
    config = identity_of(cfg)
    finished = finished_run(config, out_dir)
    if finished is not None:
        log.info("%s already holds this finished run: nothing to do", out_dir)
        return finished
    ckpt = Checkpointer(out_dir, every=cfg.checkpoint.every, enabled=cfg.checkpoint.every > 0)
    saved = ckpt.load() if out_dir.exists() else None
    if cfg.get("resume") and saved is None:
        raise SgrunError(f"resume={out_dir}: no checkpoint there: give the folder of an interrupted run")
    if saved is not None and saved["config"] != config:
        raise SgrunError(f"{out_dir} holds a checkpoint of a different run: choose another folder with "
                         "hydra.run.dir=<dir>, or delete its checkpoint.pt to start afresh")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Zero-initialised synthesizers drive values into float32 denormals, which are ~10x slower on
    # x86 CPUs; flushing them to zero changes nothing measurable and keeps DNI fast.
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(bool(cfg.deterministic), warn_only=False)
    torch.manual_seed(cfg.seed)
    device = device_of(cfg.device)
    session = Session(device, NullWriter(), ckpt, config)
    if saved is not None:
        set_rng_state(saved["rng"])
        session.resumed, session.minutes_before = saved["loop"], saved["minutes"]
        log.info("resuming %s from step %d", out_dir, saved["loop"]["step"])
    # on resume, events logged after the checkpoint are dropped so that curves do not double back
    session.writer = writer or Writer(out_dir / "tb", purge_step=saved["loop"]["step"] + 1 if saved else 0)
    try:
        with ckpt:
            metrics, model = loop_of(cfg.model.family, cfg.runtime.name)(cfg, session)
        if model is None:  # a pipeline stage other than rank 0 under torchrun: rank 0 writes the results
            return metrics
        metrics["minutes"] = session.minutes()
        session.writer.hparams(hparams_of(cfg), {k: v for k, v in metrics.items() if k != "history"})
    finally:
        session.writer.close()
    write_json_atomic(out_dir / SUMMARY, {
        "status": "finished",
        "metrics": metrics,
        "choices": choices_of(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
    })
    torch.save(model.state_dict(), out_dir / "model.pt")  # the trained model, without optimizer state
    ckpt.clear()
    return metrics


# model family -> module holding its training loop ``LOOPS[family](cfg, session) -> (metrics, model)``
LOOP_MODULES = {"feedforward": "sgrun.train", "rnn": "sgrun.train_rnn", "hrnn": "sgrun.train_hrnn"}


def loop_of(family: str, runtime: str = "inprocess"):
    if runtime == "pipeline":
        return importlib.import_module("sgrun.pipeline").train_pipeline
    if runtime != "inprocess":
        raise SgrunError(f"runtime must be inprocess or pipeline (got {runtime!r}): choose runtime=inprocess|pipeline")
    if family not in LOOP_MODULES:
        raise SgrunError(f"model.family must be one of {', '.join(LOOP_MODULES)} (got {family!r}): choose "
                         "model=fcn|cnn|rnn|hrnn")
    return importlib.import_module(LOOP_MODULES[family]).LOOPS[family]


# Settings that change how a run is carried out, not what it computes: a run resumed or re-run with
# other values of these is still the same run.
OPERATIONAL = ("resume", "checkpoint", "device", "deterministic", "data_dir")


def identity_of(cfg: DictConfig) -> dict:
    """The resolved config that makes a run what it is (compared before resuming or skipping)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in OPERATIONAL:
        config.pop(key, None)
    return config


def finished_run(config: dict, out_dir: Path) -> dict | None:
    """The metrics of ``out_dir``'s finished run if it is this very config; another run is never overwritten."""
    path = out_dir / SUMMARY
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        stored = {k: v for k, v in summary["config"].items() if k not in OPERATIONAL}
        same = stored == config
    except (ValueError, KeyError, TypeError):
        same, summary = False, None
    if not same:
        raise SgrunError(f"{out_dir} already holds a different finished run: choose another folder with "
                         "hydra.run.dir=<dir> (or hydra.sweep.dir=<dir> for -m), or delete that one")
    return summary["metrics"]


def choices_of(cfg: DictConfig) -> dict:
    choices = {"experiment": cfg.get("name"), "model": cfg.model.name, "dni": cfg.dni.name, "data": cfg.data.name,
               "profile": cfg.profile.name, "seed": cfg.seed}
    if cfg.model.get("coupling"):
        choices["coupling"] = cfg.model.coupling  # the two-timescale runs differ only in this
    return choices


def hparams_of(cfg: DictConfig) -> dict:
    h = choices_of(cfg)
    h.update({"layers": cfg.model.get("layers", 0), "lr": cfg.optim.lr, "steps": budget(cfg)[0],
              "update_prob": cfg.train.get("update_prob", 1.0)})
    return {k: ("" if v is None else v) for k, v in h.items()}


class BatchSampler:
    """Random mini-batches from in-memory tensors, a fresh permutation each epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: torch.device) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size = min(batch_size, len(x))
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(x), generator=self.gen)
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._next_index()
        return self.x[idx], self.y[idx]

    def next_labels(self) -> torch.Tensor:
        """The labels of the batch :meth:`next` would give, without gathering its inputs."""
        return self.y[self._next_index()]

    def _next_index(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.x), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size].to(self.x.device)
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos = state["order"], state["pos"]


@torch.no_grad()
def classification_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 2000) -> float:
    """Classification error in percent, in eval mode (interfaces are the identity there)."""
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch].to(device))
        wrong += int((logits.argmax(1) != y[i:i + batch].to(device)).sum())
    model.train(was_training)
    return 100.0 * wrong / len(x)


def skip_updates(groups: list[list[nn.Module]], prob: float, gen: torch.Generator) -> None:
    """Stochastic updates (Jaderberg et al. 2017, sec. 3.3): each layer group, with its synthesizer,
    is updated only with probability ``prob``; a skipped group's gradients are dropped so that Adam
    leaves its parameters (and moments) alone this step."""
    if prob >= 1.0:
        return  # no random draw: the run stays identical to the ordinary one
    for group in groups:
        if torch.rand((), generator=gen) >= prob:
            for module in group:
                for p in module.parameters():
                    p.grad = None


def check_finite(step: int, loss_sum: torch.Tensor, model: nn.Module, lr: float) -> None:
    """Divergence guard: stop with the step and the interface that went non-finite."""
    for iface in interfaces_of(model):
        if iface.record.sg_loss is not None and not torch.isfinite(iface.record.sg_loss):
            raise SgrunError(f"the synthetic gradient at interface {iface.name} became non-finite by step {step}: "
                             f"lower optim.lr (now {lr:.2g}) or dni.scale and run again; the last good "
                             "checkpoint is kept")
    if not torch.isfinite(loss_sum):
        raise SgrunError(f"the training loss became non-finite by step {step}: lower optim.lr (now {lr:.2g}) "
                         "and run again; the last good checkpoint is kept")


def train_classifier(cfg: DictConfig, session: Session) -> dict:
    """MNIST / CIFAR-10 classification with FCNs or CNNs (paper sec. 3.3)."""
    device, writer = session.device, session.writer
    data = load_images(cfg.data.name, cfg.data_dir, download=cfg.data.download,
                       **OmegaConf.to_container(cfg.data.options, resolve=True))
    test_x, test_y = data.test_x, data.test_y
    if cfg.profile.get("eval_limit"):
        test_x, test_y = test_x[:cfg.profile.eval_limit], test_y[:cfg.profile.eval_limit]
    model = build_model(cfg, in_shape=data.shape, num_classes=data.num_classes,
                        placement=placement_of(cfg.dni)).to(device)
    conditioned = bool(cfg.dni.conditioned) and len(model.interfaces) > 0
    steps, lr, eval_every = budget(cfg)
    opt, sched = build_optimizer(cfg, model, steps, lr)
    sampler = BatchSampler(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed, device)
    update_gen = torch.Generator().manual_seed(cfg.seed + 1)
    groups = model.layer_groups()
    t = cfg.train
    history: list[tuple[int, float]] = []
    loss_sum = torch.zeros((), device=device)
    first, tick_step = 1, 0

    def loop_state() -> dict:
        check_finite(step, loss_sum, model, lr)  # never checkpoint a diverged run
        return {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "sampler": sampler.state_dict(), "update_gen": update_gen.get_state(), "history": list(history),
                "loss_sum": loss_sum.clone(), "tick_step": tick_step, "seconds": list(seconds)}

    if session.resumed is not None:
        r = session.resumed
        model.load_state_dict(r["model"])
        opt.load_state_dict(r["opt"])
        sched.load_state_dict(r["sched"])
        sampler.load_state_dict(r["sampler"])
        update_gen.set_state(r["update_gen"])
        history, tick_step, first = [tuple(h) for h in r["history"]], r["tick_step"], r["step"] + 1
        loss_sum.copy_(r["loss_sum"])
    log.info("%s: %d steps, batch %d, lr %.2g, %d interfaces, device %s", data.name, steps, sampler.batch_size, lr,
             len(model.interfaces), device)

    def loss_on(x, y):
        ctx = nn.functional.one_hot(y, data.num_classes).float() if conditioned else None
        return nn.functional.cross_entropy(model(x, ctx), y)

    tick = time.time()
    eval_time = 0.0  # seconds spent evaluating, left out of the training time and speed
    seconds = list(session.resumed.get("seconds", [])) if session.resumed is not None else []
    seconds_before = seconds[-1] if seconds else 0.0  # training seconds before a resume
    loop_start = tick - seconds_before
    model.train()
    bar = tqdm(total=steps, initial=first - 1, desc="train", unit="step", disable=None, dynamic_ncols=True)
    for step in range(first, steps + 1):
        x, y = sampler.next()
        logging_step = step % t.log_every == 0 or step == steps
        if logging_step and model.interfaces and t.sg_quality:
            # SG quality against the true gradient: an extra forward/backward, logging steps only
            for cut, q in gradient_quality(model, lambda x=x, y=y: loss_on(x, y)).items():
                writer.scalars({f"dni/{cut}/cosine": q["cosine"], f"dni/{cut}/mse_true": q["mse"]}, step)

        loss = loss_on(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # one backward: model, synthesizers and bootstrapped targets
        skip_updates(groups, t.update_prob, update_gen)
        opt.step()
        sched.step()
        loss_sum += loss.detach()

        if logging_step:
            check_finite(step, loss_sum, model, lr)
            mean_loss = float(loss_sum) / (step - tick_step)
            now = time.time()
            writer.scalar("loss/train", mean_loss, step)
            writer.scalar("perf/steps_per_sec", (step - tick_step) / max(now - tick, 1e-9), step)
            writer.scalar("optim/lr", opt.param_groups[0]["lr"], step)
            for iface in interfaces_of(model):
                if iface.record.sg_loss is not None:
                    writer.scalar(f"dni/{iface.name}/sg_loss", float(iface.record.sg_loss), step)
            loss_sum.zero_()
            tick, tick_step = now, step
            bar.set_postfix(loss=f"{mean_loss:.3f}")
        if step % eval_every == 0 or step == steps:
            t_eval = time.time()
            seconds.append(round(t_eval - loop_start - eval_time, 3))
            err = classification_error(model, test_x, test_y, device)
            writer.scalar("error/test", err, step)
            history.append((step, err))
            eval_time += time.time() - t_eval
            log.info("step %d/%d  test error %.2f%%", step, steps, err)
        bar.update(1)
        session.step_done(step, steps, loop_state)
    bar.close()
    # training seconds at each evaluation (this process's, without evaluation time; since a resume)
    metrics = {"test_error": history[-1][1], "best_test_error": min(e for _, e in history), "steps": steps,
               "history": history, "seconds": seconds,
               "samples_per_sec": (steps - first + 1) * sampler.batch_size / max(seconds[-1] - seconds_before, 1e-9)}
    return metrics, model


LOOPS = {"feedforward": train_classifier}
