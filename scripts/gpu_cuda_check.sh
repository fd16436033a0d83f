#!/usr/bin/env bash
# GPU check of the CUDA reference library and the noise_embedding kernels, in one go:
# builds libd2kernels_cuda.so with CMake, runs tests/test_cuda.py + tests/test_embedding_triton.py,
# then the embedding benchmark (do_bench medians printed per case).
# Usage, from anywhere:  scripts/gpu_cuda_check.sh
# Env: PYTHON (default python3), JOBS (build jobs, default nproc), SKIP_BUILD=1 (use an existing
# library: build/ or $D2KERNELS_CUDA_LIB), BENCH=0 (skip the benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null || exit 1
  cmake --build build -j "${JOBS:-$(nproc)}" || exit 1
fi

"$PY" -m pytest tests/test_cuda.py tests/test_embedding_triton.py -q -rs -p no:cacheprovider || status=1

if [ "${BENCH:-1}" != 0 ]; then
  "$PY" -m pytest benchmarks/test_embedding.py -q -s -p no:cacheprovider \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name 2>&1 \
    | grep -E "^noise_embedding|passed|failed|error|Error" || status=1
fi
exit $status
