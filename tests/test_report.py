"""make reproduce / make report: tables, claims, figures, resumable sweeps, launchers.

Most tests build run folders by hand in the layout ``sgrun -m`` leaves (``.hydra/``, ``summary.json``
or ``FAILED``, TensorBoard events in ``tb/`` written with torch's ``SummaryWriter``); one runs the
real ``sgrun`` through ``experiments/reproduce.py`` on a generated dataset.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from torch.utils.tensorboard import SummaryWriter

from sgrun import threads
from sgrun.cli import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import report  # noqa: E402
import reproduce  # noqa: E402
from rundirs import load_run, load_runs  # noqa: E402
from tables import Table  # noqa: E402

CIFAR_MISSING = "CIFAR-10 not found in data/cifar10 (missing cifar-10-batches-py/data_batch_1): download ..."
PNG = b"\x89PNG\r\n\x1a\n"


def make_run(runs: Path, preset: str, job: str, *, dni: str, seed: int = 0, metrics: dict | None = None,
             scalars: dict | None = None, failed: str | None = None, **config) -> Path:
    """A job folder as sgrun -m leaves it; ``config`` keys are paths with "__" ("model__layers")."""
    folder = runs / "smoke" / preset / job
    (folder / ".hydra").mkdir(parents=True)
    cfg = {"name": preset, "seed": seed, "profile": {"name": "smoke"}, "train": {"steps": 4}, "optim": {"lr": 3e-4}}
    for path, value in config.items():
        node = cfg
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    choices = {"experiment": preset, "dni": dni, "profile": "smoke"}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    if scalars:
        writer = SummaryWriter(log_dir=str(folder / "tb"))
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()
    if failed is not None:
        (folder / "FAILED").write_text(failed + "\n")
    else:
        summary = {"status": "finished", "metrics": {"minutes": 0.5, **(metrics or {})},
                   "choices": {"experiment": preset, "dni": dni, "seed": seed}, "config": cfg}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def mnist_fcn(runs: Path, layers: int, dni: str, errors: list[float], seed: int = 0) -> None:
    curve = [(100, errors[0]), (200, errors[1]), (300, errors[2])]
    make_run(runs, "mnist_fcn", f"{layers}_{dni}_{seed}", dni=dni, seed=seed, model__layers=layers,
             metrics={"test_error": errors[-1]}, scalars={"error/test": curve})


def copy_run(runs: Path, k: int, dni: str, largest_n: int, key: str = "model__k", seed: int = 0,
             solved_at: tuple = (2560, 5120, 7680)) -> None:
    # the curriculum's largest solved N, logged against samples seen when a level is solved
    levels = list(zip(solved_at, (1, max(1, largest_n // 2), largest_n)))
    make_run(runs, "table1_copy", f"{k}_{dni}_{seed}", dni=dni, seed=seed, **{key: k},
             metrics={"largest_n": largest_n, "samples_seen": solved_at[-1]},
             scalars={"by_samples/largest_solved": levels, "loss/train": [(30, 0.1)]})


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # MNIST FCN: cDNI within 0.5 points of Bprop at both depths, DNI worse when deeper; two seeds of Bprop
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.0], seed=0)
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.2], seed=1)
    mnist_fcn(root, 3, "every_layer", [9.0, 5.0, 3.0])
    mnist_fcn(root, 3, "cdni", [9.0, 4.0, 2.3])
    mnist_fcn(root, 4, "none", [9.0, 4.0, 2.0])
    mnist_fcn(root, 4, "every_layer", [9.0, 6.0, 4.5])
    mnist_fcn(root, 4, "cdni", [9.0, 4.0, 2.4])
    # Copy: DNI 1.25x BPTT at k=3 (not the paper's "about twice"), 2x at k=5; k lives in train.k there
    copy_run(root, 3, "none", 8)
    copy_run(root, 3, "every_k", 10)
    copy_run(root, 5, "none", 8, key="train__k")
    copy_run(root, 5, "every_k", 16, key="train__k")
    # CIFAR-10 is not on this machine: the job wrote FAILED before training
    make_run(root, "cifar10_fcn", "0_none", dni="none", model__layers=3, failed=CIFAR_MISSING)
    return root


def write(runs: Path, out: Path) -> str:
    return report.write_report("smoke", runs, out).read_text()


def table_row(text: str, first_cells: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cells} |"))


def claim_row(text: str, claim: str) -> str:
    return next(line for line in text.splitlines() if f"| {claim} |" in line)


def test_cells_read_ours_then_paper(runs, tmp_path):
    text = write(runs, tmp_path / "out")
    # Bprop at 3 layers: two seeds, mean ± sample std; fewer seeds elsewhere and depths without runs say so
    assert table_row(text, "3") == "| 3 | 2.10 ± 0.14 (–) | 3.00 [1 of 2 seeds] (–) | 2.30 [1 of 2 seeds] (–) |"
    assert table_row(text, "5") == "| 5 | not run (–) | not run (–) | not run (–) |"
    # Table 1: our largest N next to the paper's; k found under model.k or train.k
    copy_rows = [line for line in text.splitlines() if line.startswith("| Copy, largest N |")]
    assert copy_rows[0] == ("| Copy, largest N | BPTT | not run (7) | 8 (8) | not run (10) | 8 (8) | not run (–) |")
    assert copy_rows[1].startswith("| Copy, largest N | DNI | not run (16) | 10 (14) | not run (18) | 16 (18) |")
    assert "| Repeat Copy, largest N | BPTT | not run (7) |" in text


def test_missing_dataset_cells_and_runs_table(runs, tmp_path):
    text = write(runs, tmp_path / "out")
    cifar = text.split("## CIFAR-10, fully connected networks")[1]
    assert table_row(cifar, "3").startswith("| 3 | dataset not available (–) | not run (–) | not run (–) |")
    assert "1 failed (1 because their dataset is not available)" in text
    assert "| cifar10_fcn | 0 | 1 | 0 | 0 | – | 0.0 | dataset not available: CIFAR-10 not found" in text
    assert "| mnist_cnn | 0 | 0 | 0 | – | – | 0.0 | not run |" in text


def test_claims_held_not_held_and_no_data(runs, tmp_path):
    text = write(runs, tmp_path / "out")
    assert claim_row(text, "cDNI stays at or near Bprop on MNIST FCNs").startswith("| **held** |")
    assert claim_row(text, "DNI degrades as the MNIST FCN gets deeper").startswith("| **held** |")
    copy = claim_row(text, "On Copy, DNI learns dependencies about twice as long as BPTT at the same k")
    assert copy.startswith("| **not held** |") and "at 1 of 2; not at k=3" in copy
    assert claim_row(text, "On PTB, DNI gives lower test BPC than BPTT at the same k").startswith("| no data |")


def test_nothing_learned_is_not_twice_as_long(tmp_path):
    root = tmp_path / "runs"
    copy_run(root, 3, "none", 0)
    copy_run(root, 3, "every_k", 0)
    row = claim_row(write(root, tmp_path / "out"), "On Copy, DNI learns dependencies about twice as long as BPTT at the same k")
    assert row.startswith("| **not held** |")


def test_claims_follow_the_numbers(tmp_path):
    # the same claim, computed: cDNI 1 point above Bprop is no longer "at or near"
    root = tmp_path / "runs"
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.0])
    mnist_fcn(root, 3, "cdni", [9.0, 4.0, 3.0])
    text = write(root, tmp_path / "out")
    row = claim_row(text, "cDNI stays at or near Bprop on MNIST FCNs")
    assert row.startswith("| **not held** |") and "not at layers=3" in row


def test_claim_thresholds_agree_with_the_papers_own_numbers():
    reference = report.load_reference()
    tables = report.build_tables(reference, [])
    verdicts = {c["text"]: report.evaluate(c, tables, on_paper=True).verdict for c in reference["claims"]}
    checked = {text: v for text, v in verdicts.items() if v != "no data"}
    assert len(checked) >= 4  # Copy, Repeat Copy, Aux, PTB, CIFAR-10 CNN
    assert set(checked.values()) == {"held"}, checked


def test_figures_are_png_files_and_missing_ones_are_noted(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig_ptb_valid_bpc.png").write_bytes(PNG + b"from older runs")
    # a Repeat Copy run too short to solve a level has no curve against samples: the fallback is drawn
    make_run(runs, "table1_repeat_copy", "3_none", dni="none", model__k=3, metrics={"largest_n": 0},
             scalars={"curriculum/largest_solved": [(2, 0.0), (4, 0.0)]})
    text = write(runs, out)
    for name in ("fig_mnist_fcn_test_error.png", "fig_copy_largest_n.png", "fig_repeat_copy_largest_n.png"):
        assert (out / name).read_bytes()[:8] == PNG
        assert f"]({name})" in text
    assert "Note: drawn from `curriculum/largest_solved`" in text.split("fig_repeat_copy_largest_n.png")[1]
    # no PTB runs: no figure (the stale one is gone) and a note instead
    assert not (out / "fig_ptb_valid_bpc.png").exists()
    assert "*Penn Treebank, validation BPC against samples seen*: not drawn" in text


def test_later_experiments_fill_their_tables_claims_and_figures(runs, tmp_path):
    # the stochastic-update sweep ...
    for p in (1.0, 0.2, 0.05):
        for dni in ("every_layer", "cdni"):
            err = 2 + 0.1 / p
            make_run(runs, "mnist_fcn_update_prob", f"{p}_{dni}", dni=dni, model__name="fcn", model__layers=4,
                     data__name="mnist", train__update_prob=p, metrics={"test_error": err},
                     scalars={"error/test": [(1000, 3 * err), (2000, err)]})
    # ... and the two networks at two timescales
    for coupling, b_error in (("none", 0.8), ("dni", 0.3), ("bptt", 0.2)):
        make_run(runs, "two_timescale", coupling, dni="message", model__name="hrnn", model__coupling=coupling,
                 metrics={"error_a": 0.1, "error_b": b_error},
                 scalars={"error/A": [(100, 0.5), (200, 0.1)], "error/B": [(100, 0.9), (200, b_error)]})
    out = tmp_path / "out"
    text = write(runs, out)
    updates = text.split("## Stochastic updates")[1]
    assert table_row(updates, "0.2").startswith("| 0.2 | 2.50 (–) | 2.50 (3.05) | not run (–) |")
    assert table_row(updates, "0.5") == "| 0.5 | not run (–) | not run (–) | not run (–) | not run (–) |"
    assert table_row(text, "DNI") == "| DNI | 0.10 (–) | 0.30 (–) |"
    assert claim_row(text, "With stochastic updates, cDNI still trains at update_prob 0.05").startswith("| **held** |")
    assert claim_row(text, "Network B learns from A's messages with DNI coupling (B's error below the uncoupled one)"
                     ).startswith("| **held** |")
    for name in ("fig_update_prob.png", "fig_two_timescale_errors.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_error_bands_average_seeds(runs):
    from curves import mean_curve

    specs = {t["id"]: t for t in report.load_reference()["tables"]}
    table = Table(specs["mnist_fcn"], load_runs(runs / "smoke"))
    xs, mean, std = mean_curve(table.curve_runs("3", "Bprop"), "error/test")
    assert list(xs) == [100, 200, 300] and mean[-1] == pytest.approx(2.1) and std[-1] == pytest.approx(0.1414, abs=1e-3)
    # curriculum staircases of two seeds that solved their levels after different numbers of samples
    copy_run(runs, 2, "every_k", 8, seed=0, solved_at=(100, 200, 300))
    copy_run(runs, 2, "every_k", 4, seed=1, solved_at=(150, 250, 350))
    copy = Table(specs["table1_copy"], load_runs(runs / "smoke"))
    xs, mean, _ = mean_curve(copy.curve_runs("DNI", "2"), "by_samples/largest_solved", steps=True)
    assert list(xs) == [100, 150, 200, 250, 300, 350]
    assert list(mean) == [1, 1, 2.5, 3, 5, 6]  # seed 0: 1, 1, 4, 4, 8, 8; seed 1: -, 1, 1, 2, 2, 4


@pytest.mark.parametrize("purge_step,expected", [
    (None, [(100, 9.0), (200, 4.0), (300, 2.0)]),  # started again from scratch: the new curve only
    (201, [(100, 50.0), (200, 40.0), (300, 2.0)]),  # resumed from a checkpoint at step 200: joined
])
def test_event_files_of_an_interrupted_run_are_joined_as_tensorboard_does(tmp_path, purge_step, expected):
    # the first run logged up to step 300 and was killed; then a second writer in the same tb/
    root = tmp_path / "runs"
    folder = make_run(root, "mnist_fcn", "0", dni="none", model__layers=3,
                      scalars={"error/test": [(100, 50.0), (200, 40.0), (300, 30.0)]})
    first = next((folder / "tb").glob("events*"))
    first.rename(first.with_name("events.out.tfevents.1000000000.host.1.0"))  # older than the next one
    writer = SummaryWriter(log_dir=str(folder / "tb"), purge_step=purge_step)
    for step, value in expected:
        if purge_step is None or step >= purge_step:
            writer.add_scalar("error/test", value, step)
    writer.close()
    assert load_run(folder).scalars["error/test"] == expected


def test_seeds_are_one_multirun_each_with_stable_folders(tmp_path):
    cmds = [reproduce.sgrun_command("mnist_fcn", "cpu", tmp_path, s, None, []) for s in range(3)]
    assert not any(a.startswith("seed=") for a in cmds[0])  # seed 0: the preset's own folders
    assert cmds[1][-1] == "seed=1" and cmds[2][-1] == "seed=2"
    assert f"hydra.sweep.dir={tmp_path}" in cmds[0]


FAKE_SGRUN = """
import json, sys
from pathlib import Path
sweep, outcome = Path(sys.argv[1]), sys.argv[2]
job = sweep / "0_job"
(job / ".hydra").mkdir(parents=True, exist_ok=True)
if outcome == "finished":
    (job / "summary.json").write_text(json.dumps({"status": "finished", "metrics": {}, "choices": {}, "config": {}}))
