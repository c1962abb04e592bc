#!/usr/bin/env bash
# Compile-check the CUDA kernels (cuda_ext/cuda/*.cu) standalone with nvcc for sm_80 and sm_90.
# The .cu files include no torch headers, so this needs only the CUDA toolkit (no GPU, no torch).
# Exits 0 with a note when nvcc is missing; non-zero when any file fails to compile.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/cuda_ext/cuda"

NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
    if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
        NVCC="$CUDA_HOME/bin/nvcc"
    elif command -v nvcc >/dev/null 2>&1; then
        NVCC="$(command -v nvcc)"
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
        NVCC=/usr/local/cuda/bin/nvcc
    fi
fi
if [[ -z "$NVCC" ]]; then
    echo "nvcc not found, skipping"
    exit 0
fi

shopt -s nullglob
files=("$SRC"/*.cu)
if (( ${#files[@]} == 0 )); then
    echo "no .cu files under $SRC" >&2
    exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "nvcc: $("$NVCC" --version | tail -n 1)"
pids=()
names=()
for f in "${files[@]}"; do
    base="$(basename "$f" .cu)"
    "$NVCC" -c -std=c++17 -O3 \
        -gencode arch=compute_80,code=sm_80 \
        -gencode arch=compute_90,code=sm_90 \
        -I"$SRC" "$f" -o "$TMP/$base.o" >"$TMP/$base.log" 2>&1 &
    pids+=($!)
    names+=("$base")
done

status=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        echo "ok    ${names[$i]}.cu"
        # Surface warnings too (kept quiet otherwise).
        if [[ -s "$TMP/${names[$i]}.log" ]]; then cat "$TMP/${names[$i]}.log"; fi
    else
        echo "FAIL  ${names[$i]}.cu"
        cat "$TMP/${names[$i]}.log"
        status=1
    fi
done
exit $status
