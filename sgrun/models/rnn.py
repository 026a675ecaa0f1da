"""The recurrent model of the paper's sec. 3.1: an LSTM core read one block of ``k`` steps at a
time.

Jaderberg et al. 2017, sec. 3.1 treat an RNN as infinitely unrolled and train it with truncated
BPTT over blocks of ``k`` steps.  The LSTM state ``[h, c]`` crosses every block boundary, so it is
also where the backward interface sits: a synthesizer ``M`` maps the block-end state to a
prediction of the gradient of all future losses w.r.t. that state.  The training step that
injects and regresses it lives in :mod:`sgrun.dni.recurrent`; this module only holds the networks.

The state travels between blocks as one flat tensor ``s = [h, c]`` of shape ``[B, 2H]``, so that a
synthesizer for flat vectors (:class:`~sgrun.dni.LinearSynthesizer`,
:class:`~sgrun.dni.MLPSynthesizer`) predicts the gradient w.r.t. both halves at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sgrun.dni import GradientSynthesizer, Placement, build_synthesizer
from sgrun.errors import ConfigError

CUT = "state"  # the one cut of a recurrent net: the LSTM state at a block boundary


@dataclass
class BlockOutput:
    """What one block of ``k`` steps produces.

    Attributes:
        logits: ``[k, B, output_size]``, one read-out per step.
        state: ``[B, 2H]``, the state ``[h_k, c_k]`` after the block's last step (also the input of
            the DNI + Aux head).
    """

    logits: Tensor
    state: Tensor


class RecurrentNet(nn.Module):
    """A one-layer LSTM core with a linear read-out, and optionally a DNI at the state.

    Args:
        input_size: input features per step (the vocabulary size when ``token_input``).
        output_size: read-out units per step.
        hidden: LSTM units ``H`` (Jaderberg et al. 2017, sec. 3.1: 256 for the copy tasks, 1024 for
            Penn Treebank [recalled]).
        token_input: inputs are int64 symbol ids ``[k, B]``, fed to the LSTM one-hot.
        forget_bias: initial bias of the forget gate (``None``: PyTorch's default initialisation).
            1.0, the default of the TensorFlow / Sonnet LSTMs, starts the cells remembering.
        placement: where the backward interface goes; its only cut is ``"state"`` (``("all",)``
            means the same).  ``None`` (or mode ``off``) is plain truncated BPTT.
        aux: add the DNI + Aux head ``A``, a linear map of the block-end state ``s_k`` that predicts
            the synthetic gradient of the end of the *next* block, ``M(s_2k)``, ``k`` steps later
            (sec. 3.1, "DNI + Aux"; the target is built in
            :func:`sgrun.dni.recurrent.truncated_step`).

    Attributes: ``synthesizer`` (``None`` without DNI), ``scale`` and ``mode`` of the interface,
    ``aux_head`` (``None`` without aux), ``state_size`` (``2H``).
    """

    cut_names = (CUT,)

    def __init__(self, input_size: int, output_size: int, hidden: int = 256,
                 token_input: bool = False,
                 placement: Placement | None = None, aux: bool = False,
                 forget_bias: float | None = 1.0) -> None:
        super().__init__()
        for name, value, fix in (("input_size", input_size, "check the task"),
                                 ("output_size", output_size, "check the task"),
                                 ("LSTM size", hidden, "set model.hidden=256")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 (got {value!r}): {fix}")
        self.input_size, self.output_size, self.hidden = input_size, output_size, hidden
        self.token_input = bool(token_input)
        self.state_size = 2 * hidden
        self.lstm = nn.LSTM(input_size, hidden)
        if forget_bias is not None:
            with torch.no_grad():  # gate order in nn.LSTM: input, forget, cell, output
                self.lstm.bias_ih_l0[hidden:2 * hidden].fill_(float(forget_bias))
                self.lstm.bias_hh_l0[hidden:2 * hidden].zero_()
        self.head = nn.Linear(hidden, output_size)

        self.synthesizer: GradientSynthesizer | None = None
        self.scale, self.mode, self.bootstrap_scale = 0.0, "off", None
        if placement is not None and placement.mode != "off":
            if placement.conditioned:
                raise ConfigError("a recurrent net has no label to condition its synthesizer on "
                                  "(cDNI): use dni=every_k or dni=every_k_aux")
            placement.resolve(self.cut_names)  # a cut other than "state" is a ConfigError naming it
            # Jaderberg et al. 2017, sec. 3.1: M(s) predicts dL_future/ds for the whole state
            # [h, c]; its last layer starts at zero, so training starts as plain truncated BPTT.
            self.synthesizer = build_synthesizer(placement.synthesizer, (self.state_size,))
            self.scale, self.mode = float(placement.scale), placement.mode
            self.bootstrap_scale = placement.bootstrap_scale
        self.aux_head: nn.Linear | None = None
        if aux:
            if self.synthesizer is None:
                raise ConfigError("DNI + Aux predicts the synthesizer's output, so it needs a "
                                  "synthesizer: use dni=every_k_aux (or set dni.aux_weight=0)")
            self.aux_head = nn.Linear(self.state_size, self.state_size)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """The zero state ``[B, 2H]`` every stream starts from."""
        return torch.zeros(batch_size, self.state_size, device=device)

    def core_parameters(self) -> list[nn.Parameter]:
        """Parameters of the core, read-out and aux head: everything but the synthesizer."""
        synth = ({id(p) for p in self.synthesizer.parameters()} if self.synthesizer is not None
                 else set())
        return [p for p in self.parameters() if id(p) not in synth]

    def forward(self, x: Tensor, state: Tensor) -> BlockOutput:
        """Run one block: ``x`` is ``[k, B, input_size]`` (ids ``[k, B]`` with ``token_input``),
        ``state`` is ``[B, 2H]``.  Gradients flow into ``state``; detaching it is the caller's
        job."""
        if self.token_input:
            x = nn.functional.one_hot(x, self.input_size).to(state.dtype)  # [k, B, V]
        h, c = state.chunk(2, dim=1)  # [B, H] each
        # [1, B, H]: nn.LSTM's layout
        hc = (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous())
        out, hc = self.lstm(x, hc)  # [k, B, H]
        state_k = torch.cat([hc[0][0], hc[1][0]], dim=1)  # [B, 2H]
        return BlockOutput(logits=self.head(out), state=state_k)
