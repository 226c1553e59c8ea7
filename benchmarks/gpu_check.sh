#!/usr/bin/env bash
# One call on a fresh H100/H200 machine (torch, triton, transformers, peft preinstalled, no
# network): the Triton and GPU-only tests, a bf16 smoke of sft / train / merge / generate /
# serve / eval on SmolLM2, and `python -m benchmarks` against transformers+PEFT, TRL and Liger,
# in at most 10 minutes, a short table printed last. benchmarks/gpu_check.py lists the steps
# and what each checks. Results: <device>-<date>-gpu-check.{json,md,png} and the benchmarks'
# <device>-<date>.{json,md} + PNGs, in $OUT when set, else benchmarks/results/ (commit them).
#
# First, here (registry reachable): bash benchmarks/fetch_gpu_wheels.sh   (fills the ignored .gpu/)
# Then, with the device tool, one call:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600)
# A second call can run what the first had no time for: bash benchmarks/gpu_check.sh --only bench-train_step
#
# Locally: `make gpu` is this script; `bash benchmarks/gpu_check.sh --dry-run` checks on a CPU
# machine that every step is wired (command lines parsed, inputs present, results written).
# Options: --dry-run --budget S --only A,B --skip A,B --model DIR --device cpu --results-dir D --work D
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

dry=0
for arg in "$@"; do [ "$arg" = --dry-run ] && dry=1; done

if [ "$dry" = 0 ]; then
  # The peers the image lacks, carried as wheels (fetch_gpu_wheels.sh); a failure only skips their rows.
  if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .gpu/wheels/*.whl; then
      export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "gpu_check: the carried wheels did not install; TRL, Liger and openai rows will say so"
    fi
  fi
  # minidpo itself (kernels/, gen/, eval/ install as minidpo.kernels, .gen, .eval); every step
  # runs `python -m` from this folder. Without setuptools, links in this copy do the same.
  if ! "$PY" -c "import minidpo.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
      || for sub in kernels gen eval; do ln -sfn "../$sub" "minidpo/$sub"; done
  fi
fi

"$PY" -m benchmarks.gpu_check "$@"
status=$?
if [ "$status" -gt 1 ]; then  # 0: all ok, 1: some step failed (its table is above); else the runner broke
  echo "gpu_check: the step runner itself failed (exit $status) before its table; see the output above"
fi
exit "$status"
