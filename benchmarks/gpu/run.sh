#!/usr/bin/env bash
# The GPU benchmark in one call, from a bare machine with Python, PyTorch, numpy, scipy, scikit-image and
# scikit-learn (no network): installs the wheels that benchmarks/gpu/prepare.sh put in benchmarks/gpu/wheels
# (segment-anything, pydantic and its parts) into a temporary target, checks CUDA, runs driver.py, and
# prints one table last. Results: OUT_DIR/results.json, OUT_DIR/table.txt, OUT_DIR/log.txt.
#
#   bash benchmarks/gpu/prepare.sh                 # here, with the registry, right before the GPU call
#   bash benchmarks/gpu/run.sh "$OUT"              # on the GPU machine (carry benchmarks/gpu/wheels)
#   bash benchmarks/gpu/run.sh OUT_DIR --smoke     # anywhere, tiny model on the CPU (CI)
#
# Extra arguments go to driver.py (--budget-s, --cells, --batches, --boxes, --frames, --no-compile).
# Expected time on an H200: under 8 minutes all in (the driver stops starting stages after 420 s).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${OUT:-}"
if [[ $# -gt 0 && "$1" != --* ]]; then out="$1"; shift; fi
if [[ -z "$out" ]]; then echo "usage: run.sh OUT_DIR [--smoke] [driver options] (or set OUT)" >&2; exit 2; fi
mkdir -p "$out"
py="${PYTHON:-python3}"
smoke=0
for arg in "$@"; do [[ "$arg" == "--smoke" ]] && smoke=1; done

site=""
shopt -s nullglob
wheels=("$here"/wheels/*.whl)
zips=("$here"/wheels/*.zip)
# Only what is missing: a machine that has both (a developer's venv, CI) uses its own.
if [[ ${#wheels[@]} -gt 0 ]] && ! "$py" -c "import segment_anything, pydantic" 2>/dev/null; then
  site="$(mktemp -d /tmp/cellsam-site.XXXXXX)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"
fi
path="$repo"
[[ -n "$site" ]] && path="$site:$path"
for z in "${zips[@]}"; do path="$z:$path"; done  # a zipped package (prepare.sh's fallback) imports from the zip
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [[ $smoke -eq 0 ]]; then
  "$py" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("run.sh: torch sees no CUDA device; use --smoke for the CPU check")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
fi
"$py" -c "import segment_anything, pydantic, cellsam_core.inference" \
  || { echo "run.sh: the model core does not import; run benchmarks/gpu/prepare.sh before the call" >&2; exit 3; }

set +e
timeout 470 "$py" "$here/driver.py" --out "$out" "$@" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
set -e
if [[ $status -eq 124 ]]; then
  echo "run.sh: the driver hit the 470 s limit; partial results are in $out/results.json" >&2
  "$py" "$here/driver.py" --out "$out" --render-only || true
fi
exit "$status"
