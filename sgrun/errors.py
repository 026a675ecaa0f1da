"""User-facing errors.

Anything raised as :class:`SgrunError` is a user mistake or a missing resource (a wrong option, a
missing dataset, an unwritable folder).  The command line prints its message as one line and exits
non-zero without a traceback, so every message must name the problem *and* the fix.
"""


class SgrunError(Exception):
    """A problem the user can fix; printed as one line, exit code 2."""


class ConfigError(SgrunError, ValueError):
    """An invalid configuration value or combination (also a ``ValueError`` for library users)."""


class DataError(SgrunError):
    """A dataset that is missing, truncated or fails its checksum."""


class OutputWriteError(SgrunError):
    """A run's output (events, model, summary) could not be written, e.g. on a full disk; the
    engine adds what is kept and how to continue."""
