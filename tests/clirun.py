"""Run the installed ``sgrun`` command in a subprocess, as a user would."""

import os
import shutil
import subprocess
import sys

SMOKE = ["data=synthetic", "profile=smoke", "device=cpu"]


def sgrun(*args: str, cwd, env: dict | None = None, module: bool = False,
          unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``unset``: environment variables the command must not see."""
    exe = [sys.executable, "-m", "sgrun"] if module else [shutil.which("sgrun") or "sgrun"]
    return subprocess.run([*exe, *args], cwd=cwd, env=user_env(cwd, env, unset),
                          capture_output=True, text=True, timeout=300)


def user_env(cwd, env: dict | None = None, unset: tuple[str, ...] = ()) -> dict:
    """The environment of a user's command: data under ``cwd/data``, sgrun's own error handling
    (no ``HYDRA_FULL_ERROR``), ``env`` added and ``unset`` removed."""
    full_env = {**os.environ, "SGRUN_DATA_DIR": str(cwd / "data"), **(env or {})}
    for name in ("HYDRA_FULL_ERROR", *unset):
        full_env.pop(name, None)
    return full_env


def trained(tmp_path, name: str, *args: str, env: dict | None = None) -> tuple[dict, dict]:
    """Run ``sgrun *args`` into ``tmp_path/name``; its summary metrics and its model.pt weights."""
    import json

    import torch

    folder = tmp_path / name
    done = sgrun(*args, f"hydra.run.dir={folder}", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    return summary["metrics"], torch.load(folder / "model.pt")


def on_terminal(*args: str, cwd, env: dict | None = None) -> tuple[int, str]:
    """Run ``sgrun *args`` with stdout and stderr on a pseudo-terminal, as in a user's shell; its
    exit status and everything the terminal showed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    # a terminal of 24 rows and 120 columns (a new pseudo-terminal has none)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([shutil.which("sgrun") or "sgrun", *args], cwd=cwd,
                            env=user_env(cwd, env), stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave)
    os.close(slave)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    return proc.wait(timeout=300), shown.decode(errors="replace")


def log_lines_above_the_bar(shown: str) -> list[str]:
    """The log lines in ``shown`` that were written onto a line already in use (by the bar)."""
    import re

    return [shown[max(m.start() - 40, 0):m.end()]
            for m in re.finditer(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[sgrun\]", shown)
            if m.start() > 0 and shown[m.start() - 1] not in "\r\n"]


def remount(path, options: str) -> None:
    """Remount the ``small_disk`` at ``path`` with ``options`` (``size=20m``, ``ro``, ``rw``)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
