"""``make bench``: training throughput of Bprop, DNI and cDNI (steps per second), printed as a \
table.

Run: ``python -m sgrun.bench [--steps N] [--batch 256] [--layers 3] [--threads T]``.  Random data of
MNIST's shape; times only the training step (forward, backward, Adam), after a warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from sgrun.dni import Placement, SynthesizerSpec
from sgrun.models.feedforward import FCN

VARIANTS = {
    "Bprop": None,
    "DNI": Placement(("all",), SynthesizerSpec("mlp", hidden=1024, layers=2)),
    "cDNI": Placement(("all",), SynthesizerSpec("linear"), conditioned=True),
}


def steps_per_second(placement, layers: int, batch: int, steps: int, warmup: int = 20,
                     device: str = "cpu") -> float:
    torch.manual_seed(0)
    model = FCN((1, 28, 28), 10, layers=layers, placement=placement).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    ctx = (nn.functional.one_hot(y, 10).float() if placement is not None and placement.conditioned
           else None)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x, ctx), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    torch.set_flush_denormal(True)  # as in training: denormals make CPU DNI steps ~10x slower
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"FCN {a.layers} layers, batch {a.batch}, {a.steps} timed steps, "
          f"{torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {a.device}")
    rates = {name: steps_per_second(p, a.layers, a.batch, a.steps, device=a.device)
             for name, p in VARIANTS.items()}
    print(f"{'method':<8}{'steps/s':>10}{'samples/s':>12}{'/ Bprop':>9}")
    for name, r in rates.items():
        print(f"{name:<8}{r:>10.1f}{r * a.batch:>12.0f}{r / rates['Bprop']:>9.2f}")
    print(f"DNI/Bprop ratio: {rates['DNI'] / rates['Bprop']:.2f}")


if __name__ == "__main__":
    main()
