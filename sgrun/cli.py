"""The ``sgrun`` command: the only ``@hydra.main``.

User mistakes (a wrong option, a bad value, a missing dataset, an unwritable folder) end with one
line on stderr and exit code 2; programming errors keep their traceback.  In a multirun a failing
job is recorded in its folder (``FAILED``) and the sweep goes on; the command then exits 1.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shlex
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sgrun import sweep, threads
from sgrun.checkpoint import Interrupted
from sgrun.errors import SgrunError, write_failure
from sgrun.locks import FolderBusy


def conf_dir() -> str:
    """The configs: ``sgrun/conf`` inside an installed wheel (the top-level ``conf/`` is mapped
    there by pyproject.toml), the top-level ``conf/`` of a source checkout or an editable install;
    absolute, so that the command finds them from any folder."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise SystemExit("sgrun: error: the configs (conf/config.yaml) are missing from this "
                     "installation: reinstall sgrun")


CONF_DIR = conf_dir()
FAILED = "FAILED"

log = logging.getLogger("sgrun")
_failures: list[str] = []


class SweepReport(Callback):
    """What a sweep needs around its jobs, with every launcher (each hook runs in the process Hydra
    runs it in: the launching one for the multirun hooks, the job's own for ``on_job_start``):

    * before the jobs start, the thread count ``runtime.threads: null`` means, in
      ``$SGRUN_THREADS`` for every job (:mod:`sgrun.threads`), so that the launcher does not
      change the numbers, and the sweep's token in ``$SGRUN_SWEEP``;
    * each job records itself in its folder (:mod:`sgrun.sweep`);
    * after the sweep, the table of its jobs (folder, the choices that vary, headline result,
      status), and the jobs that wrote a ``FAILED`` file for the exit status.
    """

    def __init__(self) -> None:
        self._token = ""
        self._environ: dict[str, str | None] = {}  # what the variables set here were before

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._token = sweep.new_token()
        self._environ = {name: os.environ.get(name) for name in (threads.ENV, sweep.ENV)}
        os.environ.setdefault(threads.ENV, str(threads.default_threads()))  # yours, if you set it
        os.environ[sweep.ENV] = self._token

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        hc = config.hydra
        if hc.mode == RunMode.MULTIRUN:
            sweep.record_job(hc.runtime.output_dir, hc.job.num, list(hc.overrides.task))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        for name, before in self._environ.items():
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before
        self._environ = {}
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep.sweep_jobs(sweep_dir, self._token)
        if not jobs:  # no records (jobs not started through this callback): every FAILED there
            _failures.extend(sorted(str(p.parent) for p in sweep_dir.glob(f"*/{FAILED}")))
            return
        print(sweep.table(jobs, sweep_dir), flush=True)
        _failures.extend(str(job.folder) for job in jobs if job.status == "failed")


ReportFailures = SweepReport  # the callback's earlier name


def _help_groups(*, _root_) -> str:
    from sgrun.help import chosen_now, groups_text

    # the text goes through Hydra's string.Template: a literal $ is $$
    return groups_text(CONF_DIR, chosen_now(CONF_DIR, _root_)).replace("$", "$$")


# sgrun --help lists the groups from conf/ (conf/hydra/help/sgrun.yaml)
OmegaConf.register_new_resolver("sgrun.help_groups", _help_groups, replace=True)
def _parallel_jobs(*, _root_) -> int:
    # runtime.threads of the composed config; absent where only the hydra node is (--cfg hydra)
    return threads.parallel_jobs(OmegaConf.select(_root_, "runtime.threads", default=None))


