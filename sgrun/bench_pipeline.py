"""``make bench``: decoupled training as wall-clock speed, one process per stage (``runtime=pipeline``).

For each model and each of DNI (``dni=every_layer``: the paper's MLP or conv synthesizers) and
cDNI (``dni=cdni``: for the FCN the paper's single linear layer on ``[h, onehot(y)]``), six runs of
the same number of samples on MNIST, each a real ``sgrun`` command:

(a) in-process Bprop, (b) in-process DNI, (c) the locked pipeline (``dni=none``: backprop across the
stage processes), (d) the DNI pipeline (each stage updates with its synthetic gradient at once).
Two more: (b1) is (b) on one stage's share of the cores, and (c2) is the locked pipeline that still
runs and trains the synthesizers (``dni.mode=train_only``), i.e. the compute of (d) with the locking
as the only difference.

Printed per run: training samples per second (evaluation time left out), its ratio to (b), the test
error after all samples, and the test error at a fixed wall-clock budget (the training time at
which the slowest run made its first evaluation, so that every run has a number: the last evaluation
each run had made by then).  The in-process runs use all cores in one process; a pipeline gives
each of its ``S`` processes cores / S threads.  S = 4 runs only where there are at least 4 cores.

Run: ``python -m sgrun.bench_pipeline [--models fcn,cnn] [--dni every_layer,cdni] [--fcn-steps N]
[--cnn-steps N] [--stages 2,4] [--synthesizer-layers N]``; ``--synthesizer-layers 0`` gives linear
synthesizers (FCN), far cheaper than the paper's two hidden layers of 1024.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {
    # the 4-layer FCN of the issue (batch 256) and the 3-layer MNIST CNN preset
    "fcn": ["model=fcn", "model.layers=4"],
    "cnn": ["model=cnn", "model.layers=3", "model.channels=64"],
}
MAX_STAGES = {"fcn": 4, "cnn": 3}  # cuts + 1


METHODS = {"every_layer": "DNI", "cdni": "cDNI"}  # dni= -> its name in the table


def variants(stages: int, max_inflight: int, cores: int, dni: str = "every_layer") -> dict[str, tuple[list[str], dict]]:
    """label -> (overrides, environment); (b1) is (b) on one stage's share of the cores."""
    pipe = ["runtime=pipeline", f"runtime.stages={stages}", f"runtime.max_inflight={max_inflight}"]
    share = {"OMP_NUM_THREADS": str(max(1, cores // stages))}
    m = METHODS[dni]
    return {
        "(a) in-process Bprop": (["dni=none"], {}),
        f"(b) in-process {m}": ([f"dni={dni}"], {}),
        f"(b1) in-process {m}, {share['OMP_NUM_THREADS']} thr": ([f"dni={dni}"], share),
        f"(c) locked pipeline S={stages}": (["dni=none", *pipe], {}),
        f"(c2) locked, {m} compute S={stages}": ([f"dni={dni}", "dni.mode=train_only", *pipe], {}),
        f"(d) {m} pipeline S={stages}": ([f"dni={dni}", *pipe], {}),
    }


def run_one(overrides: list[str], folder: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "sgrun", *overrides, f"hydra.run.dir={folder}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        raise SystemExit(f"bench run failed ({' '.join(overrides)}): {tail[0] if tail else done.returncode}")
    return json.loads((folder / "summary.json").read_text())["metrics"]


def error_at(metrics: dict, seconds: float) -> float | None:
    """The test error of the last evaluation made within ``seconds`` of training."""
    made = [err for (_, err), t in zip(metrics["history"], metrics["seconds"]) if t <= seconds + 1e-6]
    return made[-1] if made else None


def bench_model(name: str, steps: int, batch: int, stages: int, max_inflight: int, cores: int, root: Path,
                dni: str = "every_layer", synth_layers: int | None = None) -> None:
    common = ["data=mnist", *MODELS[name], f"train.steps={steps}", f"train.eval_every={max(1, steps // 5)}",
              f"train.batch_size={batch}", f"train.log_every={steps}", "train.sg_quality=false",
              "optim.lr=3e-4", "checkpoint.every=0", "profile=paper"]
    if synth_layers is not None:
        common.append(f"dni.synthesizer.layers={synth_layers}")
    results = {}
    for label, (extra, env) in variants(stages, max_inflight, cores, dni).items():
        print(f"  running {label} ...", flush=True)
        results[label] = run_one([*common, *extra], root / f"{name}-{dni}-{stages}-{len(results)}", env)
    row = {label.split()[0]: m for label, m in results.items()}  # "(a)" .. "(d)"
    base = row["(b)"]["samples_per_sec"]
    budget = max(m["seconds"][0] for m in results.values())  # by then every run has been evaluated
    synth = "the preset's synthesizers" if synth_layers is None else f"synthesizers with {synth_layers} hidden layers"
    print(f"\n{name.upper()} {METHODS[dni]}, batch {batch}, {steps} steps ({steps * batch} samples), S = {stages}, "
          f"max_inflight = {max_inflight}, {synth}, budget {budget:.0f} s")
    print(f"{'run':<32}{'samples/s':>11}{'/ (b)':>8}{'err % end':>11}{'err % @budget':>15}  staleness")
    for label, m in results.items():
        at = error_at(m, budget)
        stale = ", ".join(f"{c}: mean {s['mean']:.2f} max {s['max']}" for c, s in m.get("staleness", {}).items())
        print(f"{label:<32}{m['samples_per_sec']:>11.0f}{m['samples_per_sec'] / base:>8.2f}"
              f"{m['test_error']:>11.2f}{'-' if at is None else f'{at:.2f}':>15}  {stale}")

    def ratio(a: str, b: str) -> str:
        return f"{a}/{b} = {row[a]['samples_per_sec'] / row[b]['samples_per_sec']:.2f}"

    print(", ".join(ratio("(d)", b) for b in ("(b)", "(b1)", "(c)", "(c2)")) +
          f", test error (d) - (b) = {row['(d)']['test_error'] - row['(b)']['test_error']:+.2f} points\n", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fcn,cnn")
    ap.add_argument("--fcn-steps", type=int, default=1000)
    ap.add_argument("--cnn-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--max-inflight", type=int, default=2)
    ap.add_argument("--dni", default="every_layer,cdni", help="every_layer (DNI) and/or cdni (linear synthesizers)")
    ap.add_argument("--synthesizer-layers", type=int, default=None,
                    help="hidden layers of every synthesizer (0: linear for the FCN); default: the preset's (2)")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"pipeline benchmark: {cores} cores")
    with tempfile.TemporaryDirectory(prefix="sgrun-bench-") as tmp:
        for name in a.models.split(","):
            for stages in (int(s) for s in a.stages.split(",")):
                if stages > cores:
                    print(f"{name.upper()}: S = {stages} skipped ({cores} cores)\n")
                    continue
                if stages > MAX_STAGES[name]:
                    print(f"{name.upper()}: S = {stages} skipped (at most {MAX_STAGES[name]} stages)\n")
                    continue
                steps = a.fcn_steps if name == "fcn" else a.cnn_steps
                for dni in a.dni.split(","):
                    if dni not in METHODS:
                        raise SystemExit(f"--dni {dni}: choose from {', '.join(METHODS)}")
                    bench_model(name, steps, a.batch, stages, a.max_inflight, cores, Path(tmp), dni,
                                a.synthesizer_layers)


if __name__ == "__main__":
    main()
