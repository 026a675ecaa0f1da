"""Compose the real configs with the compose API, as the command line would."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from sgrun.cli import CONF_DIR

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))
