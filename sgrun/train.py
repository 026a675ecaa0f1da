"""``run(cfg, out_dir) -> metrics``: the training loops, readable top to bottom.

``run`` checks the config, refuses to write over a finished run, dispatches on the model family
(``feedforward`` here; the recurrent loops live in :mod:`sgrun.train_rnn`) and writes
``summary.json`` (final metrics + resolved config) next to the TensorBoard events.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sgrun.build import build_model, build_optimizer, device_of, placement_of
from sgrun.checks import check_config
from sgrun.data.images import load_images
from sgrun.dni import gradient_quality, interfaces_of
from sgrun.errors import SgrunError
from sgrun.metrics import NullWriter, Writer, write_json_atomic

log = logging.getLogger("sgrun")

SUMMARY = "summary.json"


def budget(cfg: DictConfig) -> tuple[int, float]:
    """Steps and learning rate of this run: the preset's values rescaled by the profile."""
    p = cfg.profile
    steps = max(1, int(round(cfg.train.steps * p.step_fraction)))
    if p.get("max_steps"):
        steps = min(steps, int(p.max_steps))
    return steps, float(cfg.optim.lr) * float(p.lr_factor)


def run(cfg: DictConfig, out_dir: str | Path, writer: NullWriter | None = None) -> dict:
    """Train what ``cfg`` describes, log under ``out_dir``, and return the final metrics."""
    check_config(cfg)
    out_dir = Path(out_dir)
    finished = finished_run(cfg, out_dir)
    if finished is not None:
        log.info("%s already holds this finished run: nothing to do", out_dir)
        return finished
    out_dir.mkdir(parents=True, exist_ok=True)
    # Zero-initialised synthesizers drive values into float32 denormals, which are ~10x slower on
    # x86 CPUs; flushing them to zero changes nothing measurable and keeps DNI fast.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    device = device_of(cfg.device)
    writer = writer or Writer(out_dir / "tb")
    start = time.time()
    family = cfg.model.family
    try:
        if family == "feedforward":
            metrics = train_classifier(cfg, device, writer)
        else:
            from sgrun import train_rnn

            metrics = train_rnn.LOOPS[family](cfg, device, writer)
        metrics["minutes"] = (time.time() - start) / 60
        writer.hparams(hparams_of(cfg), {k: v for k, v in metrics.items() if k != "history"})
    finally:
        writer.close()
    write_json_atomic(out_dir / SUMMARY, {
        "status": "finished",
        "metrics": metrics,
        "choices": choices_of(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
    })
    return metrics


def finished_run(cfg: DictConfig, out_dir: Path) -> dict | None:
    """The metrics of ``out_dir``'s finished run if it is this very config; another run is never overwritten."""
    path = out_dir / SUMMARY
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
        same = summary["config"] == OmegaConf.to_container(cfg, resolve=True)
    except (ValueError, KeyError, TypeError):
        same, summary = False, None
    if not same:
        raise SgrunError(f"{out_dir} already holds a different finished run: choose another folder with "
                         "hydra.run.dir=<dir> (or hydra.sweep.dir=<dir> for -m), or delete that one")
    return summary["metrics"]


def choices_of(cfg: DictConfig) -> dict:
    return {"experiment": cfg.get("name"), "model": cfg.model.name, "dni": cfg.dni.name, "data": cfg.data.name,
            "profile": cfg.profile.name, "seed": cfg.seed}


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
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.x), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size].to(self.x.device)
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]


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


def train_classifier(cfg: DictConfig, device: torch.device, writer: NullWriter) -> dict:
    """MNIST / CIFAR-10 classification with FCNs or CNNs (paper sec. 3.3)."""
    data = load_images(cfg.data.name, cfg.data_dir, download=cfg.data.download,
                       **OmegaConf.to_container(cfg.data.options, resolve=True))
    test_x, test_y = data.test_x, data.test_y
    if cfg.profile.get("eval_limit"):
        test_x, test_y = test_x[:cfg.profile.eval_limit], test_y[:cfg.profile.eval_limit]
    model = build_model(cfg, in_shape=data.shape, num_classes=data.num_classes,
                        placement=placement_of(cfg.dni)).to(device)
    conditioned = bool(cfg.dni.conditioned) and len(model.interfaces) > 0
    steps, lr = budget(cfg)
    opt, sched = build_optimizer(cfg, model, steps, lr)
    sampler = BatchSampler(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed, device)
    update_gen = torch.Generator().manual_seed(cfg.seed + 1)
    groups = model.layer_groups()
    t = cfg.train
    log.info("%s: %d steps, batch %d, lr %.2g, %d interfaces, device %s", data.name, steps, sampler.batch_size, lr,
             len(model.interfaces), device)

    def loss_on(x, y):
        ctx = nn.functional.one_hot(y, data.num_classes).float() if conditioned else None
        return nn.functional.cross_entropy(model(x, ctx), y)

    history: list[tuple[int, float]] = []
    loss_sum = torch.zeros((), device=device)
    tick, tick_step = time.time(), 0
    model.train()
    bar = tqdm(total=steps, desc="train", unit="step", disable=None, dynamic_ncols=True)
    for step in range(1, steps + 1):
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
            mean_loss = float(loss_sum) / (step - tick_step)
            if not math.isfinite(mean_loss):
                raise SgrunError(f"training loss became {mean_loss} by step {step}: lower optim.lr "
                                 f"(now {lr:.2g}) and run again")
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
        if step % t.eval_every == 0 or step == steps:
            err = classification_error(model, test_x, test_y, device)
            writer.scalar("error/test", err, step)
            history.append((step, err))
            log.info("step %d/%d  test error %.2f%%", step, steps, err)
        bar.update(1)
    bar.close()
    return {"test_error": history[-1][1], "best_test_error": min(e for _, e in history), "steps": steps,
            "history": history}
