"""The table a sweep (``sgrun -m``) ends with: each job's folder, the choices that vary, its
headline result and whether it finished, failed or did not finish.

A sweep's jobs may run in this process (the basic launcher), in joblib's worker processes or on a
cluster, so nothing is collected in memory: every job writes a small record into its own folder
(:func:`record_job`, from Hydra's ``on_job_start`` in whichever process runs it), tagged with the
sweep's token, and the process that launched the sweep reads the records of its own token back
(:func:`sweep_jobs`).  An earlier sweep's jobs in the same folder carry another token and are
left out.  The results come from each folder's ``summary.json`` and ``FAILED``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "SGRUN_SWEEP"  # the token of the sweep being run, inherited by every job's process
RECORD = ".sgrun_job.json"
SUMMARY = "summary.json"
FAILED = "FAILED"


def new_token() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


def record_job(output_dir: str | Path, num: int, overrides: list[str]) -> None:
    """Called in the job's own process before it runs: its folder, number and overrides."""
    token = os.environ.get(ENV)
    if not token:
        return  # not started by sgrun's sweep callback
    _write_record(Path(output_dir), {"sweep": token, "num": int(num),
                                     "overrides": list(overrides)})


def record_busy(output_dir: str | Path, holder: str) -> None:
    """A job that found its folder held by another process failed without writing ``FAILED``
    there (the folder's own run is still going): its error goes in its record for the sweep's
    table and exit status."""
    path = Path(output_dir) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and record.get("sweep") == os.environ.get(ENV):
        _write_record(Path(output_dir), {**record, "busy": holder})


def _write_record(folder: Path, record: dict) -> None:
    path = folder / RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


@dataclass
class Job:
    folder: Path
    num: int
    overrides: dict[str, str] = field(default_factory=dict)
    status: str = "unfinished"  # finished | failed | unfinished
    result: str = ""


def sweep_jobs(sweep_dir: str | Path, token: str) -> list[Job]:
    """The jobs of sweep ``token`` under ``sweep_dir``, by job number, with their results."""
    jobs = []
    for path in Path(sweep_dir).rglob(RECORD):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("sweep") != token:
            continue
        overrides = parse_overrides(record.get("overrides", []))
        job = Job(path.parent, int(record.get("num", -1)), overrides)
        if record.get("busy"):  # this sweep's job did not run there: the folder was in use
            job.status, job.result = "failed", first_line(f"in use by {record['busy']}")
        else:
            job.status, job.result = outcome(job.folder)
        jobs.append(job)
    return sorted(jobs, key=lambda j: (j.num, str(j.folder)))


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    parsed = {}
    for override in overrides:
        key, _, value = override.partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def outcome(folder: Path) -> tuple[str, str]:
    """(status, result): the headline of a finished run, the error of a failed one."""
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and summary.get("status") == "finished":
        return "finished", headline(summary)
    failed = folder / FAILED
    if failed.is_file():
        return "failed", first_line(failed.read_text(errors="replace"))
    return "unfinished", "-"


def headline(summary: dict) -> str:
    from sgrun.tasks import TASKS

    family = ((summary.get("config") or {}).get("model") or {}).get("family")
    task = TASKS.get(family)
    try:
        return task.headline(summary["metrics"]) if task else "-"
    except (KeyError, TypeError, ValueError):
        return "-"


def first_line(text: str, width: int = 80, empty: str = "-") -> str:
    """The error of a FAILED file in one line: a traceback's last line, else the first, cut to
    ``width``; ``empty`` when there is no text."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return empty
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= width else line[: width - 3] + "..."


def varying(jobs: list[Job]) -> list[str]:
    """The override keys whose value is not the same in every job, in command-line order."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def table(jobs: list[Job], sweep_dir: str | Path) -> str:
    """The sweep's jobs, one line each, under a header line."""
    keys = varying(jobs)
    header = ["job folder", *keys, "result", "status"]
    rows = [[_relative(job.folder, Path(sweep_dir)), *(job.overrides.get(k, "-") for k in keys),
             job.result, job.status] for job in jobs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    counts = {s: sum(job.status == s for job in jobs) for s in ("finished", "failed", "unfinished")}
    said = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [f"sgrun: the sweep's {len(jobs)} job(s) in {sweep_dir}: {said}"]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _relative(folder: Path, sweep_dir: Path) -> str:
    try:
        return str(folder.resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        return str(folder)
