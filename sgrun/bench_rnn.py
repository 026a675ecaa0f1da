"""Training throughput of truncated BPTT vs DNI on PTB-shaped data (characters per second), as a \
table.

Run: ``python -m sgrun.bench_rnn [--k 5] [--hidden 256] [--batch 128] [--steps 100] [--threads T]``.
Random symbol ids over PTB's 50-symbol vocabulary; times only the training step (one block of ``k``
steps: forward, backward with the injected synthetic gradient, synthesizer regression, for DNI + Aux
the look-ahead through the next block, Adam) after a warm-up, with the same
:func:`sgrun.dni.recurrent.truncated_step` the runner uses.
"""

from __future__ import annotations

import argparse
import time

import torch

from sgrun.dni import Placement, SynthesizerSpec
from sgrun.dni.recurrent import truncated_step
from sgrun.models.rnn import RecurrentNet
from sgrun.tasks.sequence import lm_step_loss

VOCAB = 50  # PTB characters: 49 symbols and the end of line

VARIANTS = {
    "BPTT": (None, 0.0),
    "DNI": (Placement(("state",), SynthesizerSpec("linear"), scale=0.1), 0.0),
    "DNI+Aux": (Placement(("state",), SynthesizerSpec("linear"), scale=0.1), 0.1),
}


def chars_per_second(placement, aux_weight: float, k: int, hidden: int, batch: int, steps: int,
                     warmup: int, device: str = "cpu") -> float:
    torch.manual_seed(0)
    model = RecurrentNet(VOCAB, VOCAB, hidden=hidden, token_input=True, placement=placement,
                         aux=aux_weight > 0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (warmup + steps + 1, k + 1, batch),
                        device=device)  # [blocks, k + 1, B]
    mask = torch.ones(k, batch, device=device)
    state = model.initial_state(batch, device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        # DNI + Aux: the next block's inputs
        x_next = ids[i + 1, :-1] if model.aux_head is not None else None
        state = truncated_step(model, ids[i, :-1], ids[i, 1:], mask, state, lm_step_loss,
                               aux_weight, x_next).state
        opt.step()
    _sync(device)
    return steps * k * batch / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5, help="truncation: steps per block")
    ap.add_argument("--hidden", type=int, default=256,
                    help="LSTM units (the paper's PTB net: 1024)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100, help="timed blocks per method")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args(argv)
    torch.set_flush_denormal(True)  # as in training
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"LSTM {a.hidden}, k={a.k}, batch {a.batch}, vocabulary {VOCAB}, {a.steps} timed blocks, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    rates = {name: chars_per_second(p, w, a.k, a.hidden, a.batch, a.steps, a.warmup, a.device)
             for name, (p, w) in VARIANTS.items()}
    print(f"{'method':<9}{'chars/s':>10}{'/ BPTT':>9}")
    for name, r in rates.items():
        print(f"{name:<9}{r:>10.0f}{r / rates['BPTT']:>9.2f}")
    print(f"DNI/BPTT ratio: {rates['DNI'] / rates['BPTT']:.2f}")


if __name__ == "__main__":
    main()
