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
    return subprocess.run([*exe, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def trained(tmp_path, name: str, *args: str, env: dict | None = None) -> tuple[dict, dict]:
    """Run ``sgrun *args`` into ``tmp_path/name``; its summary metrics and its model.pt weights."""
    import json

    import torch

    folder = tmp_path / name
    done = sgrun(*args, f"hydra.run.dir={folder}", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    return summary["metrics"], torch.load(folder / "model.pt")
