"""Starting the stages: one process each on this machine, or one per ``torchrun`` rank; clean
shutdown when a stage fails, is killed, or Ctrl-C arrives."""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sgrun.build import build_images, check_runtime_family
from sgrun.checkpoint import Interrupted
from sgrun.errors import ConfigError, OutputWriteError, SgrunError
from sgrun.pipeline.split import check_schedule, max_inflight, plan_split
from sgrun.pipeline.stage import RESULT, full_model, spawned, stage_device, stage_main

log = logging.getLogger("sgrun")


def free_port(port: int) -> int:
    """``port`` if it can be bound (0: any free port); a port in use is a one-line error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConfigError(f"runtime.port={port} is in use: set runtime.port=0 (any free port) "
                              "or another port") from None
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return ("TORCHELASTIC_RUN_ID" in os.environ
            or ("RANK" in os.environ and "WORLD_SIZE" in os.environ))


def train_pipeline(cfg: DictConfig, session) -> tuple[dict, nn.Module | None]:
    """The ``runtime=pipeline`` loop: start the stages (or be one, under torchrun) and return
    rank 0's metrics and the assembled model."""
    check_runtime_family(cfg.runtime.name, cfg.model.family, cfg.model.name)
    if cfg.dni.mode == "off" and cfg.dni.cuts:
        raise ConfigError("runtime=pipeline with dni.mode=off: use dni=none for the locked "
                          "pipeline, or dni.mode=synthetic")
    max_inflight(cfg.runtime)  # an integer >= 1, or auto
    out_dir = Path(session.ckpt.dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    data = build_images(cfg)
    shape, classes = tuple(data.shape), data.num_classes
    del data
    # the split is checked here too, so that a bad one is one line before any process starts
    check_schedule(cfg, plan_split(full_model(cfg, shape, classes), cfg.runtime))
    stage_device(cfg.device, 0, int(cfg.runtime.stages))  # a GPU per stage, before any starts
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        result = stage_main(rank, world, cfg, str(out_dir))
        if rank != 0:
            return {"rank": rank}, None
    else:
        result = spawn_stages(cfg, container, out_dir, session)
    model = full_model(cfg, shape, classes)
    model.load_state_dict(result["state"])
    return result["metrics"], model


def pipeline_threads(cfg: DictConfig) -> int:
    """Torch threads of each stage: ``runtime.threads``, or for ``auto`` (and null) the cores split
    evenly between the stages; under torchrun the count torchrun gave the process."""
    if under_torchrun():
        return torch.get_num_threads()
    if cfg.runtime.threads not in (None, "auto"):
        return int(cfg.runtime.threads)
    return max(1, (os.cpu_count() or 1) // int(cfg.runtime.stages))


def spawn_stages(cfg: DictConfig, container: dict, out_dir: Path, session) -> dict:
    import torch.multiprocessing as mp

    world = int(cfg.runtime.stages)
    port = free_port(int(cfg.runtime.port))
    threads = pipeline_threads(cfg)
    (out_dir / RESULT).unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    log.info("pipeline: %d stages, %d thread(s) each, port %d", world, threads, port)
    # when one stage fails, torch stops the others itself and warns about each on stderr; the
    # failing stage's one line says what happened (the rest are stopped below in any case)
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    procs = mp.start_processes(spawned,
                               args=(world, container, str(out_dir), port, threads, errors,
                                     os.getpid()),
                               nprocs=world, join=False, start_method="spawn")
    try:
        while not procs.join(timeout=0.5):
            if session.ckpt.stop_signal is not None:
                raise Interrupted("interrupted: all pipeline stages stopped (pipeline runs keep no "
                                  "checkpoint)")
    except mp.ProcessExitedException as e:
        raise stage_failure(e, errors) from None
    except mp.ProcessRaisedException as e:  # not expected: stages report through `errors`
        raise SgrunError(f"a pipeline stage failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
        for p in procs.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    result = torch.load(out_dir / RESULT, weights_only=False)
    (out_dir / RESULT).unlink()
    return result


def stage_failure(e, errors) -> SgrunError:
    """The failing stage's own error, not its neighbours' broken connections; a failed write stays
    one (:class:`OutputWriteError`), so that the engine adds its fix."""
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    own = [r for r in reports if r[0] == e.error_index]
    first = own[0] if own else (reports[0] if reports else None)
    if e.exit_code is not None and e.exit_code < 0 and not own:
        name = signal.Signals(-e.exit_code).name
        return SgrunError(f"pipeline stage {e.error_index} was killed ({name}); all stages "
                          "stopped: run again")
    if first is None:
        return SgrunError(f"pipeline stage {e.error_index} exited with code {e.exit_code}; all "
                          "stages stopped")
    rank, message, trace, write = first
    if trace:
        log.error("pipeline stage %d:\n%s", rank, trace)
    if write is not None:
        return OutputWriteError(f"pipeline stage {rank}: {message}", *write)
    return SgrunError(f"pipeline stage {rank}: {message}")
