"""Checkpoints that survive: atomic writes, a kept previous copy, checksums, and signal handling.

A checkpoint file is ``SGRUN-CKPT1 <sha256>\\n`` followed by a ``torch.save`` payload.  It is
written to a temporary file, flushed to disk and renamed into place; the checkpoint it replaces is
kept as ``checkpoint.prev.pt``.  Loading verifies the checksum, so a truncated or corrupted file is
refused (and the previous one used) instead of resuming from garbage.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

from sgrun.errors import SgrunError, output_fix

log = logging.getLogger("sgrun")

MAGIC = b"SGRUN-CKPT1 "
NAME, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


class Interrupted(SgrunError):
    """SIGINT/SIGTERM arrived; the run saved a checkpoint and stopped."""


class CorruptCheckpoint(Exception):
    pass


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path: Path, state: dict, kept_step: int | None = None) -> None:
    """Write ``state`` atomically: a crash or a full disk never leaves a half-written ``path``.
    ``kept_step``: the step of the checkpoint already there (named in the error; ``None``: none)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            path.replace(path.with_name(PREVIOUS))
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fix = output_fix(e.errno, path)
        if kept_step is not None:
            then = (f"the last good checkpoint (step {kept_step}) is kept: {fix}, then "
                    f"continue the run with resume={path.parent}")
        else:
            then = f"no earlier checkpoint exists: {fix} and run the command again"
        raise SgrunError(f"could not write checkpoint {path}: {e.strerror or e}; {then}") from None


def read_checkpoint(path: Path) -> dict:
    """Load and verify one checkpoint file; :class:`CorruptCheckpoint` if it is not intact."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptCheckpoint(f"cannot read {path}: {e.strerror}") from None
    head, sep, payload = data.partition(b"\n")
    if not head.startswith(MAGIC) or not sep:
        raise CorruptCheckpoint(f"{path} is not an sgrun checkpoint")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(MAGIC):]:
        raise CorruptCheckpoint(f"{path} fails its checksum (truncated or corrupted)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


class Checkpointer:
    """Saves every ``every`` steps and on SIGINT/SIGTERM; finds the last intact checkpoint to
    resume.

    Use as a context manager around the training loop: inside it, SIGINT/SIGTERM only set a flag,
    and the loop calls :meth:`step_done` after each step, which saves and stops when asked to.
    """

    def __init__(self, out_dir: str | Path, every: int, enabled: bool = True) -> None:
        self.dir = Path(out_dir)
        self.every = every
        self.enabled = enabled
        self.stop_signal: int | None = None
        self.last_step: int | None = None  # the step of the newest checkpoint on disk
        self._old_handlers: dict = {}

    @property
    def path(self) -> Path:
        return self.dir / NAME

    def __enter__(self) -> Checkpointer:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. a launcher's worker): no handler
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def load(self) -> dict | None:
        """The newest intact checkpoint (``None`` if there is none); a corrupt one is skipped
        loudly."""
        candidates = [p for p in (self.dir / NAME, self.dir / PREVIOUS) if p.exists()]
        problems = []
        for p in candidates:
            try:
                state = read_checkpoint(p)
            except CorruptCheckpoint as e:
                log.warning("%s: using the previous checkpoint", e)
                problems.append(str(e))
                continue
            except Exception as e:  # an intact file that torch cannot unpickle
                problems.append(f"{p} cannot be loaded ({type(e).__name__})")
                continue
            self.last_step = state.get("loop", {}).get("step") if isinstance(state, dict) else None
            return state
        if problems:
            raise SgrunError(f"no usable checkpoint in {self.dir}: {'; '.join(problems)}: delete "
                             f"{NAME} and {PREVIOUS} there to start the run afresh")
        return None

    def step_done(self, step: int, total: int, state_fn) -> None:
        """Save on schedule or when a signal came; after a signal, stop with
        :class:`Interrupted`."""
        if not self.enabled:
            if self.stop_signal is not None:
                raise Interrupted(f"interrupted at step {step} "
                                  "(no checkpoint: checkpoint.every is 0)")
            return
        due = self.every > 0 and step % self.every == 0 and step < total
        if due or self.stop_signal is not None:
            write_checkpoint(self.path, state_fn(), self.last_step)
            self.last_step = step
        if self.stop_signal is not None:
            raise Interrupted(f"interrupted at step {step}/{total}: "
                              f"checkpoint saved in {self.path}")

    def clear(self) -> None:
        """A finished run keeps its summary, not its checkpoints."""
        for name in (NAME, PREVIOUS):
            (self.dir / name).unlink(missing_ok=True)