else:
    (job / "FAILED").write_text(outcome)
sys.exit(0 if outcome == "finished" else 1)
"""


@pytest.mark.parametrize("cifar_error,code", [(CIFAR_MISSING, 0), ("RuntimeError: out of memory", 1)])
def test_a_failing_preset_does_not_stop_the_others(tmp_path, monkeypatch, capsys, cifar_error, code):
    fake = tmp_path / "fake_sgrun.py"
    fake.write_text(FAKE_SGRUN)
    outcomes = {"cifar10_fcn": cifar_error, "mnist_fcn": "finished"}
    monkeypatch.setattr(reproduce, "sgrun_command",
                        lambda preset, profile, sweep_dir, *_: [sys.executable, str(fake), str(sweep_dir), outcomes[preset]])
    # mnist_fcn failed last time: its stale FAILED must go once it finishes
    stale = tmp_path / "runs" / "smoke" / "mnist_fcn" / "0_job"
    (stale / ".hydra").mkdir(parents=True)
    (stale / "FAILED").write_text("killed")
    assert reproduce.main(["--profile", "smoke", "--only", "cifar10_fcn,mnist_fcn", "--runs", str(tmp_path / "runs")]) == code
    out = capsys.readouterr().out
    assert "cifar10_fcn" in out and "0/1 runs finished (0 before), 1 failed" in out
    assert re.search(r"mnist_fcn +1/1 runs finished \(0 before\), 0 failed", out)
    assert ("dataset not available" in out) == (code == 0)
    assert not (stale / "FAILED").exists()


def test_reproduce_skips_finished_runs_and_redoes_unfinished_ones(tmp_path):
    """The real sgrun, 2 jobs of mnist_fcn on generated data: run, lose one run (as if killed), run again."""
    args = ["--profile", "smoke", "--only", "mnist_fcn", "--runs", str(tmp_path),
            "--", "data=synthetic", "device=cpu", "model.layers=3", "dni=none,cdni"]
    assert reproduce.main(args) == 0
    summaries = sorted((tmp_path / "smoke" / "mnist_fcn").glob("*/summary.json"))
    assert len(summaries) == 2
    kept, lost = summaries
    kept_before = kept.read_text(), kept.stat().st_mtime_ns
    lost.unlink()  # a run interrupted before its end has no summary.json
    assert reproduce.main(args) == 0
    assert (kept.read_text(), kept.stat().st_mtime_ns) == kept_before  # not trained again
    assert json.loads(lost.read_text())["status"] == "finished"  # trained again
    log = (tmp_path / "smoke" / "mnist_fcn" / "reproduce.log").read_text()
    assert "already holds this finished run" in log


def launcher(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=mnist_fcn", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_launchers_compose():
    local = launcher("hydra/launcher=local")
    assert local._target_.endswith("JoblibLauncher") and local.prefer == "processes"
    assert local.n_jobs >= 1  # cores // threads
    assert launcher("hydra/launcher=local", "runtime.threads=1").n_jobs == threads.cores()
    assert launcher("hydra/launcher=local", "runtime.threads=1000").n_jobs == 1
    assert launcher("hydra/launcher=local", "runtime=pipeline").n_jobs == 1  # a job on every core
    slurm = launcher("hydra/launcher=slurm", "hydra.launcher.partition=cpu")
    assert slurm._target_.endswith("SlurmLauncher") and slurm.partition == "cpu"
    assert slurm.timeout_min > 0 and slurm.cpus_per_task >= 1
    assert slurm.setup == [f"export OMP_NUM_THREADS={slurm.cpus_per_task}",
                           f"export SGRUN_THREADS={slurm.cpus_per_task}"]
