"""Every model family, the DNI library, checkpoints and determinism on one device: the one named by
``SGRUN_TEST_DEVICE`` (``cpu`` when unset).  ``make gpu-check`` runs this subset with
``SGRUN_TEST_DEVICE=cuda`` (``pytest -m device``); on a machine without CUDA the suite runs it on
the CPU like every other test."""

import os
import signal

import pytest
import torch
from configs import make_cfg
from test_library import BLOCKS, run_block
from test_resume import assert_same_run

from sgrun import checkpoint as ck
from sgrun import train
from sgrun.checkpoint import Interrupted

DEVICE = os.environ.get("SGRUN_TEST_DEVICE", "cpu")

pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason=f"SGRUN_TEST_DEVICE={DEVICE} but torch sees no CUDA device"),
]

SMALL = [f"device={DEVICE}", "profile=smoke", "train.steps=12", "train.log_every=4",
         "train.eval_every=6"]

FAMILIES = {
    "fcn_dni": ["model=fcn", "data=synthetic", "dni=every_layer"],
    "fcn_cdni": ["model=fcn", "data=synthetic", "dni=cdni"],
    "fcn_complete_unlock": ["model=fcn", "data=synthetic", "dni=complete_unlock_cdni"],
    "fcn_update_prob": ["model=fcn", "data=synthetic", "dni=cdni", "train.update_prob=0.5"],
    "cnn_dni": ["model=cnn", "data=synthetic", "dni=every_layer"],
    "cnn_cdni": ["model=cnn", "data=synthetic", "dni=cdni"],
    "rnn_copy_dni_aux": ["model=rnn", "data=copy", "dni=every_k_aux"],
    "rnn_repeat_copy_bptt": ["model=rnn", "data=repeat_copy", "dni=none"],
    "hrnn_dni": ["model=hrnn"],
}


def on_device(monkeypatch) -> list[set[str]]:
    """The device types of the model's parameters as ``fit`` receives each task (one set per
    run)."""
    seen = []
    real_fit = train.fit

    def recording_fit(task, cfg, session):
        seen.append({p.device.type for p in task.model.parameters()})
        return real_fit(task, cfg, session)

    monkeypatch.setattr(train, "fit", recording_fit)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_on_the_device(tmp_path, monkeypatch, family):
    seen = on_device(monkeypatch)
    metrics = train.run(make_cfg(*FAMILIES[family], *SMALL), tmp_path)
    assert seen == [{torch.device(DEVICE).type}]
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in metrics.items()
               if isinstance(v, (int, float)))
    # the saved model loads on any machine, one without this device too
    saved = torch.load(tmp_path / train.MODEL)
    assert saved and all(t.device.type == "cpu" for t in saved.values())


@pytest.mark.parametrize("family", ["fcn_dni", "cnn_cdni", "rnn_copy_dni_aux", "hrnn_dni"])
def test_deterministic_runs_repeat_bit_for_bit_on_the_device(tmp_path, family):
    args = [*FAMILIES[family], *SMALL, "deterministic=true"]
    for name in ("a", "b"):
        train.run(make_cfg(*args), tmp_path / name)
    assert_same_run(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("family", ["fcn_dni", "cnn_cdni", "rnn_copy_dni_aux", "hrnn_dni"])
def test_a_resumed_run_on_the_device_is_the_uninterrupted_one(tmp_path, monkeypatch, family):
    args = [*FAMILIES[family], *SMALL, "deterministic=true", "checkpoint.every=4"]
    train.run(make_cfg(*args), tmp_path / "whole")
    real_step_done = ck.Checkpointer.step_done

    def stop_at_seven(self, step, total, state_fn):
        if step == 7:
            self.stop_signal = signal.SIGTERM  # as the signal's handler would
        return real_step_done(self, step, total, state_fn)

    monkeypatch.setattr(ck.Checkpointer, "step_done", stop_at_seven)
    with pytest.raises(Interrupted):
        train.run(make_cfg(*args), tmp_path / "parts")
    monkeypatch.setattr(ck.Checkpointer, "step_done", real_step_done)
    train.run(make_cfg(*args), tmp_path / "parts")
    assert_same_run(tmp_path / "whole", tmp_path / "parts")


@pytest.mark.parametrize("name", [k for k in BLOCKS if not k.startswith("misuse")])
def test_the_library_pages_examples_on_the_device(name, capsys):
    """Each example of docs/library.md, its tensors and modules made on the device."""
    with torch.device(DEVICE):
        run_block(BLOCKS[name])
    assert capsys.readouterr().out
