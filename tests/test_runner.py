"""The runner end to end, in process: presets compose, every model x dni trains, logs and learns."""

import json

import pytest
import torch
from configs import PRESETS, make_cfg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sgrun.build import placement_of
from sgrun.train import run

FAST = ["data=synthetic", "device=cpu"]
FF_PRESETS = [p for p in PRESETS if p.startswith(("mnist", "cifar10", "demo"))]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("profile", ["paper", "cpu", "smoke"])
def test_every_preset_composes(preset, profile):
    cfg = make_cfg(f"experiment={preset}", f"profile={profile}")
    assert cfg.name == preset
    assert cfg.profile.name == profile


def test_presets_carry_paper_settings():
    cfg = make_cfg("experiment=mnist_fcn")
    assert cfg.optim.lr == 3e-5 and cfg.train.batch_size == 256 and cfg.train.steps == 500_000
    assert list(cfg.optim.decay_at) == [0.6, 0.8] and cfg.optim.gamma == 0.1
    assert cfg.dni.synthesizer.hidden == 1024 and cfg.dni.synthesizer.layers == 2


def test_dni_choice_builds_the_papers_synthesizers():
    assert placement_of(make_cfg("dni=none").dni) is None
    cdni = placement_of(make_cfg("dni=cdni", "model=fcn").dni)
    assert cdni.conditioned and cdni.synthesizer.kind == "linear"
    assert placement_of(make_cfg("dni=every_layer", "model=fcn").dni).synthesizer.kind == "mlp"
    assert placement_of(make_cfg("dni=every_layer", "model=cnn").dni).synthesizer.kind == "conv"
    assert placement_of(make_cfg("dni=cdni", "model=cnn").dni).synthesizer.kind == "conv"


def tags_of(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.parametrize("model", ["fcn", "cnn"])
@pytest.mark.parametrize("dni", ["none", "every_layer", "cdni"])
def test_every_model_and_dni_runs_under_smoke(tmp_path, model, dni):
    cfg = make_cfg(*FAST, f"model={model}", f"dni={dni}", "profile=smoke", "model.layers=3",
                   "train.log_every=2", "train.eval_every=2",
                   *(["model.channels=4", "dni.synthesizer.hidden=4"] if model == "cnn" else []))
    metrics = run(cfg, tmp_path)
    assert metrics["steps"] == 4 and 0 <= metrics["test_error"] <= 100
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["config"]["dni"]["name"] == cfg.dni.name
    tags = tags_of(tmp_path)
    assert {"loss/train", "error/test"} <= tags
    if dni != "none":
        assert {"dni/h1/sg_loss", "dni/h1/cosine", "dni/h2/sg_loss", "dni/h2/cosine"} <= tags


@pytest.mark.parametrize("preset", FF_PRESETS)
def test_feedforward_presets_run_under_smoke(tmp_path, preset):
    cfg = make_cfg(f"experiment={preset}", "profile=smoke", *FAST, "dni.synthesizer.hidden=8",
                   *(["model.channels=4"] if "cnn" in preset else []))
    assert run(cfg, tmp_path)["steps"] == 4


LEARN = [*FAST, "model.layers=3", "train.steps=400", "train.batch_size=64", "optim.lr=1e-3",
         "train.eval_every=400", "train.log_every=400", "dni.synthesizer.hidden=256"]


@pytest.mark.parametrize("dni", ["every_layer", "cdni"])
def test_dni_learns_a_generated_task(tmp_path, dni):
    """Chance is 90 % error, and training only the output layer (next test) stays above 50 %:
    DNI and cDNI must get the hidden layers learning, below 30 %."""
    assert run(make_cfg(*LEARN, f"dni={dni}"), tmp_path)["test_error"] < 30.0


def test_without_synthetic_gradients_the_hidden_layers_do_not_learn(tmp_path):
    """The control for the test above: scale 0 injects nothing, only the output layer learns."""
    assert run(make_cfg(*LEARN, "dni=every_layer", "dni.scale=0"), tmp_path)["test_error"] > 50.0


def test_rerun_of_a_finished_run_returns_it_and_a_different_one_is_refused(tmp_path):
    from sgrun.errors import SgrunError

    cfg = make_cfg(*FAST, "profile=smoke")
    first = run(cfg, tmp_path)
    before = (tmp_path / "summary.json").read_bytes()
    assert run(cfg, tmp_path)["test_error"] == first["test_error"]
    with pytest.raises(SgrunError, match="different finished run"):
        run(make_cfg(*FAST, "profile=smoke", "seed=3"), tmp_path)
    assert (tmp_path / "summary.json").read_bytes() == before


def test_same_seed_same_metrics(tmp_path):
    a = run(make_cfg(*FAST, "profile=smoke", "dni=every_layer"), tmp_path / "a")
    b = run(make_cfg(*FAST, "profile=smoke", "dni=every_layer"), tmp_path / "b")
    assert a["history"] == b["history"]


def test_update_prob_zero_freezes_and_one_is_the_ordinary_run(tmp_path):
    from sgrun.train import skip_updates

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 3)
    layer(torch.randn(2, 3)).sum().backward()
    skip_updates([[layer]], 0.0, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in layer.parameters())
    layer(torch.randn(2, 3)).sum().backward()
    skip_updates([[layer]], 1.0, torch.Generator().manual_seed(0))
    assert all(p.grad is not None for p in layer.parameters())
