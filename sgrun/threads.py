"""How many torch threads an in-process run trains with, the same whichever launcher runs it.

The thread count changes the numbers: torch's CPU kernels split their sums differently on 1 and
on 2 threads, so the same seed and config end apart after a few dozen steps.  Launchers differ in
the threads a job would get by itself: the basic launcher runs each job in the ``sgrun`` process
(torch's default there: ``OMP_NUM_THREADS`` if set, otherwise the machine's cores), joblib's loky
workers start with ``OMP_NUM_THREADS`` = cores // n_jobs, a SLURM job with what its node gives.

So ``runtime.threads: null`` means one rule, applied in every job: the thread count of the ``sgrun``
command that was started (:func:`default_threads`).  That process records it in ``$SGRUN_THREADS``
before a sweep launches its jobs, and every job reads it there (the basic launcher's jobs run in
that process; joblib's workers inherit its environment; ``conf/hydra/launcher/slurm.yaml`` sets it
to the job's CPUs).  ``runtime.threads=N`` sets it outright.  No torch import happens here until a
count is needed.
"""

from __future__ import annotations

import os

ENV = "SGRUN_THREADS"


def default_threads() -> int:
    """What ``runtime.threads: null`` means: ``$SGRUN_THREADS`` when the sweep's process has set it,
    otherwise torch's thread count in this process (``OMP_NUM_THREADS``, or torch's default)."""
    value = os.environ.get(ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            from sgrun.errors import ConfigError

            raise ConfigError(f"{ENV}={value!r} is not a thread count >= 1: unset it, or choose "
                              "the threads with runtime.threads=N")
        return threads
    import torch

    return torch.get_num_threads()


def resolve_threads(threads) -> int:
    """The torch threads of an in-process run with ``runtime.threads`` = ``threads``."""
    return default_threads() if threads is None else int(threads)


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parallel_jobs(threads=None) -> int:
    """Jobs the local (joblib) launcher runs at once: as many as fit on the cores with every job on
    its thread count (at least 1): more would oversubscribe the cores, and OpenMP's spinning threads
    then make every job several times slower.  A pipeline job uses every core itself (``auto``)."""
    if threads == "auto":
        return 1
    return max(1, cores() // max(1, resolve_threads(threads)))
