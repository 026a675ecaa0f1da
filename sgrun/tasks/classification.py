"""Image classification with FCNs and CNNs: MNIST and CIFAR-10 (Jaderberg et al. 2017, sec. 3.3)."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from sgrun.build import build_images, build_model, placement_of
from sgrun.dni import gradient_quality, interfaces_of
from sgrun.tasks.base import Task

log = logging.getLogger("sgrun")


class BatchSampler:
    """Random mini-batches from in-memory tensors, a fresh permutation each epoch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device) -> None:
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


def evaluation_split(cfg: DictConfig, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels evaluated: the first ``data.test_limit`` (smoke), or all."""
    limit = cfg.data.get("test_limit")
    return (data.test_x[:limit], data.test_y[:limit]) if limit else (data.test_x, data.test_y)


@torch.no_grad()
def classification_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                         batch: int = 2000) -> float:
    """Classification error in percent, in eval mode (interfaces are the identity there)."""
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch].to(device))
        wrong += int((logits.argmax(1) != y[i:i + batch].to(device)).sum())
    model.train(was_training)
    return 100.0 * wrong / len(x)


def label_context(y: torch.Tensor, num_classes: int, conditioned: bool) -> torch.Tensor | None:
    """The synthesizers' context: the one-hot label for cDNI (sec. 3.3), none for DNI."""
    return nn.functional.one_hot(y, num_classes).float() if conditioned else None


class Classification(Task):
    """Cross-entropy on mini-batches; test error every ``train.eval_every`` steps."""

    stochastic_updates = True
    primary = "test_error"

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        self.device = device
        self.data = data = build_images(cfg)
        self.test_x, self.test_y = evaluation_split(cfg, data)
        self.model = build_model(cfg.model, in_shape=data.shape, num_classes=data.num_classes,
                                 placement=placement_of(cfg.dni)).to(device)
        # cDNI (sec. 3.3): the synthesizers also see the one-hot label
        self.conditioned = bool(cfg.dni.conditioned) and len(self.model.interfaces) > 0
        self.sampler = BatchSampler(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed,
                                    device)
        self.sg_quality = bool(cfg.train.sg_quality) and len(self.model.interfaces) > 0
        # found once: train_step reads their records every step
        self.interfaces = interfaces_of(self.model)
        self.history: list[tuple[int, float]] = []

    def units_per_step(self) -> int:
        return self.sampler.batch_size

    def parameter_groups(self):
        # synthesizers and input models (everything in an interface) share the synthesizer
        # learning rate
        synth = {id(p) for i in self.interfaces for p in i.parameters()}
        params = list(self.model.parameters())
        return [p for p in params if id(p) not in synth], [p for p in params if id(p) in synth]

    def layer_groups(self):
        return self.model.layer_groups()

    def describe(self) -> str:
        return (f"{self.data.name}: {type(self.model).__name__}, batch {self.sampler.batch_size}, "
                f"{len(self.model.interfaces)} interfaces, device {self.device}")

    def context(self, y: torch.Tensor) -> torch.Tensor | None:
        """The synthesizers' context for labels ``y`` (cDNI: their one-hot; DNI: none)."""
        return label_context(y, self.data.num_classes, self.conditioned)

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y)

    def loss_on(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model(x, self.context(y)), y)

    def next_batch(self):
        return self.sampler.next()

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        return self.slice_step(self.model, self.interfaces, x, y)

    def slice_step(self, net: nn.Module, interfaces, x: torch.Tensor, y: torch.Tensor,
                   data: torch.Tensor | None = None, top=None) -> dict[str, torch.Tensor]:
        """Forward and one backward of ``net``: the whole model (:meth:`train_step`), or a
        pipeline stage's slice of it (:class:`sgrun.pipeline.stage.Stage`), whose ``interfaces``
        work as in the whole model.

        ``x`` is the slice's input (the data, or an activation from below), ``data`` the batch's
        data for a slice whose interfaces predict synthetic inputs from it.  ``top(out, context)``
        gives the gradient the backward of a slice below the head starts from (synthetic, or the
        one sent back from above); without ``top`` it starts from the loss."""
        ctx = self.context(y)
        out = net(x, ctx) if data is None else net(x, ctx, data)
        values = {}
        if top is None:
            loss = self.loss(out, y)
            loss.backward()  # one backward: model, synthesizers and bootstrapped targets
            values["loss/train"] = loss.detach()
        else:
            out.backward(top(out, ctx))
        for iface in interfaces:
            for name in ("sg_loss", "input_loss"):
                value = getattr(iface.record, name, None)
                if value is not None:
                    values[f"dni/{iface.name}/{name}"] = value
        return values

    def diagnostics(self, batch) -> dict[str, float]:
        if not self.sg_quality:
            return {}
        x, y = batch
        # SG quality against the true gradient: an extra forward/backward, logging steps only
        quality = gradient_quality(self.model, lambda: self.loss_on(x, y))
        return {f"dni/{cut}/{key}": q[name] for cut, q in quality.items()
                for key, name in (("cosine", "cosine"), ("mse_true", "mse"))}

    def evaluate(self, step: int) -> dict[str, float]:
        err = classification_error(self.model, self.test_x, self.test_y, self.device)
        self.history.append((step, err))
        log.info("step %d  test error %.2f%%", step, err)
        return {"error/test": err}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "sampler": self.sampler.state_dict(),
                "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.sampler.load_state_dict(state["sampler"])
        self.history = [tuple(h) for h in state["history"]]

    def final_metrics(self, steps: int) -> dict:
        return {"test_error": self.history[-1][1],
                "best_test_error": min(e for _, e in self.history),
                "steps": steps, "history": self.history}

    @staticmethod
    def headline(metrics: dict) -> str:
        return f"test error {metrics['test_error']:.2f} % (best {metrics['best_test_error']:.2f} %)"
