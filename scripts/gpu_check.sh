#!/usr/bin/env bash
# A lent GPU in one command: the environment, the GPU tests, Qwen-Image-2.1's full-shape bench, the training
# profiles' fit check and the full-shape benchmark, all logged in OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR [extra `fusedit bench` arguments, e.g. --variants standard+ckpt,merged+compile+ckpt]
#
# Leaves eight files in OUTDIR (a device run brings back at most eight): gpu-check.log (environment, the GPU tests'
# output, the 2.1 bench's log and table, the summary), bench21-full.json (`fusedit bench --size full --family
# qwen-image-2.1`: 2.1:standard+ckpt vs 2.1:merged+ckpt), gpu-fit.log, gpu-fit.json, gpu-fit.md (`python -m
# fusedit.bench.fit`: each trainer profile's plan stepped at the full shape under its card's memory cap, measured
# against the planner's prediction), bench-full.log, bench-full.json and bench-full.md. The reports are rewritten
# after every profile / variant, so a run stopped at its limit keeps the numbers it had.
#
# Time: the whole script ends inside GPU_CHECK_SECONDS (default 540, i.e. a 10-minute command limit less a minute
# for installing the wheels): the tests get at most 120 s, the 2.1 bench at most GPU_BENCH21_SECONDS (default 90:
# two checkpointed variants of 1 warm-up + 3 timed steps at ~321 TFLOP each, expected well inside a minute on an
# H100/H200; GPU_BENCH21=0 skips it), the fit check at most GPU_FIT_SECONDS (default 240; its --time-budget ends 30 s
# early and it starts no profile expected to end past it), the bench the rest (when at least 100 s are left), as a
# --time-budget that ends a minute early with a hard `timeout` behind it.
# GPU_FIT=0 skips the fit check; GPU_FIT_ARGS adds arguments to it (e.g. "--profiles 12gb,16gb --pcie-gbps 50").
#
# Python: $PYTHON, else `python`, else `python3`. This checkout's src/ goes first on PYTHONPATH, so it works with the
# project's venv as with PYTHONPATH=/tmp/site:src on a bare machine (BENCHMARKS.md has the wheels to carry).
# GPU_TESTS=0 skips the tests (a second run for more variants). GPU_CHECK_ALLOW_CPU=1 lets the script itself be tested
# on a CPU (with --size tiny ... as extra arguments); without it, no CUDA device is a refusal.
#
# Exit status: 0 all passed; 1 a test or a variant failed, or the bench was stopped or wrote no report;
# 2 no CUDA device, fusedit not importable, or bad arguments.
set -uo pipefail

if [ $# -lt 1 ] || [ -z "$1" ] || [ "${1#-}" != "$1" ]; then
  echo "usage: scripts/gpu_check.sh OUTDIR [extra fusedit bench arguments]" >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
total=${GPU_CHECK_SECONDS:-540}
log=$out/gpu-check.log
: >"$log"

say() { echo "$*" | tee -a "$log"; }
refuse() {
  echo "gpu_check.sh: $*" | tee -a "$log" >&2
  exit 2
}
# run_logged SECONDS LOGFILE COMMAND...: the command's output goes to LOGFILE and is shown as it comes; returns its
# exit status (124 or 137 when `timeout` stopped it). Not a pipe into tee: a process the command leaves behind
# (a compile worker) would hold the pipe open and keep this script waiting past its limit.
run_logged() {
  local seconds=$1 logfile=$2
  shift 2
  : >"$logfile"
  timeout -k 15 "$seconds" "$@" >"$logfile" 2>&1 &
  local pid=$!
  tail -n +1 -f --pid="$pid" "$logfile"
  wait "$pid"
}

say "== gpu_check.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), $repo at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
say "python: $py; PYTHONPATH=$PYTHONPATH; budget ${total} s"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi 2>&1 | tee -a "$log"
else
  say "nvidia-smi: not on PATH"
fi

"$py" - <<'PY' 2>&1 | tee -a "$log"
import importlib.metadata as metadata
import os
import sys

try:
    import torch
except Exception as error:
    print(f"cannot import torch with {sys.executable}: {error}")
    raise SystemExit(3) from None
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {torch.cuda.get_device_name(0)}, capability {props.major}.{props.minor}, "
        f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs; cuDNN {torch.backends.cudnn.version()}"
    )
elif os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
    print("no CUDA device; going on on the CPU (GPU_CHECK_ALLOW_CPU=1: a test of this script, not a GPU check)")
else:
    raise SystemExit(3)
versions = []
for name in ("diffusers", "transformers", "peft", "accelerate", "lightning", "safetensors", "hydra-core",
             "omegaconf", "huggingface-hub", "numpy", "pillow", "pytest", "hypothesis", "wandb"):  # fmt: skip
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print("packages: " + ", ".join(versions))
try:
    import fusedit.bench  # noqa: F401  (diffusers, accelerate, peft, lightning: what the bench needs at import)
    import fusedit.model.attention  # noqa: F401
except Exception as error:
    print(f"cannot import fusedit.bench: {type(error).__name__}: {error}")
    raise SystemExit(4) from None
PY
case ${PIPESTATUS[0]} in
0) ;;
3) refuse "no CUDA device visible to torch (torch.cuda.is_available() is False, or torch does not import): this script is for a GPU machine. On a CPU use: python -m fusedit.bench --size tiny" ;;
4) refuse "fusedit.bench does not import (see above): carry and install the wheels listed in BENCHMARKS.md, then PYTHONPATH=/tmp/site:src" ;;
*) refuse "the environment check failed (see above)" ;;
esac

