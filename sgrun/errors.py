"""User-facing errors.

Anything raised as :class:`SgrunError` is a user mistake or a missing resource (a wrong option, a
missing dataset, an unwritable folder).  The command line prints its message as one line and exits
non-zero without a traceback, so every message must name the problem *and* the fix.
"""

import errno
from pathlib import Path


class SgrunError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class ConfigError(SgrunError, ValueError):
    """An invalid configuration value or combination (also a ``ValueError`` for library users)."""


class DataError(SgrunError):
    """A dataset that is missing, truncated or fails its checksum."""


class OutputWriteError(SgrunError):
    """A run's output (events, model, summary) could not be written, e.g. on a full disk; the
    engine adds what is kept and how to continue.  ``errno`` is the operating system's reason,
    ``path`` what could not be written."""

    def __init__(self, message: str, errno: int | None = None, path=None) -> None:
        super().__init__(message)
        self.errno, self.path = errno, path


def output_fix(code: int | None, path) -> str:
    """What to do before a failed write can succeed, for the operating system's reason ``code``
    (an errno): space for a full disk, the path for something else in its place, the rights for a
    refusal."""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "free some space"
    if code == errno.ENOTDIR:  # a file where a folder of the path should be: name that file
        in_the_way = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
        path = in_the_way or path
    if code in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY):
        return f"move away what is in the place of {path} (a folder for a file, or the reverse)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {path} writable"
    return f"fix what stops writing {path}"


def write_failure(error: OSError, path, option: str) -> str:
    """The one line for an output folder that cannot be written: the file, the reason, its fix and
    the Hydra ``option`` that chooses another folder (``hydra.run.dir`` or ``hydra.sweep.dir``)."""
    path = error.filename or path
    return (f"cannot write {path}: {error.strerror}: {output_fix(error.errno, path)}, or choose "
            f"another output folder with {option}=<dir>")
