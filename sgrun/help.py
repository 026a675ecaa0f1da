"""``sgrun --help``: the groups a user chooses from, read from ``conf/`` each time.

Hydra's help template (``conf/hydra/help/sgrun.yaml``) calls the ``sgrun.help_groups`` resolver,
registered by :mod:`sgrun.cli`; it lists every option file of each group below with the first
line of the file's header comment, so the list stays what ``conf/`` holds.  Groups that only
sgrun itself selects (``demo``, ``model_dni``, ``experiment_profile``, ``data/default``) are not
choices and are not listed.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

WIDTH = 100

# (group, what it chooses); the options are the group's files
GROUPS = (
    ("model", "the network: model=<name>, its sizes with model.<key>=<value>"),
    ("data", "the dataset (each model family has its own default and accepts only its kind)"),
    ("dni", "where and how synthetic gradients replace backprop (Bprop, DNI, cDNI, unlocks)"),
    ("optim", "the optimizer and its learning-rate schedule (optim.lr=...)"),
    ("runtime", "in one process, or one process per stage of the network"),
    ("experiment", "a paper preset: its groups, its budget and its sweep (run it with -m)"),
    ("profile", "a preset's budget: the paper's, CPU-sized, or a 4-step smoke run"),
    ("hydra/launcher", "where a sweep's jobs run (with -m)"),
)
# options that have no file in conf/: Hydra's own
BUILTIN = {"hydra/launcher": {
    "basic": "Hydra's default: the jobs one after the other in this process."}}


def option_files(conf: Path, group: str) -> list[str]:
    """The options of ``group``: its ``.yaml`` files (sub-folders are not options)."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def summary(path: Path) -> str:
    """The first line of a config file's header comment (``# @package`` apart): its one-line
    summary."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            return ""
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    return ""


def groups_text(conf: str | Path, chosen: dict[str, str | None] | None = None) -> str:
    """Every group a user chooses from, with each option and its summary; ``*`` marks ``chosen``."""
    conf, chosen = Path(conf), chosen or {}
    lines = []
    for group, what in GROUPS:
        options = dict(BUILTIN.get(group, {}))
        options.update((name, summary(conf / group / f"{name}.yaml"))
                       for name in option_files(conf, group))
        lines.append(f"{group}: {what}")
        width = max(len(name) for name in options)
        for name, text in options.items():
            mark = "*" if chosen.get(group) == name else " "
            lead = f"  {mark} {name.ljust(width)}  "
            indent = " " * len(lead)
            lines.append(textwrap.fill(text, WIDTH, initial_indent=lead, subsequent_indent=indent)
                         if text else lead.rstrip())
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def chosen_now(conf: str | Path, root) -> dict[str, str | None]:
    """The options a run would use now, by group, from the composed config (``--help`` composes it
    with the command line's overrides)."""
    from hydra.core.hydra_config import HydraConfig

    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    data = root.get("data") if root is not None else None
    if data is not None and data.get("name") is not None:
        choices["data"] = data.name  # the option "default/<family>" is the family's own dataset
    mapped = Path(conf) / "model_dni" / f"{choices.get('model_dni')}.yaml"
    # e.g. model=rnn turns the default dni=cdni into every_k
    if choices.get("model_dni") and mapped.is_file():
        found = re.search(r"/dni/(\w+)@_here_", mapped.read_text())
        if found:
            choices["dni"] = found.group(1)
    return choices
