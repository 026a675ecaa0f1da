"""The package as a user installs it: a wheel, not this checkout."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_built_wheel_runs_sgrun_from_an_empty_folder(tmp_path):
    # build from a copy of what the wheel is made of, so that the build leaves nothing here
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("sgrun", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path / "wheel").glob("sgrun-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # every config file of conf/ is in the wheel, under sgrun/conf
    conf = site / "sgrun" / "conf"
    shipped = {p.relative_to(conf) for p in conf.rglob("*.yaml")}
    assert shipped == {p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")}
    # and every module of the package
    modules = {p.relative_to(REPO) for p in (REPO / "sgrun").rglob("*.py")}
    assert modules <= {p.relative_to(site) for p in (site / "sgrun").rglob("*.py")}
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "SGRUN_DATA_DIR": str(tmp_path / "d"),
           "HOME": str(tmp_path)}
    where = subprocess.run([sys.executable, "-c", "import sgrun; print(sgrun.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "sgrun" / "__init__.py"), where.stderr
    r = subprocess.run([sys.executable, "-m", "sgrun", "data=synthetic", "train.steps=20"],
                       cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finished in" in r.stdout and "test error" in r.stdout
    assert (empty / "outputs").is_dir()
