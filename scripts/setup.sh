#!/usr/bin/env bash
# Creates .venv and installs fusedit into it. `--dev` adds the test tools.
#
# torch: these machines serve a CUDA build of torch 2.14.1 + torchvision 0.29.1 that also runs on CPU (transformers'
# Qwen2-VL processor needs a torchvision that imports beside torch). On your own GPU machine any CUDA build of
# torch >= 2.5 works: preinstall it in .venv (or set FUSEDIT_TORCH="torch==X torchvision==Y") and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

python3 -m venv .venv
py=.venv/bin/python

if ! "$py" - <<'PY' 2>/dev/null
import torch, torchvision  # noqa: F401
major, minor = (int(part) for part in torch.__version__.split(".")[:2])
raise SystemExit(0 if (major, minor) >= (2, 5) else 1)
PY
then
  torch_spec=${FUSEDIT_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
  # shellcheck disable=SC2086
  "$py" -m pip install -q $torch_spec || "$py" -m pip install -q "torch>=2.5" torchvision
fi

"$py" -m pip install -q -e ".${extras}"
echo "fusedit installed in .venv ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
