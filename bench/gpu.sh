#!/usr/bin/env bash
# One command for a lent GPU machine (issue 11): every CUDA path checked and measured, see bench/gpu.py.
# Installs nothing from the network: Python packages the machine lacks travel as wheels in .whl/
# (the device tool's README says how), installed here into /tmp/site. Stops at once without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  echo "bench/gpu.sh: error: no CUDA device here (or no torch): run it on a GPU machine" >&2
  exit 2
fi
exec "$PY" bench/gpu.py "$@"
