"""``make bench``: decoupled training as wall-clock speed, one process per stage
(``runtime=pipeline``), next to what a cost model predicts from each stage's measured times.

For each model and each of DNI (``dni=every_layer``: the paper's MLP or conv synthesizers) and
cDNI (``dni=cdni``: for the FCN the paper's single linear layer on ``[h, onehot(y)]``), runs of the
same number of samples on MNIST, each a real ``sgrun`` command:

(a) in-process Bprop, (b) in-process DNI, (c) the locked pipeline (``dni=none``: stop-and-wait
backprop across the stage processes), (c3) the same split by backprop with ``M`` micro-batches
through ``torch.distributed.pipelining``'s GPipe schedule (``runtime.schedule=gpipe``), (c4) the
same with 1F1B, (d) the DNI pipeline (each stage updates with its synthetic gradient at once).
(a1) and (b1) are (a) and (b) on one stage's share of the cores, and (c2) is the locked pipeline
that still runs and trains the synthesizers (``dni.mode=train_only``), i.e. the compute of (d)
with the locking as the only difference.

Models: the paper's 4-layer FCN and 3-layer MNIST CNN (``fcn``, ``cnn``), and ``mlp``, a model
where DNI can pay: 8 hidden blocks of 2048 units with linear cDNI synthesizers at the stage
boundaries only, so that each stage is heavy next to its synthesizer (the share of the stage's
multiply-adds is printed).

Printed per run: training samples per second (evaluation time left out), its ratio to (b), the
test error after all samples, the test error at a fixed wall-clock budget (the training time at
which the slowest run made its first evaluation), and for (a1) and every pipeline the cost model's
prediction (:mod:`sgrun.pipeline.cost`) with its error.  The model's inputs are measured first:
each stage's forward, backward, optimizer step, synthesizer and micro-batch times on one thread
(:mod:`sgrun.pipeline.timing`; the stages of the DNI pipeline, GPipe and 1F1B timed running at
once, those of stop-and-wait backprop, (c) and (c2), timed taking turns, each part right after
the wait for its neighbour, as they run), and the time of a message between two processes.  The
in-process runs (a), (b) use all cores in one process; a pipeline gives each of its ``S``
processes cores / S threads.  S = 4 runs only where there are at least 4 cores.

``--figure`` (default ``experiments/fig_pipeline_cost.png``) plots the predicted speed-up over
one device against S = 2, 4, 8, 16 per method (a model made deeper with S, one measured stage per
device: :func:`sgrun.pipeline.cost.deeper`), with the measured pipelines on it.

Run: ``python -m sgrun.bench_pipeline [--models fcn,cnn,mlp] [--dni every_layer,cdni]
[--fcn-steps N] [--cnn-steps N] [--mlp-steps N] [--stages 2,4] [--microbatches 4]
[--synthesizer-layers N] [--figure PATH] [--json PATH]``; ``--synthesizer-layers 0`` gives
linear synthesizers (FCN), far cheaper than the paper's two hidden layers of 1024.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = {
    # the 4-layer FCN of the issue (batch 256) and the 3-layer MNIST CNN preset
    "fcn": ["model=fcn", "model.layers=4"],
    "cnn": ["model=cnn", "model.layers=3", "model.channels=64"],
    # a model where DNI can pay: deep and wide stages, a linear synthesizer at each boundary only
    "mlp": ["model=fcn", "model.layers=9", "model.hidden=2048", "data.test_limit=1000"],
}
MAX_STAGES = {"fcn": 4, "cnn": 3, "mlp": 9}  # cuts + 1
BLOCKS = {"fcn": 3, "cnn": 2, "mlp": 8}
EVALS = {"fcn": 5, "cnn": 5, "mlp": 2}  # evaluations per run
ONLY_DNI = {"mlp": ("cdni",)}  # models run with some methods only
FIGURE_STAGES = (2, 4, 8, 16)

METHODS = {"every_layer": "DNI", "cdni": "cDNI"}  # dni= -> its name in the table


def even_boundaries(blocks: int, stages: int) -> list[str]:
    """Cuts that give each of ``stages`` stages an equal share of ``blocks`` blocks."""
    return [f"h{round(i * blocks / stages)}" for i in range(1, stages)]


def variants(stages: int, max_inflight: int, cores: int, dni: str = "every_layer",
             microbatches: int = 4, at_boundaries: list[str] | None = None
             ) -> dict[str, tuple[list[str], dict, str | None]]:
    """label -> (overrides, environment, cost-model method); (a1) and (b1) are (a) and (b) on
    one stage's share of the cores.  ``at_boundaries``: the split, with the synthesizers there
    only (``mlp``); otherwise ``runtime.boundaries=auto`` and the method's own interfaces."""
    pipe = ["runtime=pipeline", f"runtime.stages={stages}"]
    synth = [f"dni={dni}"]
    if at_boundaries is not None:
        cuts = "[" + ",".join(at_boundaries) + "]"
        pipe.append(f"runtime.boundaries={cuts}")
        synth.append(f"dni.cuts={cuts}")
    dni_pipe = [*pipe, f"runtime.max_inflight={max_inflight}"]
    share = {"OMP_NUM_THREADS": str(max(1, cores // stages))}
    m, thr, M = METHODS[dni], share["OMP_NUM_THREADS"], microbatches
    micro = [f"runtime.microbatches={M}"]
    rows = {
        "(a) in-process Bprop": (["dni=none"], {}, None),
        f"(a1) in-process Bprop, {thr} thr": (["dni=none"], share, "one_device"),
        f"(b) in-process {m}": (synth, {}, None),
        f"(b1) in-process {m}, {thr} thr": (synth, share, None),
        f"(c) locked pipeline S={stages}": (["dni=none", *dni_pipe], {}, "locked"),
        f"(c2) locked, {m} compute S={stages}": ([*synth, "dni.mode=train_only", *dni_pipe], {},
                                                  "locked_dni"),
        f"(c3) GPipe M={M} S={stages}": (["dni=none", *pipe, "runtime.schedule=gpipe", *micro],
                                         {}, "gpipe"),
        f"(c4) 1F1B M={M} S={stages}": (["dni=none", *pipe, "runtime.schedule=1f1b", *micro],
                                        {}, "1f1b"),
        f"(d) {m} pipeline S={stages}": ([*synth, *dni_pipe], {}, "dni"),
    }
    if M < stages:  # 1F1B needs at least one micro-batch per stage
        rows = {k: v for k, v in rows.items() if not k.startswith("(c4)")}
    return rows


def run_one(overrides: list[str], folder: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "sgrun", *overrides, f"hydra.run.dir={folder}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        raise SystemExit(f"bench run failed ({' '.join(overrides)}): "
                         f"{tail[0] if tail else done.returncode}")
    return json.loads((folder / "summary.json").read_text())["metrics"]


def error_at(metrics: dict, seconds: float) -> float | None:
    """The test error of the last evaluation made within ``seconds`` of training."""
    made = [err for (_, err), t in zip(metrics["history"], metrics["seconds"])
            if t <= seconds + 1e-6]
    return made[-1] if made else None


# --------------------------------------------------------------------------- the cost model


def synthesizer_shares(dni_overrides: list[str], locked_overrides: list[str]) -> list[float]:
    """Per stage of the DNI run's split: the synthesizers' share of the stage's multiply-adds
    (one example, forward, as :func:`sgrun.pipeline.block_costs` counts them)."""
    from sgrun.build import build_images
    from sgrun.pipeline import block_costs, plan_split
    from sgrun.pipeline.stage import full_model
    from sgrun.pipeline.timing import compose

    models = []
    for overrides in (dni_overrides, locked_overrides):
        cfg = compose(overrides)
        data = build_images(cfg)
        models.append((cfg, full_model(cfg, tuple(data.shape), data.num_classes)))
    (cfg, model), (_, bare) = models
    with_synth, without = block_costs(model), block_costs(bare)
    shares = []
    for lo, hi in plan_split(model, cfg.runtime).ranges:
        total = sum(with_synth[lo:hi])
        shares.append((total - sum(without[lo:hi])) / total if total else 0.0)
    return shares


def measure(common: list[str], rows: dict, microbatches: int, repeats: int) -> dict:
    """Stage times of the locked and the DNI configs, the message link, and the synthesizer
    shares: everything the cost model needs for these rows."""
    from sgrun.pipeline.timing import compose, measure_link, measure_stages

    by_method = {method: over for over, _, method in rows.values() if method}
    counts = sorted({microbatches, *(4 * s for s in FIGURE_STAGES)})
    locked = measure_stages(compose([*common, *by_method["locked"]]), counts, repeats)
    dni_over = by_method["dni"]
    synth = measure_stages(compose([*common, *dni_over]), (), repeats)
    # stop-and-wait backprop: its stages timed taking turns, as it runs them
    turns = {name: measure_stages(compose([*common, *by_method[method]]), (), repeats, turns=True)
             for name, method in (("locked_turns", "locked"), ("dni_turns", "locked_dni"))
             if method in by_method}
    batch = int(compose(common).train.batch_size)
    link, raw = measure_link(max(s.act_bytes for s in locked), batch, sorted({microbatches, 16}))
    shares = synthesizer_shares([*common, *dni_over], [*common, *by_method["locked"]])
    return {"locked": locked, "dni": synth, **turns, "link": link, "link_raw": raw,
            "shares": shares}


def stages_for(method: str, model: dict) -> list:
    """The stage times a method's prediction is made from: the DNI pipeline's stages run at
    once; stop-and-wait backprop's take turns; GPipe's and 1F1B's run at once, on the backprop
    split."""
    if method == "dni":
        return model["dni"]
    if method == "locked_dni":
        return model.get("dni_turns", model["dni"])
    if method == "locked":
        return model.get("locked_turns", model["locked"])
    return model["locked"]


def predicted_rate(method: str, model: dict, batch: int, steps: int, segments: int,
                   max_inflight: int, microbatches: int):
    """Samples/s the cost model predicts for a measured run, and the DNI staleness."""
    from sgrun.pipeline import cost

    stages = stages_for(method, model)
    seconds = cost.run_seconds(method, stages, model["link"], steps, segments, max_inflight,
                               microbatches)
    stale = None
    if method == "dni":
        stale = cost.predict("dni", stages, model["link"], batch, max_inflight).staleness_mean
    return steps * batch / seconds, stale


def print_stage_times(model: dict) -> None:
    link, raw = model["link"], model["link_raw"]
    print(f"  message: {link.latency * 1e6:.0f} us + bytes / {link.bandwidth / 1e9:.2f} GB/s "
          "(measured one way: " + ", ".join(f"{n} B {t * 1e6:.0f} us"
                                            for n, t in raw["one_way"].items()) + ")")
    for kind, name in (("gpipe", "GPipe"), ("1f1b", "1F1B")):
        null = raw.get(f"null_{kind}_step", {})
        if null:
            print(f"  torch schedule, {name}: {link.overhead(kind) * 1e6:.0f} us per micro-batch "
                  f"forward or backward (fitted to {name} steps with nothing to compute: "
                  + ", ".join(f"M={m} {t * 1e3:.1f} ms" for m, t in null.items()) + ")")
    print(f"  {'stage':<7}{'fwd ms':>8}{'bwd ms':>8}{'step ms':>8}{'synth ms':>10}"
          f"{'msg KB':>8}{'synth MACs':>12}{'synth time':>12}  micro-batch fwd+bwd ms")
    print("  (synth MACs: every synthesizer of the stage; synth ms and time: its boundary one)")
    for s, (lk, dn, share) in enumerate(zip(model["locked"], model["dni"], model["shares"])):
        syn = dn.syn_fwd + dn.syn_update
        work = dn.data + dn.fwd + dn.bwd + dn.update + syn
        micro = ", ".join(f"M={m}: {(f + b) * 1e3:.1f}" for m, f, b in lk.mb)
        print(f"  {s:<7}{lk.fwd * 1e3:>8.1f}{lk.bwd * 1e3:>8.1f}{lk.update * 1e3:>8.1f}"
              f"{syn * 1e3:>10.1f}{lk.act_bytes / 1e3:>8.0f}{share:>11.0%}{syn / work:>12.0%}"
              f"  {micro}")


# --------------------------------------------------------------------------- one table


def bench_model(name: str, steps: int, batch: int, stages: int, max_inflight: int, cores: int,
                root: Path, dni: str = "every_layer", synth_layers: int | None = None,
                microbatches: int = 4, repeats: int = 5) -> dict:
    evals = EVALS[name]
    common = ["data=mnist", *MODELS[name], f"train.steps={steps}",
              f"train.eval_every={max(1, steps // evals)}", f"train.batch_size={batch}",
              f"train.log_every={steps}", "train.sg_quality=false", "optim.lr=3e-4",
              "checkpoint.every=0", "profile=paper"]
    if synth_layers is not None:
        common.append(f"dni.synthesizer.layers={synth_layers}")
    bounds = even_boundaries(BLOCKS[name], stages) if name in ONLY_DNI else None
    rows = variants(stages, max_inflight, cores, dni, microbatches, bounds)
    print("  measuring the stages (one thread each) and a message ...", flush=True)
    model = measure(common, rows, microbatches, repeats)
    results = {}
    for label, (extra, env, _) in rows.items():
        print(f"  running {label} ...", flush=True)
        results[label] = run_one([*common, *extra], root / f"{name}-{dni}-{stages}-{len(results)}",
                                 env)
    row = {label.split()[0]: m for label, m in results.items()}  # "(a)" .. "(d)"
    base = row["(b)"]["samples_per_sec"]
    budget = max(m["seconds"][0] for m in results.values())  # by then every run has been evaluated
    segments = math.ceil(steps / max(1, steps // evals))
    synth = ("the preset's synthesizers" if synth_layers is None
             else f"synthesizers with {synth_layers} hidden layers")
    if bounds is not None:
        synth = f"linear synthesizers at {', '.join(bounds)} only"
    print(f"\n{name.upper()} {METHODS[dni]}, batch {batch}, {steps} steps "
          f"({steps * batch} samples), S = {stages}, max_inflight = {max_inflight}, "
          f"M = {microbatches}, {synth}, "
          f"budget {budget:.0f} s")
    print_stage_times(model)
    print(f"{'run':<32}{'samples/s':>11}{'/ (b)':>7}{'err % end':>10}{'err % @budget':>14}"
          f"{'predicted':>11}{'error':>8}  staleness (predicted mean)")
    table = []
    for label, m in results.items():
        at = error_at(m, budget)
        method = rows[label][2]
        pred = stale_pred = None
        if method:
            pred, stale_pred = predicted_rate(method, model, batch, steps, segments, max_inflight,
                                              microbatches)
        rate = m["samples_per_sec"]
        stale = ", ".join(f"{c}: mean {s['mean']:.2f} max {s['max']}"
                          for c, s in m.get("staleness", {}).items())
        if stale_pred is not None:
            stale += f" ({stale_pred:.2f})"
        err = None if pred is None else (pred - rate) / rate
        print(f"{label:<32}{rate:>11.0f}{rate / base:>7.2f}{m['test_error']:>10.2f}"
              f"{'-' if at is None else f'{at:.2f}':>14}"
              f"{'-' if pred is None else f'{pred:.0f}':>11}"
              f"{'-' if err is None else f'{err:+.0%}':>8}  {stale}")
        table.append({"label": label, "method": method, "samples_per_sec": rate,
                      "predicted": pred, "prediction_error": err, "test_error": m["test_error"],
                      "error_at_budget": at, "staleness": m.get("staleness", {}),
                      "staleness_predicted": stale_pred})

    def ratio(a: str, b: str) -> str:
        return f"{a}/{b} = {row[a]['samples_per_sec'] / row[b]['samples_per_sec']:.2f}"

    others = [b for b in ("(b)", "(b1)", "(c)", "(c2)", "(c3)", "(c4)") if b in row]
    print(", ".join(ratio("(d)", b) for b in others) +
          f", test error (d) - (b) = {row['(d)']['test_error'] - row['(b)']['test_error']:+.2f} "
          "points\n", flush=True)
    return {"model": name, "dni": dni, "stages": stages, "batch": batch, "steps": steps,
            "microbatches": microbatches, "max_inflight": max_inflight, "rows": table,
            "cost": model}


# --------------------------------------------------------------------------- the figure


def curves(result: dict) -> dict[str, list[tuple[int, float]]]:
    """Predicted speed-up over one device against S, per method, for a model made deeper with S
    (:func:`sgrun.pipeline.cost.deeper` of the measured stages)."""
    from sgrun.pipeline import cost

    model, batch, M = result["cost"], result["batch"], result["microbatches"]
    k, link = result["max_inflight"], model["link"]
    out: dict[str, list[tuple[int, float]]] = {}
    for S in FIGURE_STAGES:
        locked, synth = cost.deeper(model["locked"], S), cost.deeper(model["dni"], S)
        one = cost.one_device(locked, batch).samples_per_sec
        runs = [(f"{METHODS[result['dni']]} pipeline, max_inflight={k}", "dni", synth,
                 {"max_inflight": k}),
                (f"GPipe, M={M}", "gpipe", locked, {"microbatches": M})]
        if M >= S:
            runs.append((f"1F1B, M={M}", "1f1b", locked, {"microbatches": M}))
        if batch % (4 * S) == 0:
            runs.append(("1F1B, M=4S", "1f1b", locked, {"microbatches": 4 * S}))
        runs.append(("locked, stop-and-wait", "locked", cost.deeper(stages_for("locked", model), S),
                     {}))
        for label, method, stages, kw in runs:
            rate = cost.predict(method, stages, link, batch, **kw).samples_per_sec
            out.setdefault(label, []).append((S, rate / one))
    return out


def measured_points(result: dict) -> dict[str, tuple[int, float]]:
    """Measured samples/s of each pipeline over those of (a1), at the measured S."""
    rows = {r["label"].split()[0]: r for r in result["rows"]}
    one = rows["(a1)"]["samples_per_sec"]
    names = {"(c)": "locked, stop-and-wait", "(c3)": f"GPipe, M={result['microbatches']}",
             "(c4)": f"1F1B, M={result['microbatches']}",
             "(d)": f"{METHODS[result['dni']]} pipeline, max_inflight={result['max_inflight']}"}
    return {label: (result["stages"], rows[key]["samples_per_sec"] / one)
            for key, label in names.items() if key in rows}


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        points = measured_points(result)
        for i, (label, line) in enumerate(curves(result).items()):
            color = f"C{i}"
            ax.plot(*zip(*line), marker="o", color=color, label=label)
            if label in points:
                ax.plot(*points[label], marker="*", markersize=14, color=color,
                        markeredgecolor="black", linestyle="none")
        ax.plot(FIGURE_STAGES, FIGURE_STAGES, color="grey", linestyle=":", label="S (ideal)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(FIGURE_STAGES, [str(s) for s in FIGURE_STAGES])
        ax.set_xlabel("stages S (one device each)")
        ax.set_ylabel("speed-up over one device")
        ax.set_title(f"{result['model'].upper()} {METHODS[result['dni']]}, batch {result['batch']}"
                     " (stars: measured)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")


def as_json(results: list[dict]) -> list[dict]:
    from dataclasses import asdict

    out = []
    for r in results:
        c = r["cost"]
        times = {name: [asdict(s) for s in c[name]]
                 for name in ("locked", "dni", "locked_turns", "dni_turns") if name in c}
        out.append({**r, "cost": {**times, "link": asdict(c["link"]), "link_raw": c["link_raw"],
                                  "shares": c["shares"]},
                    "curves": curves(r)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fcn,cnn,mlp")
    ap.add_argument("--fcn-steps", type=int, default=1000)
    ap.add_argument("--cnn-steps", type=int, default=30)
    ap.add_argument("--mlp-steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--max-inflight", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=4, help="M of the GPipe and 1F1B rows")
    ap.add_argument("--dni", default="every_layer,cdni",
                    help="every_layer (DNI) and/or cdni (linear synthesizers)")
    ap.add_argument("--synthesizer-layers", type=int, default=None,
                    help="hidden layers of every synthesizer (0: linear for the FCN); "
                         "default: the preset's (2)")
    ap.add_argument("--repeats", type=int, default=20, help="timings per stage part (median)")
    ap.add_argument("--figure", default="experiments/fig_pipeline_cost.png",
                    help="the speed-up figure ('' for none)")
    ap.add_argument("--json", default="", help="write every number here too")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    print(f"pipeline benchmark: {cores} cores")
    results = []
    with tempfile.TemporaryDirectory(prefix="sgrun-bench-") as tmp:
        for name in a.models.split(","):
            if name not in MODELS:
                raise SystemExit(f"--models {name}: choose from {', '.join(MODELS)}")
            for stages in (int(s) for s in a.stages.split(",")):
                if stages > cores:
                    print(f"{name.upper()}: S = {stages} skipped ({cores} cores)\n")
                    continue
                if stages > MAX_STAGES[name]:
                    print(f"{name.upper()}: S = {stages} skipped (at most {MAX_STAGES[name]} "
                          "stages)\n")
                    continue
                steps = {"fcn": a.fcn_steps, "cnn": a.cnn_steps, "mlp": a.mlp_steps}[name]
                for dni in a.dni.split(","):
                    if dni not in METHODS:
                        raise SystemExit(f"--dni {dni}: choose from {', '.join(METHODS)}")
                    if dni not in ONLY_DNI.get(name, METHODS):
                        print(f"{name.upper()}: dni={dni} skipped (this model runs "
                              f"{', '.join(ONLY_DNI[name])})\n")
                        continue
                    layers = None if name in ONLY_DNI else a.synthesizer_layers
                    results.append(bench_model(name, steps, a.batch, stages, a.max_inflight,
                                               cores, Path(tmp), dni, layers, a.microbatches,
                                               a.repeats))
    if a.figure and results:
        figure(results, Path(a.figure))
    if a.json:
        Path(a.json).write_text(json.dumps(as_json(results), indent=1))


if __name__ == "__main__":
    main()
