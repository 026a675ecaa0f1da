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
    full_env = {**os.environ, "SGRUN_DATA_DIR": str(cwd / "data"), **(env or {})}
    for name in ("HYDRA_FULL_ERROR", *unset):
        full_env.pop(name, None)
    return subprocess.run([*exe, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)
