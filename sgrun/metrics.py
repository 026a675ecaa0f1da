"""TensorBoard logging, plus a null writer with the same methods for tests and notebooks."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from sgrun.errors import OutputWriteError


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

        _quiet_event_threads()
        self.log_dir = Path(log_dir)
        self._tb = self._guarded(SummaryWriter, log_dir=str(self.log_dir), purge_step=purge_step)

    def _guarded(self, fn, *args, **kwargs):
        # TensorBoard writes from a thread of its own and hands its error to the next call: a full
        # disk or a broken folder becomes one OutputWriteError naming the folder
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise OutputWriteError(f"could not write the TensorBoard events in {self.log_dir}: "
                                   f"{e.strerror or e}", e.errno, self.log_dir) from None

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._guarded(self._tb.add_scalar, tag, float(value), step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        # written into the run's own folder so that TensorBoard's HParams tab lists one row per run
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                 for k, v in hparams.items()}
        finite = {f"hparam/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        self._guarded(self._tb.add_hparams, clean, finite, run_name=".")

    def close(self) -> None:
        self._guarded(self._tb.close)


_default_excepthook = threading.excepthook


def _quiet_event_threads() -> None:
    """TensorBoard's writer thread re-raises its error in the thread that writes next (see
    :class:`Writer`); its own traceback on stderr would only repeat it, so it is not printed."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    def hook(args) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            _default_excepthook(args)

    threading.excepthook = hook


def file_record(data: bytes) -> dict:
    """What a summary records of a file it vouches for: its size and sha256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_bytes_atomic(path: str | Path, payload: bytes) -> dict:
    """Write ``payload`` through a temporary file (flushed to disk) and a rename: never a
    half-written file; a full disk or a folder in the way is one line naming the file.  Returns its
    size and sha256."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(f"could not write {path}: {e.strerror or e}", e.errno,
                                   path) from None
    return file_record(payload)


def verify_file(path: Path, record: dict) -> bool:
    """Whether ``path`` is the file ``record`` (from :func:`write_bytes_atomic`) describes."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return file_record(data) == {k: record.get(k) for k in ("bytes", "sha256")}


def file_records(folder: Path, root: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder`` (a closed TensorBoard log), by its path
    relative to ``root``, each flushed to disk first: the summary that lists them vouches for
    them. An event file is a stream TensorBoard appends to, so it cannot be renamed into place;
    a finished run is instead one whose event files are still the ones its summary lists."""
    records = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
                data = f.read()
        except OSError as e:
            raise OutputWriteError(f"could not write {path}: {e.strerror or e}", e.errno,
                                   path) from None
        records[str(path.relative_to(root))] = file_record(data)
    return records


def write_json_atomic(path: str | Path, data: dict) -> dict:
    """Write ``data`` as JSON atomically (:func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str)
                                     + "\n").encode())
