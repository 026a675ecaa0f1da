"""Test-session settings.  Under pytest-xdist (``-n auto``) every worker is one process per core:
each gets one torch thread, and so do the sgrun commands the tests start, so that the workers do not
fight over the cores (OpenMP threads spin while they wait, and several processes with a thread per
core each run many times slower than one thread each)."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
