"""One process per folder: an advisory file lock that the OS releases when the process dies, so a
SIGKILLed run never leaves a stale lock behind.  A run holds its own folder, a sweep its sweep
folder and ``make reproduce`` the profile's runs folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from sgrun.errors import SgrunError

LOCK = ".sgrun.lock"  # holds the PID of the process that has the folder


@contextlib.contextmanager
def folder_lock(folder: Path, what: str = "another sgrun run",
                fix: str = "choose another folder with hydra.run.dir=<dir>"):
    """Hold ``folder`` for this process; a second holder gets one line naming ``what`` holds it,
    its PID and ``fix``."""
    handle = open(Path(folder) / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise SgrunError(f"{folder} is in use by {what} (PID {pid}): wait for it to end, or {fix}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