# the local launcher's n_jobs: as many jobs at once as fit on the cores (conf/hydra/launcher/)
OmegaConf.register_new_resolver("sgrun.parallel_jobs", _parallel_jobs, replace=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    # torch is imported after Hydra has parsed the command line
    from sgrun.build import check_family_dni, check_runtime_family
    from sgrun.tasks import TASKS
    from sgrun.train import run

    hc = HydraConfig.get()
    # a dataset's loader options are open (the loader names its valid ones); nothing else is
    added = [key for key in (o.split("=", 1)[0] for o in hc.overrides.task
                             if o.startswith("+") and o[1:2] != "+")
             if ".options." not in key and not key.startswith("+data.image_options.")]
    if added:
        key = added[0][1:]
        fail(f"sgrun reads no key {key!r} (a '+' adds a key that no part of sgrun uses): "
             + nearest_key(cfg, key) + "list the valid keys with: sgrun --cfg job")
    typed_dni = any(o.startswith("dni=") for o in hc.overrides.task)
    # a preset's own choice is right by construction
    if typed_dni:
        try:
            check_runtime_family(cfg.runtime.name, cfg.model.family, cfg.model.name)
            check_family_dni(cfg.model.family, cfg.model.name, hc.runtime.choices.get("dni"))
        except SgrunError as e:
            fail(str(e))
    out_dir = Path(hc.runtime.output_dir)
    run_dir = Path(cfg.resume) if cfg.get("resume") else out_dir  # where the run's results are
    multirun = hc.mode == RunMode.MULTIRUN
    (out_dir / FAILED).unlink(missing_ok=True)  # an earlier attempt's failure no longer holds
    try:
        metrics = run(cfg, out_dir)
    except Interrupted as e:
        # Ctrl-C / SIGTERM stops the whole sweep, after the checkpoint is saved
        if cfg.runtime.name == "pipeline":
            fail(str(e), code=130)  # it says that pipeline runs keep no checkpoint
        fail(f"{e}; "
             f"{continue_hint(run_dir, multirun, hc)}",
             code=130)
    except SgrunError as e:
        if not multirun:
            fail(str(e))  # exits here, before Hydra adds its own multi-line report
        if isinstance(e, FolderBusy):  # the folder's own run goes on: write nothing there
            sweep.record_busy(out_dir, e.holder)
        else:
            mark_failed(out_dir, str(e) + "\n")
        log.error("job %s failed: %s", hc.job.num, e)
        return None
    except Exception as e:
        if not multirun:
            raise
        # a failing job must not stop the sweep nor lose the finished jobs' results
        mark_failed(out_dir, traceback.format_exc())
        log.error("job %s failed: %s: %s", hc.job.num, type(e).__name__, e)
        return None
    if "rank" in metrics:  # a pipeline stage started by torchrun, other than rank 0
        print(f"sgrun: pipeline stage {metrics['rank']} finished; rank 0 writes the results")
        return None
    task = TASKS.get(cfg.model.family)
    value = metrics.get(task.primary if task else "test_error")
    # the groups as chosen (dni=every_layer, not its method "dni"), the data the family chose; a
    # dni= not typed is the family's own default (model=rnn maps the default dni=cdni to every_k)
    chosen = hc.runtime.choices
    what = cfg.get("name") or (f"model={chosen.get('model')} data={cfg.data.name}"
                               + (f" dni={chosen.get('dni')}" if typed_dni else ""))
    print(f"sgrun: {what} finished in {metrics.get('minutes', 0.0):.1f} min: "
          f"{task.headline(metrics)}")
    print(f"sgrun: results in {run_dir}; TensorBoard: tensorboard --logdir {run_dir}")
    return value


def mark_failed(out_dir: Path, text: str) -> None:
    """The FAILED marker of a sweep job, whole or absent (temporary file and rename); a disk too
    full for it too is logged, and the sweep goes on."""
    from sgrun.metrics import write_bytes_atomic

    try:
        write_bytes_atomic(out_dir / FAILED, text.encode())
    except SgrunError as e:
        log.error("%s", e)


def nearest_key(cfg: DictConfig, key: str, hint: str = " (set it without the '+');") -> str:
    """"did you mean <key>?<hint> " for the existing key closest to ``key`` (same group first), or
    ""."""
    def leaves(node, prefix=""):
        for k, v in node.items_ex(resolve=False) if isinstance(node, DictConfig) else ():
            path = f"{prefix}{k}"
            if isinstance(v, DictConfig):
                yield from leaves(v, path + ".")
            else:
                yield path
    keys = [k for k in leaves(cfg) if k != key]
    group = key.rsplit(".", 1)[0] + "." if "." in key else ""
    near = (difflib.get_close_matches(key, [k for k in keys if k.startswith(group)], n=1,
                                      cutoff=0.6)
            or difflib.get_close_matches(key, keys, n=1, cutoff=0.6))
    return f"did you mean {near[0]}?{hint} " if near else ""


def unknown_key(text: str) -> str | None:
    """Hydra's "Could not override 'train.stepz'. To append to your config use +train.stepz=5" as
    sgrun's line: the '+' it suggests would only be refused, so name the nearest key instead (found
    in the config the other overrides compose); None for another error."""
    found = re.search(r"Could not override '([^']+)'", text)
    if not found or found.group(1).startswith("hydra."):
        return None
    key = found.group(1)
    rest = [a for a in sys.argv[1:] if not a.startswith("-") and "=" in a
            and a.split("=", 1)[0].lstrip("+~") != key and not a.startswith("hydra.")]
    try:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            near = nearest_key(compose("config", overrides=rest), key, hint="")
    except Exception:  # noqa: BLE001 - the suggestion is a courtesy; the line is said without it
        near = ""
    return f"sgrun has no key {key!r}: {near}list the valid keys with: sgrun --cfg job"


def continue_hint(out_dir: Path, multirun: bool, hc) -> str:
    """The exact command that continues an interrupted run from its checkpoint."""
    args = [a for a in sys.argv[1:] if not a.startswith(("resume=", "hydra.run.dir="))]
    if multirun:
        sweep = Path(hc.sweep.dir).resolve()
        args = [a for a in args if not a.startswith("hydra.sweep.dir=")]
        return "continue the sweep (finished jobs are kept, this one resumes) with: " + shlex.join(
            ["sgrun", *args, f"hydra.sweep.dir={sweep}"])
    return "continue it with: " + shlex.join(["sgrun", *args, f"resume={out_dir.resolve()}"])


def one_line(e: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines; keep what names the problem and the choices
    (for a key sgrun does not have: :func:`unknown_key`)."""
    named = unknown_key(str(e))
    if named:
        return named
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type",
                                                      "Set the environment"))]
    keep = [ln + ("." if ln.startswith("In '") or ln.startswith("Could not find") else "")
            for ln in keep]
    text = " ".join(keep).replace("\t", " ").split(" Config search path:")[0]
    if "Could not override" in text or "is not in struct" in text or "Key '" in text:
        text += " (list the valid keys with: sgrun --cfg job)"
    return text


def fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"sgrun: error: {message}\n")
    sys.exit(code)


def main() -> None:
    """Entry point of the ``sgrun`` command and of ``python -m sgrun``."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # errors reach us, so they can be said in one line
    try:
        _main()
    except Interrupted as e:
        fail(str(e), code=130)
    except SgrunError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        fail(one_line(e))
    except PermissionError as e:
        fail(f"cannot write {e.filename}: permission denied: choose a writable output folder with "
             "hydra.run.dir=<dir> (or hydra.sweep.dir=<dir> for -m)")
    except BrokenPipeError:  # e.g. sgrun --help | head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (OSError, ValueError) as e:
        # a ValueError from Hydra when its job log file cannot be opened (a read-only mount)
        error = e if isinstance(e, OSError) else e.__cause__
        if not (isinstance(error, OSError) and error.filename):
            raise
        fail(write_failure(error, error.filename, "hydra.run.dir"))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    if _failures:
        fail(f"{len(_failures)} job(s) of the sweep failed (the others finished): the table above "
             "says why; their folders: " + ", ".join(_failures), code=1)
