#!/usr/bin/env bash
# Everything the GPU must confirm, in one device call: the whole test suite natively on the GPU
# (bf16 cases included), then the train-step, attention, cross-entropy and embedding timings.
# Short summary table last. Usage (repo root):  COMMIT=$(git rev-parse --short HEAD) scripts/gpu_check.sh
# Carry: .whl (Liger-Kernel / Cut Cross-Entropy wheels, optional), build/libd2kernels_cuda.so (optional).
# Env: ATTN_ARGS / ATTN_SECS (e.g. "--sweep --skip-check" / 200), TRAIN_ARGS / TRAIN_SECS, CE_EXTRA.
# Env: STAGES (default "tests train attn ce emb"; also "cetests", "fast" (the trainer's GPU tests) and "e2e"
# (python -m d2sd.train end to end at the Qwen3-4B shape, benchmarks/train_e2e.py; E2E_ARGS, E2E_SECS); all five exceed one 10-minute device call: run
# STAGES="tests train" and STAGES="attn ce emb" as two calls), OUT (logs; default /tmp/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch, triton; print('commit', '${COMMIT:-?}', 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! python3 -c "import d2kernels.cuda as c; c.load_library()" 2>/dev/null; then
  (cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j16 >/dev/null) || echo "CUDA library build failed"
fi
summary=()
stage() {  # name, timeout seconds, command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-8s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(grep -E 'passed|failed|error' "$OUT/$name.log" | tail -1 | cut -c1-90)")")
  echo "===== $name (rc=$rc)"; tail -n "${TAIL:-25}" "$OUT/$name.log"
}
for s in ${STAGES:-tests train attn ce emb}; do
  case $s in
    tests) stage tests 300 python3 -m pytest tests -q -n 14 -p no:cacheprovider -rfE ;;
    cetests) stage cetests 170 python3 -m pytest -v -n 8 -p no:cacheprovider -rfE --durations=8 \
               tests/test_cross_entropy_triton.py tests/test_cuda.py tests/test_models.py tests/test_attention_triton.py ;;
    train) stage train "${TRAIN_SECS:-180}" python3 scripts/gpu_train_step.py --max-batch 16 --iters 8 ${TRAIN_ARGS:-} ;;
    attn)  stage attn "${ATTN_SECS:-80}" python3 scripts/gpu_attention.py --out "$OUT" ${ATTN_ARGS:-} ;;
    ce)    stage ce 200 python3 scripts/gpu_cross_entropy.py --extra "${CE_EXTRA:-8192x4096x262144}" ;;
    fast)  stage fast 240 python3 -m pytest tests/test_train_fast_path.py -q -p no:cacheprovider -rfE ;;
    e2e)   stage e2e "${E2E_SECS:-420}" python3 benchmarks/train_e2e.py --work /tmp/e2e --json "$OUT/e2e.json" --logs "$OUT" ${E2E_ARGS:-} ;;
    emb)   stage emb 45 python3 -m pytest benchmarks/test_embedding.py -q -p no:cacheprovider --benchmark-columns=median,rounds ;;
  esac
done
echo "===== summary"
printf '%s\n' "${summary[@]}"