tests_rc=skipped
if [ "${GPU_TESTS:-1}" != 0 ]; then
  say "== GPU tests: $py -m pytest -q -m gpu tests (at most 120 s)"
  run_logged 120 "$out/gpu-tests.log" "$py" -m pytest -q -p no:cacheprovider -m gpu tests
  tests_rc=$?
  # Into gpu-check.log: a device run brings back eight files at most.
  cat "$out/gpu-tests.log" >>"$log" && rm -f "$out/gpu-tests.log"
fi

bench21_rc=skipped
if [ "${GPU_BENCH21:-1}" != 0 ]; then
  bench21_seconds=${GPU_BENCH21_SECONDS:-90}
  bench21_min=$(awk -v s=$((bench21_seconds - 30)) 'BEGIN { printf "%.2f", (s > 6 ? s : 6) / 60 }')
  # shellcheck disable=SC2206  # GPU_BENCH21_ARGS is a list of words on purpose
  bench21=(-m fusedit.bench --size full --family qwen-image-2.1 --variants 2.1:standard+ckpt,2.1:merged+ckpt
    --warmup 1 --steps 3 --time-budget "$bench21_min" --json "$out/bench21-full.json"
    --markdown "$out/bench21-full.md" ${GPU_BENCH21_ARGS:-})
  say "== Qwen-Image-2.1 bench (hard stop after ${bench21_seconds} s): $py ${bench21[*]}"
  run_logged "$bench21_seconds" "$out/bench21-full.log" "$py" "${bench21[@]}"
  bench21_rc=$?
  cat "$out/bench21-full.log" >>"$log" && rm -f "$out/bench21-full.log"
fi

fit_rc=skipped
if [ "${GPU_FIT:-1}" != 0 ]; then
  fit_seconds=${GPU_FIT_SECONDS:-240}
  ((fit_seconds > total - SECONDS - 30)) && fit_seconds=$((total - SECONDS - 30))
  # shellcheck disable=SC2206  # GPU_FIT_ARGS is a list of words on purpose
  fit=(-m fusedit.bench.fit --time-budget $((fit_seconds - 30)) --json "$out/gpu-fit.json" --markdown "$out/gpu-fit.md"
    ${GPU_FIT_ARGS:-})
  say "== fit check (hard stop after ${fit_seconds} s): $py ${fit[*]}"
  run_logged "$fit_seconds" "$out/gpu-fit.log" "$py" "${fit[@]}"
  fit_rc=$?
fi

left=$((total - SECONDS))
bench_rc=notstarted
if ((left < 100)); then
  say "== bench: not started, only ${left} s of the ${total} s budget left"
else
  budget_min=$(awk -v s=$((left - 60)) 'BEGIN { printf "%.2f", s / 60 }')
  bench=(-m fusedit.bench --size full --warmup 2 --steps 8 --time-budget "$budget_min"
    --json "$out/bench-full.json" --markdown "$out/bench-full.md" "$@")
  say "== bench (hard stop after $((left - 20)) s): $py ${bench[*]}"
  run_logged $((left - 20)) "$out/bench-full.log" "$py" "${bench[@]}"
  bench_rc=$?
fi

say "== summary after ${SECONDS} s"
status=0
case $tests_rc in
skipped) say "GPU tests: skipped (GPU_TESTS=0)" ;;
0) say "GPU tests: passed" ;;
124 | 137) say "GPU tests: stopped at 150 s (gpu-tests.log)" && status=1 ;;
*) say "GPU tests: FAILED, exit $tests_rc (gpu-tests.log)" && status=1 ;;
esac
case $fit_rc in
skipped) say "fit check: skipped (GPU_FIT=0)" ;;
0) say "fit check: done, every profile ran" ;;
124 | 137) say "fit check: stopped by the hard time limit; gpu-fit.md holds the profiles finished before" && status=1 ;;
*) say "fit check: exit $fit_rc (a profile ran out of memory, failed or was skipped: gpu-fit.md)" && status=1 ;;
esac
[ -s "$out/gpu-fit.md" ] && tee -a "$log" <"$out/gpu-fit.md"
case $bench21_rc in
skipped) say "2.1 bench: skipped (GPU_BENCH21=0)" ;;
0) say "2.1 bench: done" ;;
124 | 137) say "2.1 bench: stopped by the hard time limit; bench21-full.json holds the variants finished before" && status=1 ;;
*) say "2.1 bench: exit $bench21_rc (a variant failed or the bench broke: gpu-check.log, bench21-full.json)" && status=1 ;;
esac
if [ -s "$out/bench21-full.md" ]; then
  tee -a "$log" <"$out/bench21-full.md" && rm -f "$out/bench21-full.md"
fi
case $bench_rc in
0) say "bench: done" ;;
notstarted) say "bench: not started (too little time left)" && status=1 ;;
124 | 137) say "bench: stopped by the hard time limit; the reports hold the variants finished before" && status=1 ;;
*) say "bench: exit $bench_rc (a variant failed or the bench broke: bench-full.log, bench-full.json)" && status=1 ;;
esac
if [ -s "$out/bench-full.md" ]; then
  tee -a "$log" <"$out/bench-full.md"
else
  say "bench: no report was written" && status=1
fi
exit $status
