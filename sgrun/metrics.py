"""TensorBoard logging, plus a null writer with the same methods for tests and notebooks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class NullWriter:
    """Drops everything; same methods as :class:`Writer`."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class Writer(NullWriter):
    """One ``SummaryWriter`` per run, tags ``area/name`` (``loss/train``, ``dni/h1/cosine``)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._tb = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._tb.add_scalar(tag, float(value), step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        # written into the run's own folder so that TensorBoard's HParams tab lists one row per run
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        finite = {f"hparam/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._tb.add_hparams(clean, finite, run_name=".")

    def close(self) -> None:
        self._tb.close()


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON through a temporary file and a rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
