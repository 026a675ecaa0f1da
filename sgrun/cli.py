"""The ``sgrun`` command: the only ``@hydra.main``.

User mistakes (a wrong option, a bad value, a missing dataset, an unwritable folder) end with one
line on stderr and exit code 2; programming errors keep their traceback.  In a multirun a failing
job is recorded in its folder (``FAILED``) and the sweep goes on; the command then exits 1.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from sgrun.checkpoint import Interrupted
from sgrun.errors import SgrunError

# absolute, so that the installed command finds the configs from any folder
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
FAILED = "FAILED"
PRIMARY_METRIC = {"feedforward": "test_error", "rnn": "primary", "hrnn": "primary"}

log = logging.getLogger("sgrun")
_failures: list[str] = []


class ReportFailures(Callback):
    """After a sweep, collect the jobs that wrote a ``FAILED`` file (works for every launcher)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _failures.extend(sorted(str(p.parent) for p in sweep_dir.glob(f"*/{FAILED}")))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float | None:
    from sgrun.train import run  # torch imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    (out_dir / FAILED).unlink(missing_ok=True)  # an earlier attempt's failure no longer holds
    try:
        metrics = run(cfg, out_dir)
    except Interrupted as e:
        fail(str(e), code=130)  # Ctrl-C / SIGTERM stops the whole sweep, after the checkpoint is saved
    except SgrunError as e:
        if not multirun:
            fail(str(e))  # exits here, before Hydra adds its own multi-line report
        (out_dir / FAILED).write_text(str(e) + "\n")
        log.error("job %s failed: %s", hc.job.num, e)
        return None
    except Exception as e:
        if not multirun:
            raise
        # a failing job must not stop the sweep nor lose the finished jobs' results
        (out_dir / FAILED).write_text(traceback.format_exc())
        log.error("job %s failed: %s: %s", hc.job.num, type(e).__name__, e)
        return None
    if "rank" in metrics:  # a pipeline stage started by torchrun, other than rank 0
        print(f"sgrun: pipeline stage {metrics['rank']} finished; rank 0 writes the results")
        return None
    value = metrics.get(PRIMARY_METRIC.get(cfg.model.family, "test_error"))
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "minutes"}
    print(f"sgrun: {cfg.get('name') or 'run'} finished in {metrics['minutes']:.1f} min: "
          + ", ".join(f"{k} {v}" for k, v in shown.items()))
    print(f"sgrun: results in {out_dir}; TensorBoard: tensorboard --logdir {out_dir}")
    return value


def one_line(e: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines; keep what names the problem and the choices."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type", "Set the environment"))]
    keep = [ln + ("." if ln.startswith("In '") or ln.startswith("Could not find") else "") for ln in keep]
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
        fail(f"cannot write {e.filename}: permission denied: choose a writable output folder with hydra.run.dir=<dir> "
             "(or hydra.sweep.dir=<dir> for -m)")
    except OSError as e:
        if e.filename is None:
            raise
        fail(f"cannot write {e.filename}: {e.strerror}: choose another output folder with hydra.run.dir=<dir>")
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    if _failures:
        fail(f"{len(_failures)} job(s) of the sweep failed (the others finished): see FAILED in "
             + ", ".join(_failures), code=1)
