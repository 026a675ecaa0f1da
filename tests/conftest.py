"""Test-session settings.  Under pytest-xdist (``-n auto``) every worker is one process per core:
each gets one torch thread, and so do the sgrun commands the tests start, so that the workers do not
fight over the cores (OpenMP threads spin while they wait, and several processes with a thread per
core each run many times slower than one thread each)."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture
def no_network(monkeypatch):
    """Every dataset in a test is written by the test: any fetch (download, npm, PyPI) fails it.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("no_network")``."""
    from sgrun.data import fetch, ptb

    def forbidden(*args, **kwargs):
        pytest.fail(f"a test tried to fetch over the network: {args}")

    monkeypatch.setattr(fetch, "_open_url", forbidden)
    monkeypatch.setattr(fetch, "_run_npm", forbidden)
    monkeypatch.setattr(ptb, "_fetch_official", forbidden)
    monkeypatch.setattr(ptb, "_fetch_pypi", forbidden)


@pytest.fixture
def read_only(tmp_path):
    """``read_only(path)`` makes ``path`` (a folder: with everything in it) unwritable to this
    process: by its mode, or, for root (who writes anywhere), immutable (``chattr +i``), as a
    read-only mount refuses writes.  Skips where neither holds; undone at the end of the test."""
    import shutil
    import subprocess

    root = os.geteuid() == 0
    done = []

    def make(path):
        if root:
            if shutil.which("chattr") is None or subprocess.run(
                    ["chattr", "-R", "+i", str(path)], capture_output=True).returncode != 0:
                pytest.skip("root writes anywhere and this file system has no immutable files")
        else:
            for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
                p.chmod(0o500 if p.is_dir() else 0o400)
        done.append(path)
        try:
            (path / ".probe" if path.is_dir() else path).open("a").close()
        except OSError:
            return path
        pytest.skip("this path stays writable here")

    yield make
    for path in done:
        if root:
            subprocess.run(["chattr", "-R", "-i", str(path)], check=False)
        else:
            for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
                p.chmod(0o700 if p.is_dir() else 0o600)


@pytest.fixture
def unwritable_folder(tmp_path, read_only):
    """An existing, empty folder that this process cannot write in."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    return read_only(folder)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a real file system of ``size`` (a tmpfs, e.g. ``"7m"``) mounted in
    ``tmp_path``, to fill, remount larger or read-only (``remount(path, options)``) for real.
    Needs root (to mount); skips elsewhere.  Unmounted at the end of the test."""
    import subprocess

    mounted = []

    def make(size: str, name: str = "disk"):
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a file system here ({done.stderr.strip()}): root only")
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)

