"""Two LSTMs at two timescales (Jaderberg et al. 2017, sec. 3.2), coupled through a message.

Network **A** reads one input per step.  Network **B** ticks once every ``T`` steps, at the steps
``t`` with ``(t + 1) % T == 0``; its input at a tick is A's *message*: A's hidden state ``h_A`` at
that step (the LSTM output, ``[B, H_A]``).  B's input weights are therefore its read-out of the
message, and they learn in every coupling, so B always gets the most out of whatever A's state
holds.

How B's gradient reaches A is the ``coupling``:

* ``none``: the message is detached; A learns from its own loss only.
* ``dni``: the message crosses a :class:`~sgrun.dni.BackwardInterface` (sec. 3.2: "the gradient from
  B back into A's message crosses a DNI").  A receives the synthesizer's prediction ``M(h_A)`` of
  B's gradient the moment it has sent the message, so it never waits for B; the synthesizer
  regresses on the gradient that B's backward pass delivers later.
* ``bptt``: the message is passed as it is: B's true gradient flows into A (the locked baseline).

Truncation.  A's state is detached at every tick: A is trained with truncated BPTT over blocks of
``T`` steps, each block ending at one of B's ticks, so the gradient that arrives at a message
reaches
exactly the ``T`` steps that message summarises.  B's truncation is the caller's choice:
:meth:`forward` runs any whole number of ticks as one graph for B (the caller detaches B's state
between calls).

A's readout and the message are taken at the ticks only: A is asked for its count once per block.
With ``clock`` A also sees the phase ``t mod T`` one-hot: the blocks are defined by a global clock
that the digit stream itself does not show.  A call must start at a block boundary (global step a
multiple of ``T``) and cover whole blocks.

States travel as flat tensors ``[B, 2H]`` (``[h, c]``) as in :mod:`sgrun.models.rnn`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sgrun.dni import BackwardInterface, Placement, build_interfaces
from sgrun.errors import ConfigError

CUT = "message"  # the one cut of the two-timescale model: A's message to B
COUPLINGS = ("none", "dni", "bptt")


@dataclass
class TwoTimescaleOutput:
    """What one call (``n`` ticks, ``n * T`` steps) produces.

    Attributes:
        logits_a: ``[n, B, classes_a]`` A's count of odd digits, read at each tick.
        logits_b: ``[n, B, classes_b]`` B's count of 3s, one per tick.
        message: ``[n, B, H_A]`` A's messages as A produced them (before the coupling).
        state_a: ``[B, 2H_A]`` A's state after the last step.
        state_b: ``[B, 2H_B]`` B's state after the last tick (gradients flow into it).
    """

    logits_a: Tensor
    logits_b: Tensor
    message: Tensor
    state_a: Tensor
    state_b: Tensor


def _lstm(lstm: nn.LSTM, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``lstm`` over ``x`` ``[k, B, in]`` from the flat state ``[B, 2H]``; outputs ``[k, B, H]``
    and the flat end state."""
    h, c = state.chunk(2, dim=1)  # [B, H] each
    # [1, B, H]
    out, (h_k, c_k) = lstm(x, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
    return out, torch.cat([h_k[0], c_k[0]], dim=1)


class HierarchicalRNN(nn.Module):
    """Network A (an LSTM ticking every step) and network B (an LSTM ticking every ``T`` steps on
    A's messages), each with a linear read-out at B's ticks.

    Args:
        input_size: features of one step of the stream (10 for one-hot digits, 784 for MNIST
            images).
        T: B's timescale: B ticks, and A answers, every ``T`` steps.
        classes_a: A's output classes (counts ``0 .. T``: ``T + 1``).
        classes_b: B's output classes (counts ``0 .. T*T``: ``T*T + 1``).
        hidden_a, hidden_b: LSTM units of A and B; the message has ``hidden_a`` features.
        coupling: ``none``, ``dni`` or ``bptt`` (see the module docstring).
        clock: A also reads the phase ``t mod T`` one-hot.
        placement: the backward interface at the cut ``"message"`` (synthesizer, scale, mode);
            required for ``coupling="dni"`` and unused otherwise.

    Attributes: ``interface`` (the :class:`~sgrun.dni.BackwardInterface`, ``None`` unless ``dni``).
    """

    cut_names = (CUT,)

    def __init__(self, input_size: int, T: int, classes_a: int, classes_b: int, hidden_a: int = 64,
                 hidden_b: int = 64, coupling: str = "dni", clock: bool = True,
                 placement: Placement | None = None) -> None:
        super().__init__()
        for name, value, fix in (("T", T, "set model.T=3"),
                                 ("hidden_a", hidden_a, "set model.hidden_a=64"),
                                 ("hidden_b", hidden_b, "set model.hidden_b=64"),
                                 ("input_size", input_size, "check the task"),
                                 ("classes_a", classes_a, "check the task"),
                                 ("classes_b", classes_b, "check the task")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 (got {value!r}): {fix}")
        if coupling not in COUPLINGS:
            raise ConfigError(f"coupling must be one of {', '.join(COUPLINGS)} (got {coupling!r}): "
                              "set model.coupling=dni")
        self.input_size, self.T, self.coupling, self.clock = input_size, T, coupling, bool(clock)
        self.hidden_a, self.hidden_b = hidden_a, hidden_b
        self.lstm_a = nn.LSTM(input_size + (T if self.clock else 0), hidden_a)
        self.head_a = nn.Linear(hidden_a, classes_a)
        self.lstm_b = nn.LSTM(hidden_a, hidden_b)
        self.head_b = nn.Linear(hidden_b, classes_b)

        self.interface: BackwardInterface | None = None
        if coupling == "dni":
            if placement is None:
                raise ConfigError("model.coupling=dni needs a synthesizer at the message: use "
                                  "dni=message (or model.coupling=none|bptt)")
            if placement.conditioned:
                raise ConfigError("the message synthesizer has no label to condition on (cDNI): "
                                  "set dni.conditioned=false or use dni=message")
            if placement.synthetic_input is not None:
                raise ConfigError("synthetic inputs are not defined for the two-timescale model: "
                                  "use dni=message")
            # Jaderberg et al. 2017, sec. 3.2: a DNI between A's message and B.  The synthesizer
            # maps one message [H_A] to the gradient of B's losses w.r.t. it; its last layer starts
            # at zero, so training starts as coupling=none.
            self.interface = build_interfaces(placement, {CUT: (hidden_a,)})[CUT]

    def initial_state(self, batch_size: int,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Zero states ``([B, 2H_A], [B, 2H_B])`` every stream starts from."""
        return (torch.zeros(batch_size, 2 * self.hidden_a, device=device),
                torch.zeros(batch_size, 2 * self.hidden_b, device=device))

    def a_parameters(self) -> list[nn.Parameter]:
        """Network A: its LSTM and read-out."""
        return [*self.lstm_a.parameters(), *self.head_a.parameters()]

    def b_parameters(self) -> list[nn.Parameter]:
        """Network B: its LSTM (whose input weights read the message) and read-out."""
        return [*self.lstm_b.parameters(), *self.head_b.parameters()]

    def synthesizer_parameters(self) -> list[nn.Parameter]:
        return [] if self.interface is None else list(self.interface.parameters())

    def couple(self, message: Tensor) -> Tensor:
        """The message ``[n, B, H_A]`` as B receives it: what crosses back to A is the coupling."""
        if self.coupling == "none":
            return message.detach()
        if self.coupling == "bptt":
            return message
        # One interface call for all n ticks: a row is one message.  The synthesizer predicts, per
        # message, the gradient of the sum of B's per-tick losses (see sgrun.dni.interface,
        # "Units").
        return self.interface(message.flatten(0, 1)).view_as(message)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> TwoTimescaleOutput:
        """Run ``n = k / T`` ticks: ``x`` is ``[k, B, input_size]`` starting at a block boundary,
        ``state`` is ``(state_a [B, 2H_A], state_b [B, 2H_B])``."""
        k, batch = x.shape[0], x.shape[1]
        T = self.T
        if k % T:
            raise ValueError(f"the model reads whole blocks of T={T} steps (got {k} steps)")
        if self.clock:
            # [k, T]
            phase = nn.functional.one_hot(torch.arange(k, device=x.device) % T, T).to(x.dtype)
            x = torch.cat([x, phase.unsqueeze(1).expand(k, batch, T)], dim=2)  # [k, B, in + T]
        state_a, state_b = state
        messages = []
        for block in x.split(T):  # [T, B, in]: one of A's blocks, ending at one of B's ticks
            # Truncated BPTT for A over blocks of T steps: no gradient crosses a block boundary.
            out, state_a = _lstm(self.lstm_a, block, state_a.detach())  # out [T, B, H_A]
            messages.append(out[-1])  # [B, H_A] h_A at the tick
        message = torch.stack(messages)  # [n, B, H_A]
        out_b, state_b = _lstm(self.lstm_b, self.couple(message), state_b)  # [n, B, H_B]
        return TwoTimescaleOutput(logits_a=self.head_a(message), logits_b=self.head_b(out_b),
                                  message=message, state_a=state_a, state_b=state_b)
