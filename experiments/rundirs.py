"""The runs on disk, as the report and the reproduction script see them.

A run is one job folder of a multirun, ``<runs>/<profile>/<preset>/<job>/``, as ``sgrun -m`` leaves
it:

* ``summary.json``: written at the end of a finished run (status, metrics, choices, resolved
  config);
* ``FAILED``: written instead when the job failed (the error message);
* ``.hydra/``: Hydra's record of the job (the config and the chosen config files), written first,
  so a failed or unfinished run still says which table cell it belongs to;
* ``tb/``: the TensorBoard event files, read here with TensorBoard's own ``EventAccumulator``.

Run folders hold checkpoints, models and event files: too large to keep in the repository, and lost
with the machine they ran on. The evidence archive keeps what the report reads of each finished
run, one JSON file per run, ``experiments/evidence/<profile>/<preset>/<job>.json``: the run's record
(choices, resolved config, metrics) and the TensorBoard curves the report draws or tests, exactly as
read from the events. ``make report`` archives the finished runs on disk, then reports on the runs
on disk and the archive together; a run on disk wins over its archived copy (see
:func:`load_runs`).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from sgrun import sweep
from sgrun.train import OPERATIONAL

SUMMARY = "summary.json"
ARCHIVE_FORMAT = 1  # the layout of an archived run's JSON file
FAILED = "FAILED"  # the name sgrun.cli writes
MISSING = object()  # a path that a run does not have (distinct from a value of None)


@dataclass
class Run:
    path: Path
    status: str  # finished | failed | unfinished
    # {"preset": ..., "choice": {...}, "choices": {...}, "config": {...}, "metrics": {...}}
    record: dict[str, Any] = field(repr=False)
    message: str = ""  # the FAILED text
    # the curves of an archived run (read from its JSON file, not from tb/); None for a run folder
    curves: dict[str, list[tuple[int, float]]] | None = field(default=None, repr=False)

    @property
    def archived(self) -> bool:
        return self.curves is not None

    def get(self, path: str) -> Any:
        """The value at ``path`` ("config.model.layers"), trying each of "a|b" in turn; MISSING if
        none."""
        for alternative in path.split("|"):
            node: Any = self.record
            for part in alternative.strip().split("."):
                if isinstance(node, dict) and part in node:
                    node = node[part]
                else:
                    node = MISSING
                    break
            if node is not MISSING:
                return node
        return MISSING

    def matches(self, match: dict[str, list] | None) -> bool:
        """True when every path of ``match`` holds one of its accepted values (null accepts a
        missing path)."""
        for path, accepted in (match or {}).items():
            value = self.get(path)
            if value is MISSING:
                if None not in accepted:
                    return False
            elif not any(same(value, a) for a in accepted):
                return False
        return True

    @cached_property
    def scalars(self) -> dict[str, list[tuple[int, float]]]:
        """Every scalar tag of the run's TensorBoard events: ``{tag: [(step, value), ...]}`` (of an
        archived run: the tags the archive kept)."""
        if self.curves is not None:
            return self.curves
        return read_scalars(self.path / "tb")

    @property
    def seed(self) -> Any:
        seed = self.get("config.seed")
        return None if seed is MISSING else seed


def same(value: Any, accepted: Any) -> bool:
    """Config values compared as a reader would: 1 == 1.0 == "1", but True is not 1."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted or str(value).lower() == str(accepted).lower()
    try:
        return math.isclose(float(value), float(accepted), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return str(value) == str(accepted)


def load_run(job: Path) -> Run | None:
    """The run in job folder ``job``, or None when the folder holds no run."""
    summary_path, failed_path, hydra_dir = job / SUMMARY, job / FAILED, job / ".hydra"
    if not (summary_path.exists() or failed_path.exists() or hydra_dir.is_dir()):
        return None
    record: dict[str, Any] = {"choice": {}, "choices": {}, "config": {}, "metrics": {}}
    hydra_yaml = _read_yaml(hydra_dir / "hydra.yaml")
    record["choice"] = dict(((hydra_yaml.get("hydra") or {}).get("runtime") or {})
                            .get("choices") or {})
    record["config"] = _read_yaml(hydra_dir / "config.yaml")
    status, message = "unfinished", ""
    summary = _read_json(summary_path)
    if summary.get("status") == "finished":
        # summary.json is written last and holds the resolved config: it wins over .hydra/
        status = "finished"
        record.update(config=summary.get("config") or record["config"],
                      choices=summary.get("choices") or {},
                      metrics=summary.get("metrics") or {})
    elif failed_path.exists():
        status, message = "failed", failed_path.read_text(errors="replace").strip()
    elif summary_path.exists():
        # cut short or corrupted: not finished (make reproduce trains it again), and said so
        message = f"{SUMMARY} is unreadable or incomplete: not counted as finished"
    if not record["choice"]:
        record["choice"] = dict(record["choices"])
    record["preset"] = (record["choice"].get("experiment") or record["choices"].get("experiment")
                        or record["config"].get("name") or job.parent.name)
    return Run(path=job, status=status, record=record, message=message)


def load_runs(root: str | Path, archive: str | Path | None = None) -> list[Run]:
    """Every run under ``root`` (``<runs>/<profile>``): its ``<preset>/<job>`` folders; with
    ``archive`` (``experiments/evidence/<profile>``), also every archived run.

    A job that is finished on disk is read from its folder; an archived job whose folder is missing,
    unfinished or failed is read from the archive (its finished result stands until a new run of
    that job finishes).
    """
    root = Path(root)
    runs = (load_run(job) for job in sorted(root.glob("*/*")) if job.is_dir()) \
        if root.is_dir() else []
    on_disk = {(run.path.parent.name, run.path.name): run for run in runs if run is not None}
    if archive is not None and Path(archive).is_dir():
        for path in sorted(Path(archive).glob("*/*.json")):
            key = (path.parent.name, path.stem)
            if key in on_disk and on_disk[key].status == "finished":
                continue
            on_disk[key] = load_archived(path)
    return counted_once([on_disk[key] for key in sorted(on_disk)])


def counted_once(runs: list[Run]) -> list[Run]:
    """A finished run whose config and choices (seed included; the operational keys such as
    ``data_dir`` left out, as for resuming) are those of another finished run of its preset is
    the same run twice, e.g. one job run by a narrowed sweep under another job number: it counts
    once (the run on disk before an archived copy); the others show as not counted, naming it."""
    kept: dict[tuple[str, str], Run] = {}
    for run in sorted(runs, key=lambda r: r.archived):  # runs on disk first
        if run.status != "finished":
            continue
        config = {k: v for k, v in (run.get("config") or {}).items() if k not in OPERATIONAL}
        key = (run.path.parent.name, json.dumps([config, run.get("choices")], sort_keys=True,
                                                default=str))
        if key not in kept:
            kept[key] = run
            continue
        run.status = "unfinished"
        run.message = (f"{run.path.name} is the same run as {kept[key].path.name} (same config "
                       "and seed): counted once")
    return runs


def archived_tags(reference: dict) -> list[str]:
    """The scalar tags the report reads (``tag`` anywhere in ``reference.yaml``: figures, their
    fallbacks, curve claims); "a|b" alternatives and "error/*" patterns as written."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "tag" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(reference)
    return sorted(set(found))


def archive_record(run: Run, tags: list[str]) -> dict[str, Any]:
    """What the archive keeps of finished ``run``: its record and the curves of ``tags``."""
    patterns = [alt.strip() for tag in tags for alt in tag.split("|")]
    curves = {tag: [[step, value] for step, value in points]
              for tag, points in sorted(run.scalars.items())
              if any(fnmatch.fnmatchcase(tag, pattern) for pattern in patterns)}
    return {"format": ARCHIVE_FORMAT, "status": run.status, "record": run.record,
            "curves": curves}


def load_archived(path: Path) -> Run:
    """The finished run archived in ``path``; an unfinished run saying why when the file is not
    one (so that the report names it instead of dropping it)."""
    data = _read_json(path)
    record = data.get("record")
    try:
        if (data.get("format") != ARCHIVE_FORMAT or data.get("status") != "finished"
                or not isinstance(record, dict) or not isinstance(record.get("metrics"), dict)):
            raise ValueError
        curves = {str(tag): [(int(step), float(value)) for step, value in points]
                  for tag, points in data["curves"].items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        empty = {"preset": path.parent.name, "choice": {}, "choices": {}, "config": {},
                 "metrics": {}}
        return Run(path=path, status="unfinished", record=empty, curves={},
                   message=f"archived run {path.name} is unreadable or not of format "
                           f"{ARCHIVE_FORMAT}: not counted")
    return Run(path=path, status="finished", record=record, curves=curves)


def dataset_missing(run: Run, pattern: str) -> bool:
    """A failed run whose error says that its dataset is not on this machine."""
    return run.status == "failed" and re.search(pattern, run.message) is not None


def first_line(text: str, width: int = 160) -> str:
    """The last line of a traceback, or the first line of a one-line error, shortened."""
    return sweep.first_line(text, width, empty="")


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the event files in ``tb_dir``, read as TensorBoard reads them
    (``EventAccumulator``).

    A run that was interrupted and ran again leaves several event files. Reading the folder as one
    stream, in file order, lets the accumulator drop what the later run replaced when the new writer
    starts with a purge step (a resumed run: the old events from that step on go). A run started
    again from scratch has no purge step; its steps go back instead, and the old events of a tag
    from that step on are dropped here (TensorBoard's own rule for files without a session log).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: _drop_replaced([(int(e.step), float(e.value)) for e in acc.Scalars(tag)])
            for tag in acc.Tags().get("scalars", [])}


def _drop_replaced(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Points in reading order; a step that goes back replaces the earlier points from that step
    on."""
    kept: list[tuple[int, float]] = []
    for step, value in points:
        while kept and kept[-1][0] >= step:
            kept.pop()
        kept.append((step, value))
    return kept


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
