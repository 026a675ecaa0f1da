#!/usr/bin/env bash
# make gpu-check: on a machine with CUDA, the checks that need a GPU, in about 10 minutes:
#   1. the device tests (tests/test_devices.py: every family, resume, determinism, the library's
#      examples) with SGRUN_TEST_DEVICE=cuda, and a smoke run of every model family (and of the
#      pipeline runtime) with device=cuda;
#   2. the demo with device=cuda;
#   3. the throughput benchmarks (python -m sgrun.bench / bench_rnn) on the GPU;
#   4. one paper-profile cell (3-layer MNIST FCN, DNI) for a fixed number of steps, with its steps/s
#      and the projected hours for the paper's 500k steps.
# Without CUDA it says so in one line and exits 0. Output goes to $GPU_CHECK_DIR (default gpu-check/).
set -uo pipefail
PYTHON=${PYTHON:-python3}
out=${GPU_CHECK_DIR:-gpu-check}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device here (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not installed')): nothing to check"
    exit 0
fi
mkdir -p "$out"
status=0
step() { echo "== $*"; }
"$PYTHON" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
date -u +"gpu-check: %Y-%m-%d %H:%M UTC"

step "1. the device tests (pytest -m device) with SGRUN_TEST_DEVICE=cuda, and smoke runs of every model family"
if [ -d tests ]; then
    SGRUN_TEST_DEVICE=cuda timeout 300 "$PYTHON" -m pytest -q -m device -p no:cacheprovider tests \
        > "$out/device_tests.log" 2>&1 && echo "ok   $(tail -1 "$out/device_tests.log")" \
        || { echo "FAIL device tests: $(tail -1 "$out/device_tests.log") (log: $out/device_tests.log)"; status=1; }
else
    echo "skip device tests: no tests/ folder here (run from a checkout of sgrun)"
fi
for args in "model=fcn data=synthetic" "model=cnn data=synthetic" "model=fcn data=synthetic dni=complete_unlock" \
            "model=rnn" "model=rnn data=copy dni=every_k_aux" "model=hrnn"; do
    # shellcheck disable=SC2086
    timeout 120 "$PYTHON" -m sgrun $args profile=smoke device=cuda hydra.run.dir="$out/smoke/${args//[ =]/_}" \
        >> "$out/smoke.log" 2>&1 && echo "ok   $args" || { echo "FAIL $args: $(tail -1 "$out/smoke.log")"; status=1; }
done

# the pipeline runtime needs a GPU per stage process: on one GPU it must be refused in one line
pipe="model=fcn model.layers=4 data=synthetic runtime=pipeline runtime.timeout=60"
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
# shellcheck disable=SC2086
timeout 120 "$PYTHON" -m sgrun $pipe profile=smoke device=cuda hydra.run.dir="$out/smoke/pipeline" \
    > "$out/pipeline.log" 2>&1; rc=$?
if [ "$gpus" -ge 2 ] && [ $rc -eq 0 ]; then echo "ok   $pipe (2 stages on $gpus GPUs)"
elif [ "$gpus" -lt 2 ] && [ $rc -eq 2 ] && grep -q "needs a GPU for each stage" "$out/pipeline.log"; then
    echo "ok   $pipe: refused on $gpus GPU, as it must be: $(tail -1 "$out/pipeline.log")"
else echo "FAIL $pipe (exit $rc on $gpus GPU(s)): $(tail -1 "$out/pipeline.log")"; status=1; fi

step "2. the demo on the GPU"
timeout 300 "$PYTHON" -m sgrun device=cuda hydra.run.dir="$out/demo" 2>&1 | grep "finished in" || status=1

step "3. throughput on the GPU"
timeout 240 "$PYTHON" -m sgrun.bench --device cuda || status=1
timeout 120 "$PYTHON" -m sgrun.bench_rnn --device cuda || status=1

step "4. one paper-profile cell: 3-layer MNIST FCN with DNI, ${GPU_CHECK_STEPS:=20000} steps"
timeout 300 "$PYTHON" -m sgrun experiment=mnist_fcn profile=paper model.layers=3 dni=every_layer device=cuda \
    train.steps="$GPU_CHECK_STEPS" train.eval_every="$GPU_CHECK_STEPS" hydra.run.dir="$out/paper_cell" \
    > "$out/paper_cell.log" 2>&1 || status=1
"$PYTHON" - "$out/paper_cell/summary.json" <<'PY' || status=1
import json, sys
m = json.load(open(sys.argv[1]))["metrics"]
rate = m["steps"] / m["seconds"][-1]
print(f"gpu-check: paper cell {m['steps']} steps at {rate:.0f} steps/s (test error {m['test_error']:.2f} %): "
      f"the paper's 500k steps would take {500000 / rate / 3600:.2f} h")
PY
exit $status
