#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one run: `localmim bench --suite`, each
# configuration in its own process with a time limit, JSON lines appended to OUT/gpu_measure.jsonl
# (profile trace and summary beside it; the generated JPEGs go to /tmp/localmim_bench_jpegs). Fits in about 8 minutes on one H200; a failing configuration is recorded
# as an {"config", "error"} line and the rest go on.
#
#   tools/gpu_measure.sh OUT_DIR            # on the GPU machine, from the repository root
#   tools/gpu_measure.sh OUT_DIR --tiny     # the same suite on tiny models, 2 steps, CPU (a dry run)
#   tools/gpu_measure.sh OUT_DIR --suite-only NAME,NAME [--suite-budget-s S]   # rerun those only
#
# Works from a checkout without installing it: the repository root is the package `localmim`, so
# it is linked into a temporary folder put on PYTHONPATH. PYTHON picks the interpreter (default:
# .venv/bin/python when it exists, else python3).
set -euo pipefail
out="${1:?usage: tools/gpu_measure.sh OUT_DIR [--tiny]}"
shift
mkdir -p "$out"
out="$(cd "$out" && pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
pkg="$(mktemp -d)"
ln -s "$root" "$pkg/localmim"
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export LOCALMIM_CACHE="${LOCALMIM_CACHE:-/tmp/localmim_cache}"   # the photographs the JPEGs are cut from
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
  nproc; } > "$out/machine.txt" 2>&1 || true
cd "$pkg"
exec "$python" -m localmim.tools.cli bench --suite "$out/gpu_measure.jsonl" "$@"
