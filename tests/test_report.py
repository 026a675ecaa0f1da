"""make reproduce / make report: tables, claims, figures, resumable sweeps, launchers.

Most tests build run folders by hand in the layout ``sgrun -m`` leaves (``.hydra/``,
``summary.json`` or ``FAILED``, TensorBoard events in ``tb/`` written with torch's
``SummaryWriter``); one runs the real ``sgrun`` through ``experiments/reproduce.py`` on a generated
dataset.
"""

import json
import math
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
import stats  # noqa: E402
import tables  # noqa: E402
from rundirs import load_run, load_runs  # noqa: E402
from tables import Table  # noqa: E402

CIFAR_MISSING = ("CIFAR-10 not found in data/cifar10 (missing cifar-10-batches-py/data_batch_1): "
                 "download ...")
PNG = b"\x89PNG\r\n\x1a\n"


def make_run(runs: Path, preset: str, job: str, *, dni: str, seed: int = 0,
             metrics: dict | None = None, scalars: dict | None = None, failed: str | None = None,
             **config) -> Path:
    """A job folder as sgrun -m leaves it; ``config`` keys are paths with "__"
    ("model__layers")."""
    folder = runs / "smoke" / preset / job
    (folder / ".hydra").mkdir(parents=True)
    cfg = {"name": preset, "seed": seed, "profile": {"name": "smoke"}, "train": {"steps": 4},
           "optim": {"lr": 3e-4}}
    for path, value in config.items():
        node = cfg
        *parents, leaf = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    choices = {"experiment": preset, "dni": dni, "profile": "smoke"}
    (folder / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
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
             solved_at: tuple = (2560, 5120, 7680), preset: str = "table1_copy",
             repeats: int = 1, plateau: bool | None = None, **config) -> None:
    # the curriculum's largest solved N, logged against samples seen when a level is solved
    levels = list(zip(solved_at, (1, max(1, largest_n // 2), largest_n)))
    metrics = {"largest_n": largest_n, "largest_r": repeats, "largest_nr": largest_n * repeats,
               "samples_seen": solved_at[-1], "samples_at_largest": solved_at[-1]}
    if plateau is not None:  # set only when the preset has a plateau rule
        metrics["plateau_reached"] = plateau
    make_run(runs, preset, f"{k}_{dni}_{seed}", dni=dni, seed=seed, **{key: k}, **config,
             metrics=metrics,
             scalars={"by_samples/largest_solved": levels, "loss/train": [(30, 0.1)]})


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # MNIST FCN: cDNI within 0.5 points of Bprop at both depths, DNI worse when deeper;
    # two seeds of Bprop
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.0], seed=0)
    mnist_fcn(root, 3, "none", [9.0, 4.0, 2.2], seed=1)
    mnist_fcn(root, 3, "every_layer", [9.0, 5.0, 3.0])
    mnist_fcn(root, 3, "cdni", [9.0, 4.0, 2.3])
    mnist_fcn(root, 4, "none", [9.0, 4.0, 2.0])
    mnist_fcn(root, 4, "every_layer", [9.0, 6.0, 4.5])
    mnist_fcn(root, 4, "cdni", [9.0, 4.0, 2.4])
    # Copy: DNI 1.25x BPTT at k=3 (not the paper's "about twice"), 2x at k=5;
    # k lives in train.k there
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
    # Bprop at 3 layers: two seeds, mean ± sample std;
    # fewer seeds elsewhere and depths without runs say so
    assert table_row(text, "3") == ("| 3 | 2.10 ± 0.14 (–) | 3.00 [1 of 2 seeds] (–) | "
                                    "2.30 [1 of 2 seeds] (–) |")
    assert table_row(text, "5") == "| 5 | not run (–) | not run (–) | not run (–) |"
    # Table 1: our largest N next to the paper's; k found under model.k or train.k
    copy_rows = [line for line in text.splitlines() if line.startswith("| Copy, largest N |")]
    assert copy_rows[0] == ("| Copy, largest N | BPTT | not run (7) | 8 (8) | not run (10) | "
                            "8 (8) | not run (–) |")
    assert copy_rows[1].startswith("| Copy, largest N | DNI | not run (16) | 10 (14) | "
                                   "not run (18) | 16 (18) |")
    # the paper's Repeat Copy numbers stand next to N·R, not N
    assert "| Repeat Copy, largest N | BPTT | not run (–) |" in text
    assert "| Repeat Copy, largest N·R (time dependency) | BPTT | not run (7) |" in text


def test_repeat_copy_reads_n_and_n_times_r_and_how_runs_stopped(tmp_path):
    root = tmp_path / "runs"
    for seed, plateau in enumerate((True, False, None)):
        copy_run(root, 3, "none", 2, seed=seed, preset="table1_repeat_copy", repeats=1,
                 plateau=plateau)
        copy_run(root, 3, "every_k", 3 + seed, seed=seed, preset="table1_repeat_copy",
                 repeats=4, plateau=True)
    copy_run(root, 3, "none", 3, preset="table1_copy", plateau=False)
    text = write(root, tmp_path / "out")
    assert ("| Repeat Copy, largest N | DNI | not run (–) | 4.0 ± 1.0 (–) | not run (–) |"
            in text)
    assert ("| Repeat Copy, largest N·R (time dependency) | DNI | not run (39) | 16.0 ± 4.0 (33) |"
            in text)
    section = text.split("## Table 1")[1].split("\n## ")[0]
    assert ("- Repeat Copy, largest N: of 6 finished runs, 4 reached their plateau rule "
            "(`train.plateau_samples`), 2 hit the step cap (`train.steps`), 1 of them with no "
            "plateau rule.") in section
    assert "- Repeat Copy, largest N·R (time dependency): of 6 finished runs, 4 reached" in section
    assert "- Copy, largest N: of 1 finished runs, 0 reached their plateau rule" in section
    assert "- PTB, test BPC: no finished run" not in section  # PTB has no plateau rule
    assert "are more than twice its Copy values at every k" in section  # why N has no paper values
    # the claim on Repeat Copy reads N·R: 16 against 2 is more than twice, N (4 against 2) is not
    row = claim_row(text, "On Repeat Copy, DNI learns dependencies at least twice as long as BPTT "
                    "at the same k")
    assert verdict_of(row) == "held" and "k=3: 3 v 3 seeds, Δ +12" in row


def test_aux_gain_compares_per_seed_ratios(tmp_path):
    root = tmp_path / "runs"
    claim = "Aux helps most on Repeat Copy"
    # one seed per side: the ratios 8 / 4 and 4 / 4 decide nothing
    copy_run(root, 3, "every_k", 4, seed=0, preset="table1_repeat_copy")
    copy_run(root, 3, "every_k_aux", 8, seed=0, preset="table1_repeat_copy")
    copy_run(root, 3, "every_k", 4, seed=0)
    copy_run(root, 3, "every_k_aux", 4, seed=0)
    row = claim_row(write(root, tmp_path / "out"), claim)
    assert verdict_of(row) == "not decided at this budget" and "1 v 1 seed" in row
    assert "mean DNI + Aux / DNI 2.00 v 1.00" in row
    for seed in (1, 2):  # gains about 2 on Repeat Copy, about 1 on Copy
        copy_run(root, 3, "every_k", 4, seed=seed, preset="table1_repeat_copy")
        copy_run(root, 3, "every_k_aux", 8 + seed, seed=seed, preset="table1_repeat_copy")
        copy_run(root, 3, "every_k", 4 + seed, seed=seed)
        copy_run(root, 3, "every_k_aux", 4, seed=seed)
    row = claim_row(write(root, tmp_path / "out2"), claim)
    assert verdict_of(row) == "held" and "table1_repeat_copy_nr v table1_copy: 3 v 3 seeds" in row


def ptb_run(root: Path, k: int, dni: str, seed: int, curve: list[float]) -> None:
    points = [(1000 * (i + 1), v) for i, v in enumerate(curve)]
    make_run(root, "table1_ptb", f"{k}_{dni}_{seed}", dni=dni, seed=seed, model__k=k,
             metrics={"bpc_test": curve[-1]}, scalars={"by_samples/bpc_valid": points})


@pytest.mark.parametrize("dni_curves,verdict", [
    # DNI at BPTT's level after 2000 samples, BPTT after 4000: held
    ([[3.0, 2.0, 1.9, 1.9], [3.0, 1.98, 1.9, 1.9], [3.0, 1.99, 1.9, 1.9]], "held"),
    # one DNI run never gets there: the lead of the others does not make it held
    ([[3.0, 2.0, 1.9, 1.9], [3.0, 1.98, 1.9, 1.9], [3.0, 2.5, 2.4, 2.3], [3.0, 2.0, 1.9, 1.9]],
     "not decided at this budget"),
    # DNI later on every seed: not held
    ([[3.0, 2.9, 2.8, 2.7, 2.0], [3.0, 2.9, 2.8, 2.7, 2.0], [3.0, 2.9, 2.8, 2.7, 1.9]], "not held"),
])
def test_converges_faster_on_per_run_first_reach(tmp_path, dni_curves, verdict):
    root = tmp_path / "runs"
    for seed, end in enumerate((2.0, 2.02, 2.01)):
        ptb_run(root, 3, "none", seed, [3.0, 2.6, 2.3, end])
    for seed, curve in enumerate(dni_curves):
        ptb_run(root, 3, "every_k", seed, curve)
    row = claim_row(write(root, tmp_path / "out"),
                    "On PTB, DNI converges faster than BPTT (validation BPC against samples seen)")
    assert verdict_of(row) == verdict
    assert "target 2.02" in row  # the level every BPTT run reaches


def test_missing_dataset_cells_and_runs_table(runs, tmp_path):
    text = write(runs, tmp_path / "out")
    cifar = text.split("## CIFAR-10, fully connected networks")[1]
    assert table_row(cifar, "3").startswith(
        "| 3 | dataset not available (–) | not run (–) | not run (–) |")
    assert "1 failed (1 because their dataset is not available)" in text
    assert ("| cifar10_fcn | 0 | 1 | 0 | 0 | – | 0.0 | dataset not available: CIFAR-10 not found"
            in text)
    assert "| mnist_cnn | 0 | 0 | 0 | – | – | 0.0 | not run |" in text


COPY_CLAIM = "On Copy, DNI learns dependencies about twice as long as BPTT at the same k"
CDNI_CLAIM = "cDNI stays at or near Bprop on MNIST FCNs"


def verdict_of(row: str) -> str:
    return row.split(" | ")[0].strip("| *")


def test_one_or_two_seeds_decide_nothing(runs, tmp_path):
    # the fixture's means would have "held" cDNI near Bprop and DNI deeper worse: one seed each
    text = write(runs, tmp_path / "out")
    cdni = claim_row(text, CDNI_CLAIM)
    assert verdict_of(cdni) == "not decided at this budget"
    assert "layers=3: 1 v 2 seeds" in cdni and "layers=4: 1 v 1 seed," in cdni
    assert "no test: fewer than 3 per side" in cdni and "p =" not in cdni
    assert "Would decide: 3 seeds per cell" in cdni and "| 4 steps |" in cdni
    assert "| 1 v 2, 1 v 1 |" in cdni  # the seeds it rests on, per side
    assert verdict_of(claim_row(text, "DNI degrades as the MNIST FCN gets deeper")) == (
        "not decided at this budget")
    copy = claim_row(text, COPY_CLAIM)
    assert verdict_of(copy) == "not decided at this budget" and "k=3: 1 v 1 seed, Δ -2" in copy
    assert "held (DNI ≥ 1.5 × BPTT at 4 of 4)" in copy  # the paper's numbers: descriptive
    ptb = claim_row(text, "On PTB, DNI gives lower test BPC than BPTT at the same k")
    assert verdict_of(ptb) == "no data"


def cdni_near_bprop(root: Path, bprop: list[float], cdni: list[float], layers: int = 3) -> None:
    for seed, (b, c) in enumerate(zip(bprop, cdni)):
        mnist_fcn(root, layers, "none", [9.0, 4.0, b], seed=seed)
        mnist_fcn(root, layers, "cdni", [9.0, 4.0, c], seed=seed)


@pytest.mark.parametrize("bprop,cdni,verdict", [
    # cDNI - Bprop - 0.5 clearly below 0: held
    ([2.0, 2.1, 1.9], [2.05, 2.0, 2.1], "held"),
    # about 0.5 above Bprop, the seeds spread over the margin: not decided
    ([2.0, 2.6, 1.7], [2.9, 2.0, 2.6], "not decided at this budget"),
    # a point above Bprop on every seed: not held
    ([2.0, 2.1, 1.9], [3.0, 3.1, 3.05], "not held"),
])
def test_three_seeds_decide_by_welch(tmp_path, bprop, cdni, verdict):
    root = tmp_path / "runs"
    cdni_near_bprop(root, bprop, cdni)
    row = claim_row(write(root, tmp_path / "out"), CDNI_CLAIM)
    assert verdict_of(row) == verdict
    test = stats.welch(cdni, bprop, offset=0.5)
    assert f"layers=3: 3 v 3 seeds, Δ {test.estimate:+.3g}, {tables.fmt_p(test.p)}" in row
    assert "| 3 v 3 | 4 steps |" in row
    assert ("Would decide: a longer budget than 4 steps" in row) == (verdict != "held"
                                                                     and verdict != "not held")


@pytest.mark.parametrize("plateau", [True, False])
def test_an_undecided_claim_on_runs_that_stopped_on_their_own_asks_for_seeds(tmp_path, plateau):
    """Copy runs that all reached their plateau rule would not move with a higher step cap: the
    report asks for more seeds (or a more patient rule), not for a longer budget."""
    root = tmp_path / "runs"
    for seed, (bptt, dni) in enumerate([(2, 4), (3, 3), (2, 6)]):  # DNI - 1.5 BPTT spreads over 0
        copy_run(root, 3, "none", bptt, seed=seed, plateau=plateau)
        copy_run(root, 3, "every_k", dni, seed=seed, plateau=plateau)
    row = claim_row(write(root, tmp_path / "out"), COPY_CLAIM)
    assert verdict_of(row) == "not decided at this budget"
    assert ("Would decide: more seeds, or a more patient plateau rule" in row) == plateau
    assert ("Would decide: a longer budget than 4 steps or more seeds" in row) == (not plateau)


def test_a_claim_over_positions_needs_every_one(tmp_path):
    root = tmp_path / "runs"
    cdni_near_bprop(root, [2.0, 2.1, 1.9], [2.05, 2.0, 2.1], layers=3)  # held
    cdni_near_bprop(root, [2.0, 2.6, 1.7], [2.9, 2.0, 2.6], layers=4)  # not decided
    row = claim_row(write(root, tmp_path / "out"), CDNI_CLAIM)
    assert verdict_of(row) == "not decided at this budget"
    assert "held at layers=3; not decided at layers=4." in row
    cdni_near_bprop(root, [2.0, 2.1, 1.9], [3.0, 3.1, 3.05], layers=5)  # not held
    row = claim_row(write(root, tmp_path / "out2"), CDNI_CLAIM)
    assert verdict_of(row) == "not held" and "not held at layers=5" in row


@pytest.mark.parametrize("shallow,deep,verdict", [
    ([2.0, 2.2, 2.1], [8.0, 9.0, 8.5], "held"),
    ([8.0, 9.0, 8.5], [2.0, 2.2, 2.1], "not held"),
    ([2.0, 4.0, 3.0], [3.0, 2.0, 4.5], "not decided at this budget"),
])
def test_grows_compares_the_first_and_last_positions(tmp_path, shallow, deep, verdict):
    root = tmp_path / "runs"
    for seed, (a, b) in enumerate(zip(shallow, deep)):
        mnist_fcn(root, 3, "every_layer", [9.0, 5.0, a], seed=seed)
        mnist_fcn(root, 4, "every_layer", [9.0, 5.0, 5.0], seed=seed)  # in between: not tested
        mnist_fcn(root, 6, "every_layer", [9.0, 5.0, b], seed=seed)
    row = claim_row(write(root, tmp_path / "out"), "DNI degrades as the MNIST FCN gets deeper")
    assert verdict_of(row) == verdict and "layers=6 v layers=3: 3 v 3 seeds" in row


@pytest.mark.parametrize("bprop,dni,verdict", [
    ([50.0, 51.0, 50.5], [60.0, 61.0, 59.0], "held"),  # 10 points worse: more than 2
    ([50.0, 51.0, 50.5], [50.5, 51.0, 50.0], "not held"),  # no worse at all: less than 2
])
def test_gap_at_least_tests_the_margin(tmp_path, bprop, dni, verdict):
    root = tmp_path / "runs"
    for seed, (b, d) in enumerate(zip(bprop, dni)):
        for name, error in (("none", b), ("every_layer", d)):
            make_run(root, "cifar10_fcn", f"3_{name}_{seed}", dni=name, seed=seed,
                     model__layers=3, metrics={"test_error": error})
    row = claim_row(write(root, tmp_path / "out"),
                    "DNI is clearly worse than Bprop on CIFAR-10 FCNs")
    assert verdict_of(row) == verdict
    test = stats.welch(dni, bprop, offset=2.0)
    assert f"Δ {test.estimate:+.3g}, {tables.fmt_p(test.p)}" in row


def test_nothing_learned_decides_nothing(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        copy_run(root, 3, "none", 0, seed=seed)
        copy_run(root, 3, "every_k", 0, seed=seed)
    row = claim_row(write(root, tmp_path / "out"), COPY_CLAIM)
    assert verdict_of(row) == "not decided at this budget"
    assert "k=3: 3 v 3 seeds, Δ +0, p = 1, no seed spread" in row


def test_a_difference_without_spread_is_outside_it(tmp_path):
    # largest N is a whole number: three seeds of 2 against three of 8 leave no spread at all
    root = tmp_path / "runs"
    for seed in range(3):
        copy_run(root, 3, "none", 2, seed=seed)
        copy_run(root, 3, "every_k", 8, seed=seed)
    row = claim_row(write(root, tmp_path / "out"), COPY_CLAIM)
    assert verdict_of(row) == "held" and "Δ +5, p = 0, no seed spread: held" in row


def test_the_report_opens_with_a_summary_of_the_verdicts(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):  # Copy at k = 3: three seeds of DNI far above 1.5 x BPTT
        copy_run(root, 3, "none", 2 + seed % 2, seed=seed)
        copy_run(root, 3, "every_k", 9 + seed, seed=seed)
    cdni_near_bprop(root, [2.0, 2.1, 1.9], [3.0, 3.1, 3.05])  # a point above Bprop: not held
    mnist_fcn(root, 3, "every_layer", [9.0, 5.0, 3.0])  # DNI deeper worse, one seed
    mnist_fcn(root, 4, "every_layer", [9.0, 6.0, 4.5])
    text = write(root, tmp_path / "out")
    lines = text.splitlines()
    assert lines[0] == "# Results: sgrun next to the paper"
    assert lines[4].startswith("- **Profile**:")
    assert lines[6] == "## Summary"
    summary = text.split("## Summary")[1].split("\n## ")[0]
    claims = len(report.load_reference()["claims"])
    assert (f"Of the paper's {claims} claims, on our numbers: 1 held, 1 not held, "
            f"1 not decided at this budget, {claims - 3} no data. "
            "Profile `smoke`: 7.0 minutes of training in all.") in summary
    groups = [line for line in summary.splitlines() if line.endswith("):")]
    assert groups == ["**held** (1):", "**not held** (1):", "not decided at this budget (1):",
                      f"no data ({claims - 3}):",
                      "Ablations (ours, not claims of the paper; same rule):"]
    assert summary.rstrip().endswith(f"- {ABLATION}: no data")
    held = summary.split("**held** (1):")[1].split("**not held**")[0]
    assert held.strip() == f"- {COPY_CLAIM} (3 v 3 seeds, 4 steps)"
    assert f"- {CDNI_CLAIM} (3 v 3 seeds, 4 steps)" in summary.split("**not held** (1):")[1]
    undecided = (summary.split("not decided at this budget (1):")[1]
                 .split(f"no data ({claims - 3}):")[0])
    assert undecided.strip() == ("- DNI degrades as the MNIST FCN gets deeper (1 v 1 seeds, "
                                 "4 steps); would decide: 3 seeds per cell")
    assert "- On PTB, DNI gives lower test BPC than BPTT at the same k\n" in summary


ABLATION = "The unscaled bootstrap (1.0) extends Copy's largest N beyond the default's"
DEFAULT_BOOTSTRAP = "0.1 (injected scale, default)"


def bootstrap_run(root: Path, job: str, largest_n: int, seed: int = 0, k: int = 3, **config):
    copy_run(root, k, "every_k", largest_n, seed=seed, preset="table1_copy_bootstrap",
             plateau=True, **config)
    folder = root / "smoke" / "table1_copy_bootstrap"
    (folder / f"{k}_every_k_{seed}").rename(folder / job)


def test_the_bootstrap_ablation_rows_take_null_and_one(tmp_path):
    root = tmp_path / "runs"
    bootstrap_run(root, "null", 2, dni__bootstrap_scale=None, dni__scale=0.1)
    bootstrap_run(root, "absent", 2, seed=1, dni__scale=0.1)  # a config from before the key
    bootstrap_run(root, "one", 4, dni__bootstrap_scale=1.0)
    bootstrap_run(root, "one_int", 4, seed=1, dni__bootstrap_scale=1)
    bootstrap_run(root, "explicit", 9, seed=2, dni__bootstrap_scale=0.1)  # in neither row
    bootstrap_run(root, "k5", 9, seed=2, k=5, dni__bootstrap_scale=None)  # not Copy at k = 3
    spec = next(t for t in report.load_reference()["tables"] if t["id"] == "bootstrap_ablation")
    table = Table(spec, load_runs(root / "smoke"))
    in_row = {label: sorted(r.path.name for r in table.cells[(label, "DNI")].runs)
              for label in (DEFAULT_BOOTSTRAP, "1.0")}
    assert in_row == {DEFAULT_BOOTSTRAP: ["absent", "null"], "1.0": ["one", "one_int"]}
    text = write(root, tmp_path / "out")
    assert table_row(text, DEFAULT_BOOTSTRAP) == (
        f"| {DEFAULT_BOOTSTRAP} | 2.0 ± 0.0 [2 of 3 seeds] (–) |")
    # printed apart from the paper's claims, and not counted among them
    claims = text.split("## The paper's claims on our numbers")[1].split("\n## ")[0]
    assert ABLATION not in claims
    ablations = text.split("## Ablations: our own comparisons, not claims of the paper")[1]
    row = claim_row(ablations.split("\n## ")[0], ABLATION)
    assert verdict_of(row) == "not decided at this budget" and "2 v 2 seeds" in row
    assert row.endswith("| ablation, not in the paper [none] |")
    assert "## Ablation (not in the paper): the recurrent synthesizer's bootstrapped target" in text
    summary = text.split("## Summary")[1].split("\n## ")[0]
    assert f"Of the paper's {len(report.load_reference()['claims'])} claims" in summary
    assert f"- {ABLATION}: not decided at this budget (2 v 2 seeds, 4 steps)" in summary


def test_the_bootstrap_ablation_is_decided_with_three_seeds(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        bootstrap_run(root, f"default_{seed}", 2 + seed % 2, seed=seed)
        bootstrap_run(root, f"one_{seed}", 6 + seed, seed=seed, dni__bootstrap_scale=1.0)
    text = write(root, tmp_path / "out")
    row = claim_row(text, ABLATION)
    assert verdict_of(row) == "held" and "method=DNI: 3 v 3 seeds, Δ -4.67" in row


def test_claim_thresholds_agree_with_the_papers_own_numbers():
    reference = report.load_reference()
    tables = report.build_tables(reference, [])
    verdicts = {c["text"]: report.evaluate(c, tables, on_paper=True).verdict
                for c in reference["claims"]}
    checked = {text: v for text, v in verdicts.items() if v != "no data"}
    assert len(checked) >= 4  # Copy, Repeat Copy, Aux, PTB, CIFAR-10 CNN
    assert set(checked.values()) == {"held"}, checked


def test_figures_are_png_files_and_missing_ones_are_noted(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fig_ptb_valid_bpc.png").write_bytes(PNG + b"from older runs")
    # a Repeat Copy run too short to solve a level has no curve against samples:
    # the fallback is drawn
    make_run(runs, "table1_repeat_copy", "3_none", dni="none", model__k=3, metrics={"largest_n": 0},
             scalars={"curriculum/largest_solved": [(2, 0.0), (4, 0.0)]})
    text = write(runs, out)
    for name in ("fig_mnist_fcn_test_error.png", "fig_copy_largest_n.png",
                 "fig_repeat_copy_largest_n.png"):
        assert (out / name).read_bytes()[:8] == PNG
        assert f"]({name})" in text
    assert ("Note: drawn from `curriculum/largest_solved`"
            in text.split("fig_repeat_copy_largest_n.png")[1])
    # no PTB runs: no figure (the stale one is gone) and a note instead
    assert not (out / "fig_ptb_valid_bpc.png").exists()
    assert "*Penn Treebank, validation BPC against samples seen*: not drawn" in text


def test_later_experiments_fill_their_tables_claims_and_figures(runs, tmp_path):
    # the stochastic-update sweep ...
    for p in (1.0, 0.2, 0.05):
        for dni in ("every_layer", "cdni"):
            err = 2 + 0.1 / p
            make_run(runs, "mnist_fcn_update_prob", f"{p}_{dni}", dni=dni, model__name="fcn",
                     model__layers=4, data__name="mnist", train__update_prob=p,
                     metrics={"test_error": err},
                     scalars={"error/test": [(1000, 3 * err), (2000, err)]})
    for seed in (1, 2):  # three seeds where the claim is tested
        make_run(runs, "mnist_fcn_update_prob", f"0.05_cdni_{seed}", dni="cdni", seed=seed,
                 model__name="fcn", model__layers=4, data__name="mnist", train__update_prob=0.05,
                 metrics={"test_error": 4.0 + 0.1 * seed})
    # ... and the two networks at two timescales, three seeds
    for seed in range(3):
        for coupling, b_error in (("none", 0.8), ("dni", 0.3), ("bptt", 0.2)):
            make_run(runs, "two_timescale", f"{coupling}_{seed}", dni="message", seed=seed,
                     model__name="hrnn", model__coupling=coupling,
                     metrics={"error_a": 0.1, "error_b": b_error + 0.01 * seed},
                     scalars={"error/A": [(100, 0.5), (200, 0.1)],
                              "error/B": [(100, 0.9), (200, b_error)]})
    out = tmp_path / "out"
    text = write(runs, out)
    updates = text.split("## Stochastic updates")[1]
    assert table_row(updates, "0.2").startswith(
        "| 0.2 | 2.50 [1 of 3 seeds] (–) | 2.50 [1 of 3 seeds] (3.05) |")
    assert (table_row(updates, "0.5")
            == "| 0.5 | not run (–) | not run (–) | not run (–) | not run (–) |")
    assert table_row(text, "DNI") == "| DNI | 0.10 ± 0.00 (–) | 0.31 ± 0.01 (–) |"
    under = claim_row(text, "With stochastic updates, cDNI still trains at update_prob 0.05")
    assert verdict_of(under) == "held" and "update_prob=0.05: 3 seeds, Δ -5.9, p < 0.001" in under
    coupled = claim_row(text, "Network B learns from A's messages with DNI coupling (B's error "
                        "below the uncoupled one)")
    assert verdict_of(coupled) == "held" and "network=B error: 3 v 3 seeds, Δ -0.5" in coupled
    for name in ("fig_update_prob.png", "fig_two_timescale_errors.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_error_bands_average_seeds(runs):
    from curves import mean_curve

    specs = {t["id"]: t for t in report.load_reference()["tables"]}
    table = Table(specs["mnist_fcn"], load_runs(runs / "smoke"))
    xs, mean, std = mean_curve(table.curve_runs("3", "Bprop"), "error/test")
    assert (list(xs) == [100, 200, 300] and mean[-1] == pytest.approx(2.1)
            and std[-1] == pytest.approx(0.1414, abs=1e-3))
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
def test_event_files_of_an_interrupted_run_are_joined_as_tensorboard_does(tmp_path, purge_step,
                                                                           expected):
    # the first run logged up to step 300 and was killed; then a second writer in the same tb/
    root = tmp_path / "runs"
    folder = make_run(root, "mnist_fcn", "0", dni="none", model__layers=3,
                      scalars={"error/test": [(100, 50.0), (200, 40.0), (300, 30.0)]})
    first = next((folder / "tb").glob("events*"))
    # older than the next one
    first.rename(first.with_name("events.out.tfevents.1000000000.host.1.0"))
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
    (job / "summary.json").write_text(json.dumps({"status": "finished", "metrics": {},
                                                  "choices": {}, "config": {}}))
else:
    (job / "FAILED").write_text(outcome)
sys.exit(0 if outcome == "finished" else 1)
"""


@pytest.mark.parametrize("cifar_error,code",
                         [(CIFAR_MISSING, 0), ("RuntimeError: out of memory", 1)])
def test_a_failing_preset_does_not_stop_the_others(tmp_path, monkeypatch, capsys, cifar_error,
                                                   code):
    fake = tmp_path / "fake_sgrun.py"
    fake.write_text(FAKE_SGRUN)
    outcomes = {"cifar10_fcn": cifar_error, "mnist_fcn": "finished"}
    monkeypatch.setattr(reproduce, "sgrun_command",
                        lambda preset, profile, sweep_dir, *_: [sys.executable, str(fake),
                                                                str(sweep_dir), outcomes[preset]])
    # mnist_fcn failed last time: its stale FAILED must go once it finishes
    stale = tmp_path / "runs" / "smoke" / "mnist_fcn" / "0_job"
    (stale / ".hydra").mkdir(parents=True)
    (stale / "FAILED").write_text("killed")
    assert reproduce.main(["--profile", "smoke", "--only", "cifar10_fcn,mnist_fcn",
                           "--runs", str(tmp_path / "runs")]) == code
    out = capsys.readouterr().out
    assert "cifar10_fcn" in out and "0/1 runs finished (0 before), 1 failed" in out
    assert re.search(r"mnist_fcn +1/1 runs finished \(0 before\), 0 failed", out)
    assert ("dataset not available" in out) == (code == 0)
    assert not (stale / "FAILED").exists()


def test_reproduce_skips_finished_runs_and_redoes_unfinished_ones(tmp_path):
    """The real sgrun, 2 jobs of mnist_fcn on generated data: run, lose one run (as if killed), run
    again."""
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
        cfg = compose(config_name="config", overrides=["experiment=mnist_fcn", *overrides],
                      return_hydra_config=True)
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


# ---------------------------------------------------------------------------------------------
# Statistics


def t_density(x: float, df: float) -> float:
    front = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(front - (df + 1) / 2 * math.log1p(x * x / df))


def integrated_p(t: float, df: float, intervals: int = 20_000) -> float:
    """Two-sided p of Student's t by Simpson's rule on the density: 1 - 2 * integral over
    [0, |t|]."""
    h = abs(t) / intervals
    inner = sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, intervals))
    area = h / 3 * (t_density(0.0, df) + inner + t_density(abs(t), df))
    return 1 - 2 * area


@pytest.mark.parametrize("t,df", [(2.0, 10), (-2.0, 10), (1.0, 1), (3.0, 2), (0.5, 3.7),
                                  (4.04, 4.96), (2.5, 30), (6.0, 2.2), (0.01, 8)])
def test_student_t_p_values_match_the_integrated_density(t, df):
    assert stats.t_two_sided_p(t, df) == pytest.approx(integrated_p(t, df), abs=1e-9)


def test_student_t_closed_forms_and_a_table_value():
    assert stats.t_two_sided_p(2.0, 10) == pytest.approx(0.0734, abs=5e-5)  # the textbook value
    for t in (0.3, 1.0, 7.0):
        assert stats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi)  # Cauchy
        assert stats.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert stats.t_two_sided_p(0.0, 5) == 1.0 and stats.t_two_sided_p(math.inf, 5) == 0.0
    assert stats.t_cdf(-2.0, 10) == pytest.approx(integrated_p(2.0, 10) / 2, abs=1e-9)
    assert stats.t_cdf(2.0, 10) == pytest.approx(1 - integrated_p(2.0, 10) / 2, abs=1e-9)
    # many degrees of freedom: the normal distribution's 1.96
    assert stats.t_two_sided_p(1.959964, 1e7) == pytest.approx(0.05, abs=1e-5)


def test_welch_statistic_and_degrees_of_freedom():
    # by hand: means 2 and 5.5, variances 1 and 5/3, squared standard error 1/3 + 5/12 = 3/4
    test = stats.welch([1, 2, 3], [4, 5, 6, 7])
    assert test.estimate == pytest.approx(-3.5)
    assert test.t == pytest.approx(-3.5 / math.sqrt(0.75))
    assert test.df == pytest.approx(0.5625 / (1 / 18 + 25 / 432))
    assert test.p == pytest.approx(integrated_p(test.t, test.df), abs=1e-9)
    shifted = stats.welch([1, 2, 3], [4, 5, 6, 7], offset=-3.5)  # mean(a) - mean(b) + 3.5 = 0
    assert shifted.estimate == pytest.approx(0) and shifted.p == pytest.approx(1)
    one = stats.one_sample([2.0, 2.5, 3.5], 5.0)
    assert one.df == 2 and one.t == pytest.approx((8 / 3 - 5) / math.sqrt((7 / 12) / 3))
    # no spread at all: a difference is outside it, no difference decides nothing
    flat = stats.welch([2, 2, 2], [1, 1, 1])
    assert flat.p == 0.0 and flat.df is None and flat.t == math.inf
    assert stats.welch([1, 1, 1], [1, 1, 1]).p == 1.0
    with pytest.raises(ValueError):
        stats.welch([1.0], [1.0, 2.0])


def test_a_full_disk_leaves_the_previous_report_whole(runs, tmp_path, monkeypatch, capsys):
    """RESULTS.md and the figures go through a temporary file and a rename: a write that fails
    (here: no space at fsync) is one line, exit 1, and the previous report stays as it was."""
    import errno

    import sgrun.metrics as metrics

    out = tmp_path / "out"
    write(runs, out)
    before = (out / "RESULTS.md").read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "fsync", no_space)
    code = report.main(["--profile", "smoke", "--runs", str(runs), "--out", str(out),
                        "--evidence", str(tmp_path / "evidence")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert (out / "RESULTS.md").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_corrupt_summary_is_reported_not_skipped(runs, tmp_path):
    """A summary.json cut short counts as unfinished, and the report names it."""
    job = next(p for p in sorted((runs / "smoke" / "mnist_fcn").iterdir())
               if (p / "summary.json").exists())
    (job / "summary.json").write_text('{"status": "finish')
    text = write(runs, tmp_path / "out")
    row = next(line for line in text.splitlines() if line.startswith("| mnist_fcn |"))
    assert "1 unfinished:" in row and job.name in row and "summary.json is unreadable" in row
