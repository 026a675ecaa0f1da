"""Bad input: one clear line naming the problem and the fix, exit code 2, earlier results
intact."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
from clirun import SMOKE, sgrun

CASES = {
    # name: (overrides, words the one-line message must contain)
    "unknown group option": (["dni=sometimes"], ["dni/sometimes", "Available options", "cdni"]),
    "unknown model": (["model=transformer"], ["model/transformer", "fcn"]),
    "misspelled key": (["model.layrs=3"],
                       ["no key 'model.layrs'", "did you mean model.layers?", "sgrun --cfg job"]),
    "wrong type": (["model.layers=three"], ["model.layers must be an integer", "model.layers=3"]),
    "too few layers": (["model.layers=1"], ["model.layers must be >= 2", "model.layers=3"]),
    "negative learning rate": (["optim.lr=-0.001"], ["optim.lr must be > 0", "optim.lr="]),
    "update_prob above one": (["train.update_prob=1.5"], ["train.update_prob must be in [0, 1]"]),
    "zero steps": (["train.steps=0"], ["train.steps must be >= 1"]),
    "unknown device": (["device=tpu"], ["device must be auto, cpu or cuda"]),
    "unknown interface mode": (["dni=every_layer", "dni.mode=sometimes"], ["dni.mode must be"]),
    "cut that does not exist": (["dni=every_layer", "dni.cuts=[h9]"],
                                ["h9", "valid cuts are h1, h2"]),
    "two-timescale T of zero": (["experiment=two_timescale", "model.T=0"], ["model.T", ">= 1"]),
    "missing dataset": (["data=mnist", "data.download=false"],
                        ["MNIST not found", "train-images-idx3-ubyte"]),
    "'+' addition with a typo": (["+model.hiden=3"],
                                 ["'model.hiden'", "did you mean model.hidden?"]),
    "'+' addition of a key nothing reads": (["+foo=1"], ["no key 'foo'", "sgrun --cfg job"]),
    "infinite learning rate": (["optim.lr=inf"], ["optim.lr must be a finite number", "optim.lr="]),
    "NaN update_prob": (["train.update_prob=nan"], ["train.update_prob"]),
    "infinite synthesizer learning-rate factor": (["dni=every_layer", "dni.lr_factor=inf"],
                                                  ["dni.lr_factor must be a finite number"]),
    "NaN bootstrap scale": (["experiment=table1_copy", "dni.bootstrap_scale=nan"],
                            ["dni.bootstrap_scale must be a finite number"]),
    "plateau of zero episodes": (["experiment=table1_copy", "train.plateau_samples=0"],
                                 ["train.plateau_samples must be >= 1"]),
    "every_k on a feed-forward net": (["dni=every_k"],
                                      ["dni=every_k is for model=rnn", "dni=cdni"]),
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


def test_unwritable_output_folder(tmp_path, unwritable_folder):
    r = sgrun(*SMOKE, f"hydra.run.dir={unwritable_folder}/run", cwd=tmp_path)
    assert_one_line_error(r, ["cannot write", "hydra.run.dir="])
    assert not list(unwritable_folder.iterdir())


def test_finished_run_on_a_read_only_folder_is_one_line_and_intact(tmp_path, read_only):
    run = tmp_path / "run"
    assert sgrun(*SMOKE, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    read_only(run)
    r = sgrun(*SMOKE, f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "hydra.run.dir=" in lines[0], lines
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_unwritable_data_dir_names_data_dir(tmp_path, unwritable_folder):
    r = sgrun("data=mnist", "train.steps=2", f"data_dir={unwritable_folder}", "hydra.run.dir=new",
              cwd=tmp_path)
    assert_one_line_error(r, [f"cannot create {unwritable_folder}/mnist", "data_dir="])
    assert "hydra.run.dir" not in r.stderr


def test_data_dir_that_is_a_file_names_data_dir_not_the_output_folder(tmp_path):
    (tmp_path / "afile").write_text("x\n")
    r = sgrun("data=mnist", "train.steps=2", "data_dir=afile", "hydra.run.dir=new", cwd=tmp_path)
    assert_one_line_error(r, ["afile is a file, not a folder", "data_dir="])
    assert "hydra.run.dir" not in r.stderr


def test_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder\n")
    r = sgrun(*SMOKE, "hydra.run.dir=taken/run", cwd=tmp_path)
    assert_one_line_error(r, ["cannot write", "hydra.run.dir="])
    assert (tmp_path / "taken").read_text() == "a file, not a folder\n"


MNIST = {"train-images-idx3-ubyte": (2051, (20, 28, 28)), "train-labels-idx1-ubyte": (2049, (20,)),
         "t10k-images-idx3-ubyte": (2051, (10, 28, 28)), "t10k-labels-idx1-ubyte": (2049, (10,))}


def idx_bytes(magic, shape, seed=0):
    body = np.random.default_rng(seed).integers(0, 10 if len(shape) == 1 else 256, size=shape,
                                                dtype=np.uint8)
    return struct.pack(f">I{len(shape)}I", magic, *shape) + body.tobytes()


@pytest.fixture
def mnist_dir(tmp_path):
    """Small MNIST-format files and an override that accepts their md5s (as if they were
    official)."""
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    sums = {}
    for name, (magic, shape) in MNIST.items():
        data = idx_bytes(magic, shape)
        (folder / name).write_bytes(data)
        sums[name] = hashlib.md5(data).hexdigest()
    override = "+data.options.checksums={" + ",".join(f"{k}:{v}" for k, v in sums.items()) + "}"
    return folder, override


def run_mnist(tmp_path, override):
    return sgrun("data=mnist", "data.download=false", "profile=smoke", "device=cpu", override,
                 "hydra.run.dir=new", cwd=tmp_path)


def test_generated_mnist_files_load_through_the_cli(tmp_path, mnist_dir):
    """The control for the cases below: intact files with matching checksums train fine."""
    r = run_mnist(tmp_path, mnist_dir[1])
    assert r.returncode == 0, r.stderr


def test_dataset_file_with_wrong_checksum(tmp_path, mnist_dir):
    folder, override = mnist_dir
    path = folder / "t10k-labels-idx1-ubyte"
    # well-formed, but not the file the checksum names
    path.write_bytes(idx_bytes(2049, (10,), seed=5))
    assert_one_line_error(run_mnist(tmp_path, override),
                          ["t10k-labels-idx1-ubyte", "fails its checksum", "delete it"])


def test_dataset_file_truncated(tmp_path, mnist_dir):
    folder, _ = mnist_dir
    path = folder / "train-images-idx3-ubyte"
    data = path.read_bytes()[:-100]
    path.write_bytes(data)
    # checksum passes: the parser must see it
    sums = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in MNIST}
    override = "+data.options.checksums={" + ",".join(f"{k}:{v}" for k, v in sums.items()) + "}"
    assert_one_line_error(run_mnist(tmp_path, override), ["train-images-idx3-ubyte", "truncated"])


def test_dataset_file_with_wrong_magic_number(tmp_path, mnist_dir):
    folder, _ = mnist_dir
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(2051, (20,)))
    sums = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in MNIST}
    override = "+data.options.checksums={" + ",".join(f"{k}:{v}" for k, v in sums.items()) + "}"
    assert_one_line_error(run_mnist(tmp_path, override),
                          ["train-labels-idx1-ubyte", "magic number"])


def test_dataset_gzip_cut_off(tmp_path, mnist_dir):
    folder, override = mnist_dir
    raw = folder / "t10k-images-idx3-ubyte"
    packed = gzip.compress(raw.read_bytes())
    raw.unlink()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(packed[: len(packed) // 2])
    assert_one_line_error(run_mnist(tmp_path, override),
                          ["t10k-images-idx3-ubyte.gz", "not a readable gzip file"])


def test_checkpoint_truncated_and_no_previous(tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"SGRUN-CKPT1 ")  # cut off right after the magic
    r = sgrun(*SMOKE, "hydra.run.dir=new", cwd=tmp_path)
    assert_one_line_error(r, ["no usable checkpoint", "delete checkpoint.pt"])
    assert (folder / "checkpoint.pt").read_bytes() == b"SGRUN-CKPT1 "


def test_disk_full_while_writing_a_checkpoint(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "checkpoint.pt.tmp").symlink_to("/dev/full")
    r = sgrun(*SMOKE, "checkpoint.every=2", "hydra.run.dir=new", cwd=tmp_path)
    # the first checkpoint fails: there is no earlier one to keep,
    # and the message must not claim one
    assert_one_line_error(r, ["could not write checkpoint", "No space left on device",
                              "no earlier checkpoint exists"])
    assert "kept" not in r.stderr
    assert not (folder / "checkpoint.pt").exists() and not (folder / "summary.json").exists()


FULL_DISK_AFTER = """
import errno
from tensorboard.summary.writer import record_writer
real, calls = record_writer.RecordWriter.write, [0]
def write(self, data):
    calls[0] += 1
    if calls[0] > {after}:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, data)
