"""The locked pipeline as it is usually run: backprop with micro-batches through
``torch.distributed.pipelining`` (``runtime.schedule=gpipe|1f1b``).

The split, the processes, the batches, the optimizers and the evaluation are those of
:mod:`sgrun.pipeline.stage`; only a stage's training step differs.  Each batch is cut into
``runtime.microbatches`` equal micro-batches along the batch dimension; torch's schedule runs their
forwards and backwards across the stages (GPipe: all forwards, then all backwards; 1F1B: one
forward, one backward in the steady state, at most ``S - s`` micro-batches in flight at stage
``s``), the gradients of the micro-batches' mean losses are summed and divided by their number,
and every stage then takes one optimizer step: the same gradient, up to rounding, as the mean loss
of the whole batch, when nothing in the model depends on the batch as a whole.

BatchNorm does: each micro-batch is normalised by its own statistics and the running statistics
move once per micro-batch.  So with one micro-batch a GPipe run equals the in-process Bprop run
bit for bit; with ``M`` micro-batches it equals in-process gradient accumulation over the same
``M`` micro-batches, and differs from full-batch Bprop as a smaller batch for BatchNorm does.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from sgrun.pipeline.split import TORCH_SCHEDULES
from sgrun.pipeline.stage import Stage


class _Part(nn.Module):
    """A stage's blocks (and the head on the last stage) as torch's schedules call them: one
    tensor in, one tensor out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h, None)


class ScheduledStage(Stage):
    """A stage trained by ``ScheduleGPipe`` or ``Schedule1F1B`` (see the module docstring)."""

    def __init__(self, cfg: DictConfig, *args, **kwargs) -> None:
        super().__init__(cfg, *args, **kwargs)
        self.schedule_name = str(cfg.runtime.schedule)
        self.microbatches = int(cfg.runtime.microbatches)
        self.schedule = None  # built at the first step, once the process group exists

    def _build(self):
        from torch.distributed import pipelining

        mb = self.batch // self.microbatches
        out = (self.num_classes,) if self.last else self.out_shape
        # example tensors of one micro-batch: the shapes are known, so torch infers nothing
        # (its inference would run an extra forward, moving the BatchNorm statistics); an input
        # from another stage needs its gradient, which goes back to that stage
        example_in = torch.empty(mb, *self.in_shape, device=self.device)
        example_in.requires_grad_(not self.first)
        example_out = torch.empty(mb, *out, device=self.device).requires_grad_(True)
        stage = pipelining.PipelineStage(_Part(self.net), self.rank, self.split.stages, self.device,
                                         input_args=example_in, output_args=example_out)
        kind = getattr(pipelining, TORCH_SCHEDULES[self.schedule_name])
        return kind(stage, self.microbatches, loss_fn=self.task.loss, scale_grads=True)

    def train_step(self) -> None:
        if self.schedule is None:
            self.schedule = self._build()
        self.step += 1
        upd = self.draw_updates()
        self.opt.zero_grad(set_to_none=True)
        if self.first:
            x, y = self.sampler.next()
        else:
            x, y = None, self.sampler.next_labels()  # the same batch as stage 0's
        args = (x,) if self.first else ()
        if self.last:
            losses: list[torch.Tensor] = []
            self.schedule.step(*args, target=y, losses=losses, return_outputs=False)
            mean = sum(float(v.detach()) for v in losses) / len(losses)
            self.values["loss/train"].append((self.step, mean))
        else:
            self.schedule.step(*args, return_outputs=False)
        self.skip_updates(upd)
        self.opt.step()
        self.sched.step()
