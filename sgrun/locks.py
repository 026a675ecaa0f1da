"""One process per folder: an advisory file lock that the OS releases when the process dies, so a
SIGKILLed run never leaves a stale lock behind.  A run holds its own folder, a sweep its sweep
folder and ``make reproduce`` the profile's runs folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sgrun.errors import SgrunError, write_failure

LOCK = ".sgrun.lock"  # holds the PID of the process that has the folder


class FolderBusy(SgrunError):
    """Another process holds the folder: nothing of this command may be written there.
    ``holder`` names it ("another sgrun run (PID 42)")."""

    def __init__(self, message: str, holder: str = "") -> None:
        super().__init__(message)
        self.holder = holder


# the fix a busy run folder's line gives: a single run's folder is hydra.run.dir, a sweep job's
# comes from its sweep's folder
RUN_FIX = "choose another folder with hydra.run.dir=<dir>"
SWEEP_JOB_FIX = "run the sweep into another folder with hydra.sweep.dir=<dir>"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "another sgrun run", fix: str = RUN_FIX):
    """Hold ``folder`` for this process; a second holder gets one line naming ``what`` holds it,
    its PID and ``fix``."""
    handle = open(Path(folder) / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        holder = f"{what} (PID {pid})"
        raise FolderBusy(f"{folder} is in use by {holder}: wait for it to end, or {fix}",
                         holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


class SweepLock(Callback):
    """A sweep (``sgrun -m``) holds its sweep folder from start to end, whichever launcher runs its
    jobs; each job holds its own folder too.  A second sweep into the same folder is one line."""

    def __init__(self) -> None:
        self._held: contextlib.ExitStack | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir)
        stack = contextlib.ExitStack()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            stack.enter_context(folder_lock(folder, what="another sgrun sweep",
                                            fix="choose another folder with hydra.sweep.dir=<dir>"))
        except (SgrunError, OSError) as e:
            # Hydra turns a callback's exception into a warning and goes on: stop here instead
            message = (str(e) if isinstance(e, SgrunError)
                       else write_failure(e, folder, "hydra.sweep.dir"))
            sys.stderr.write(f"sgrun: error: {message}\n")
            raise SystemExit(2) from None
        self._held = stack

    def __getstate__(self) -> dict:
        # A parallel launcher (joblib) sends the callbacks to its worker processes: the lock stays
        # with the process that took it, the workers get none.
        return {**self.__dict__, "_held": None}

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