record_writer.RecordWriter.write = write
"""


@pytest.mark.parametrize("after", [1, 60])
def test_disk_full_while_tensorboard_writes(tmp_path, after):
    """The disk fills while TensorBoard's own thread writes events: one line naming the folder and
    what is kept (a checkpoint only if one was written), no thread traceback, and the run continues
    with the command it names once there is space again."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_DISK_AFTER.format(after=after))
    run = ["train.steps=40", "train.log_every=1", "checkpoint.every=5", "hydra.run.dir=new"]
    r = sgrun(*SMOKE, *run, cwd=tmp_path, env={"PYTHONPATH": str(hook)})
    assert "Exception in thread" not in r.stderr
    assert_one_line_error(r, ["could not write the TensorBoard events in ",
                              "new/tb: No space left on device", "not marked finished"])
    assert not (tmp_path / "new" / "summary.json").exists()
    if after == 1:
        assert "no checkpoint had been written yet" in r.stderr and "kept" not in r.stderr
        return
    step = int(r.stderr.split("(step ")[1].split(")")[0])
    assert step > 0 and step % 5 == 0
    assert f"resume={(tmp_path / 'new').resolve()}" in r.stderr
    again = sgrun(*SMOKE, *run[:-1], f"resume={(tmp_path / 'new').resolve()}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "new" / "summary.json").exists()
    # the results are in the resumed folder, not in the new one Hydra made for this command
    assert f"results in {(tmp_path / 'new').resolve()};" in again.stdout


@pytest.mark.parametrize("name, make", [
    ("summary.json", lambda p: p.mkdir()),
    ("model.pt", lambda p: p.mkdir()),
    ("tb", lambda p: p.write_text("a file, not a folder\n")),
])
def test_something_in_the_place_of_an_output_is_named_with_its_fix(tmp_path, name, make):
    # not a full disk: freeing space would not help, moving the thing away does
    run = tmp_path / "run"
    run.mkdir()
    make(run / name)
    r = sgrun(*SMOKE, f"hydra.run.dir={run}", cwd=tmp_path)
    assert_one_line_error(r, [f"{run / name}", "move away what is in the place of",
                              "the run is not marked finished"])
    assert "free some space" not in r.stderr


def test_misspelled_key_is_not_told_to_add_it_with_a_plus(tmp_path):
    """Hydra's own fix ("To append to your config use +train.stepz=5") is one sgrun refuses."""
    r = sgrun(*SMOKE, "train.stepz=5", "hydra.run.dir=new", cwd=tmp_path)
    assert_one_line_error(r, ["did you mean train.steps?"])
    assert "+train.stepz" not in r.stderr and "To append" not in r.stderr


def test_misspelled_key_in_a_sweep(tmp_path):
    r = sgrun("-m", *SMOKE, "train.stepz=5,6", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert_one_line_error(r, ["no key 'train.stepz'", "did you mean train.steps?"])
    # no job started: only Hydra's record of the sweep and the sweep's lock
    assert {p.name for p in (tmp_path / "sweep").iterdir()} <= {"multirun.yaml", ".sgrun.lock"}
