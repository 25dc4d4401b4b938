#!/usr/bin/env bash
# One-shot GPU check (bench/gpu_check.py) for a machine with one H100/H200 and no package registry.
#   bash bench/gpu_check.sh OUT            # on the GPU machine: <= 470 s wall, install included
#   bash bench/gpu_check.sh OUT --dry      # rehearsal on a CPU (no wheels needed, nothing installed)
#   bash bench/gpu_check.sh --make-wheels  # on a machine with PyPI: build .whl/ (bench/gpu_check_wheels.txt)
# OUT ends with <= 4 files: gpu_check.json, gpu_check.md, gpu_target_config.pbtxt, logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
START=$SECONDS
WHL=${GPU_CHECK_WHEELS:-.whl}  # the carried wheel folder
TOTAL_S=470          # the whole script, install included (the device allows 480 s a command)
INSTALL_S=25         # the wheel install's own limit

if [ "${1:-}" = "--make-wheels" ]; then
  # Python 3.12 manylinux wheels of what the GPU image lacks, without their dependencies (the image
  # has them: numpy, absl-py, etils, protobuf, PyYAML, packaging, cloudpickle, psutil, pyarrow ...)
  set -e
  rm -rf .whl && mkdir -p .whl
  grep -v '^#' bench/gpu_check_wheels.txt | grep -v '^antlr4' | grep . > .whl/.binary.txt
  "$PYTHON" -m pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl -r .whl/.binary.txt
  # omegaconf's parser runtime is an sdist only: pure Python, built into a py3-none-any wheel here
  "$PYTHON" -m pip wheel --quiet --no-deps -w .whl "$(grep '^antlr4' bench/gpu_check_wheels.txt)"
  rm .whl/.binary.txt
  ls -l .whl
  SIZE=$(du -sb .whl | cut -f1)
  echo "[gpu_check] .whl/: $(ls .whl/*.whl | wc -l) wheels, $((SIZE / 1024)) KiB"
  [ "$SIZE" -le $((20 * 1024 * 1024)) ] || { echo "[gpu_check] .whl/ is over 20 MiB" >&2; exit 1; }
  exit 0
fi

OUT_DIR=${1:?usage: bash bench/gpu_check.sh OUT [--dry] | --make-wheels}
shift
DRY=0
for a in "$@"; do [ "$a" = "--dry" ] && DRY=1; done
mkdir -p "$OUT_DIR"
SCRATCH=$(mktemp -d /tmp/gpu_check.XXXXXX)
INSTALL_JSON=$SCRATCH/install.json

# 1. the wheels: only distributions that are missing, without dependencies or an index
if [ "$DRY" = 1 ]; then
  echo '{"status": "skipped (--dry)"}' > "$INSTALL_JSON"
elif ! ls "$WHL"/*.whl >/dev/null 2>&1; then
  echo "[gpu_check] no wheels in $WHL/: build them first on a machine with PyPI (bash bench/gpu_check.sh --make-wheels) and carry them here" >&2
  exit 2
else
  MISSING=$("$PYTHON" - "$WHL" <<'PY'
import glob, importlib.metadata as md, re, sys
for w in sorted(glob.glob(sys.argv[1] + "/*.whl")):
    name = re.sub(r"[-_.]+", "-", w.split("/")[-1].split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(w)
PY
)
  if [ -z "$MISSING" ]; then
    echo '{"status": "ok", "installed": []}' > "$INSTALL_JSON"
  else
    echo "[gpu_check] installing (--no-deps, no index):" $MISSING
    T0=$SECONDS
    if timeout "$INSTALL_S" "$PYTHON" -m pip install --no-deps --no-index $MISSING > "$SCRATCH/install.log" 2>&1; then
      STATUS=ok
    else
      STATUS="failed (exit $?)"
      tail -5 "$SCRATCH/install.log" >&2
    fi
    # a failed install does not stop the run: the sections that need no wheel (attention, flash, target)
    # still measure, and the others say which import failed; gpu_check.json records the failure
    "$PYTHON" -c 'import json, sys; print(json.dumps({"status": sys.argv[1], "seconds": int(sys.argv[2]), "installed": sys.argv[3:]}))' \
      "$STATUS" $((SECONDS - T0)) $MISSING > "$INSTALL_JSON"
    echo "[gpu_check] install: $STATUS in $((SECONDS - T0)) s"
  fi
fi

# 2. the check, in what is left of TOTAL_S: jax may take 90 % of the device (the 7B step plans ~60 GiB)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
LEFT=$((TOTAL_S - (SECONDS - START)))
if [ "$DRY" = 1 ]; then
  exec "$PYTHON" -m bench.gpu_check --out "$OUT_DIR" --scratch "$SCRATCH" --install "$INSTALL_JSON" "$@"
fi
# the parent's budget ends 15 s before the hard stop; TERM lets it write what it has, KILL 5 s later
exec timeout -k 5 $((LEFT - 5)) "$PYTHON" -m bench.gpu_check --out "$OUT_DIR" --scratch "$SCRATCH" \
  --install "$INSTALL_JSON" --budget-s $((LEFT - 20)) "$@"
