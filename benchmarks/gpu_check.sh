#!/usr/bin/env bash
# One-shot GPU check of the CUDA rasterizer, for a machine with a GPU and no internet:
#   1. makes `studio` importable from this checkout (PYTHONPATH; `pip install -e . --no-deps` only if
#      that is not enough; nothing is downloaded),
#   2. builds the extension (studio.ext.load "studio_cuda_raster"), log in $OUT/gpu_build.log,
#   3. runs benchmarks/gpu_check.py (parity vs the torch twin and gsplat if importable, timings),
#      JSON in ${OUT:-.}/gpu_check.json, log in $OUT/gpu_check.log,
#   4. with GPU_CHECK_PYTEST=1 also the GPU tests of tests/test_cuda_compile.py ($OUT/pytest_cuda.log).
# Always exits 0 once the JSON is written (failures are recorded in it); exits 1 if it is not.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-.}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "[gpu_check.sh] python: $PY ($("$PY" --version 2>&1))"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if ! "$PY" -c "import studio.render, cuda_ext" >/dev/null 2>&1; then
    echo "[gpu_check.sh] studio not importable from PYTHONPATH; trying pip install -e . --no-deps (offline)"
    "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index -q 2>&1 | tail -n 5 || true
fi
"$PY" -c "import studio.render, cuda_ext; print('[gpu_check.sh] studio from', studio.__file__)" \
    || echo "[gpu_check.sh] WARNING: studio still not importable; gpu_check.py will record the errors"

echo "[gpu_check.sh] building the CUDA extension (MAX_JOBS=$MAX_JOBS) ..."
STUDIO_EXT_VERBOSE=1 "$PY" - >"$OUT_DIR/gpu_build.log" 2>&1 <<'PYEOF'
import time
t0 = time.time()
from studio.render._gaussians_ext import cuda as _cuda
ok = _cuda.available()
print(f"available={ok} seconds={time.time() - t0:.1f} error={_cuda.load_error()}")
PYEOF
tail -n 3 "$OUT_DIR/gpu_build.log"

echo "[gpu_check.sh] running benchmarks/gpu_check.py ..."
"$PY" benchmarks/gpu_check.py --out "$OUT_DIR/gpu_check.json" 2>&1 | tee "$OUT_DIR/gpu_check.log" | grep '^\[gpu_check\]'

if [[ "${GPU_CHECK_PYTEST:-0}" == "1" ]]; then
    echo "[gpu_check.sh] GPU pytest subset ..."
    timeout 600 "$PY" -m pytest tests/test_cuda_compile.py -q -p no:cacheprovider \
        -k "cuda_matches_torch_backend or direct_call" >"$OUT_DIR/pytest_cuda.log" 2>&1
    tail -n 5 "$OUT_DIR/pytest_cuda.log"
fi

if [[ -s "$OUT_DIR/gpu_check.json" ]]; then
    echo "[gpu_check.sh] wrote $OUT_DIR/gpu_check.json"
    exit 0
fi
echo "[gpu_check.sh] no JSON written" >&2
exit 1
