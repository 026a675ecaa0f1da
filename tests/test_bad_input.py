"""Bad input: one clear line naming the problem and the fix, exit code 2, earlier results intact."""

import os

import pytest
from clirun import SMOKE, sgrun

CASES = {
    # name: (overrides, words the one-line message must contain)
    "unknown group option": (["dni=sometimes"], ["dni/sometimes", "Available options", "cdni"]),
    "unknown model": (["model=transformer"], ["model/transformer", "fcn"]),
    "misspelled key": (["model.layrs=3"], ["model.layrs", "sgrun --cfg job"]),
    "wrong type": (["model.layers=three"], ["model.layers must be an integer", "model.layers=3"]),
    "too few layers": (["model.layers=1"], ["model.layers must be >= 2", "model.layers=3"]),
    "negative learning rate": (["optim.lr=-0.001"], ["optim.lr must be > 0", "optim.lr="]),
    "update_prob above one": (["train.update_prob=1.5"], ["train.update_prob must be in [0, 1]"]),
    "zero steps": (["train.steps=0"], ["train.steps must be >= 1"]),
    "unknown device": (["device=tpu"], ["device must be auto, cpu or cuda"]),
    "unknown interface mode": (["dni=every_layer", "dni.mode=sometimes"], ["dni.mode must be"]),
    "cut that does not exist": (["dni=every_layer", "dni.cuts=[h9]"], ["h9", "valid cuts are h1, h2"]),
    "missing dataset": (["data=mnist", "data.download=false"], ["MNIST not found", "train-images-idx3-ubyte"]),
}


@pytest.fixture
def earlier_run(tmp_path):
    """A folder holding an earlier run's results, which no failing command may touch."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}\n')
    return out


def assert_one_line_error(r, words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("sgrun: error: ")
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_value(tmp_path, earlier_run, name):
    overrides, words = CASES[name]
    base = [a for a in SMOKE if not any(a.split("=")[0] == o.split("=")[0] for o in overrides)]
    r = sgrun(*base, *overrides, "hydra.run.dir=new", cwd=tmp_path)
    assert_one_line_error(r, words)
    assert (earlier_run / "summary.json").read_text() == '{"earlier": true}\n'
    assert not (tmp_path / "new" / "summary.json").exists()


def test_output_folder_holding_another_run_is_not_overwritten(tmp_path, earlier_run):
    r = sgrun(*SMOKE, f"hydra.run.dir={earlier_run}", cwd=tmp_path)
    assert_one_line_error(r, ["already holds a different finished run", "hydra.run.dir="])
    assert (earlier_run / "summary.json").read_text() == '{"earlier": true}\n'


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    r = sgrun(*SMOKE, f"hydra.run.dir={locked}/run", cwd=tmp_path)
    assert_one_line_error(r, ["cannot write", "hydra.run.dir="])


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder\n")
    r = sgrun(*SMOKE, "hydra.run.dir=taken/run", cwd=tmp_path)
    assert_one_line_error(r, ["cannot write", "hydra.run.dir="])
    assert (tmp_path / "taken").read_text() == "a file, not a folder\n"
