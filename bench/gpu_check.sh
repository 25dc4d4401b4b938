#!/usr/bin/env bash
# One-shot GPU check (bench/gpu_check.py), for a machine with one H100/H200 and no package registry.
#   bash bench/gpu_check.sh [OUT_DIR]         # default: $OUT, else gpu_check_out
#   bash bench/gpu_check.sh OUT_DIR --dry     # rehearsal on a CPU machine: no GPU parts
# Before: make .whl/ with the wheels of bench/gpu_check_wheels.txt (see that file); carry the repository
# with .whl/ to the GPU machine. Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md in <= 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-gpu_check_out}}
shift || true
mkdir -p "$OUT_DIR"
DRY=0
for a in "$@"; do [ "$a" = "--dry" ] && DRY=1; done

# 1. the wheels: only distributions that are missing, without dependencies or an index
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "[gpu_check] no .whl/ folder: make it first (bench/gpu_check_wheels.txt says how)" >&2
fi
if [ "$DRY" = 1 ]; then
  # this machine may not run Python 3.12: check the wheels would install there, install nothing
  timeout 60 "$PYTHON" -m pip install --dry-run --quiet --no-deps --no-index --python-version 3.12 \
    --only-binary=:all: --target "$OUT_DIR/whl-check" .whl/*.whl \
    && echo "[gpu_check] .whl/: every wheel installs on Python 3.12 ($(du -sh .whl | cut -f1))" \
    || echo "[gpu_check] .whl/: some wheel does not install on Python 3.12" >&2
else
  MISSING=$("$PYTHON" - <<'PY'
import glob, importlib.metadata as md, re
for w in sorted(glob.glob(".whl/*.whl")):
    name = re.sub(r"[-_.]+", "-", w.split("/")[-1].split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(w)
PY
)
  if [ -n "$MISSING" ]; then
    echo "[gpu_check] installing (--no-deps):" $MISSING
    timeout 120 "$PYTHON" -m pip install --quiet --no-deps --no-index $MISSING || echo "[gpu_check] wheel install failed" >&2
  fi
fi

# 2. the check: jax may take 90 % of the device (the 7B step at micro-batch 1 plans ~60 GiB)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec timeout 560 "$PYTHON" -m bench.gpu_check --out "$OUT_DIR" "$@"
