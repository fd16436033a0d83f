#!/usr/bin/env bash
# Validate and time several checkouts of the repo (e.g. kernel branches) in ONE device call.
# Each variant: the CE/model GPU tests, then gpu_cross_entropy.py (ours only, key shape) -- or any
# command in VARIANT_CMD. A short table comes last.
#
# Here (CPU box):   git worktree add .wt-tma ce-tma; git worktree add .wt-noinline ce-noinline
# Device call:      VARIANTS="main=. tma=.wt-tma noinline=.wt-noinline" OUT=$OUT scripts/gpu_variants.sh
#                   with carry [".wt-tma", ".wt-noinline", ".whl"] (worktrees travel only when carried)
# Env: VARIANTS ("name=dir ..."), TEST_SECS (default 150), BENCH_SECS (default 120), VARIANT_CMD,
# PYTEST_XDIST (default "-n 8"; empty where pytest-xdist is missing), NO_TESTS ("name ..." of variants
# to time only, e.g. main when it was validated before).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_variants}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
rows=()
for spec in ${VARIANTS:-main=.}; do
  name=${spec%%=*}; dir=$ROOT/${spec#*=}
  [ -d "$dir/d2kernels" ] || { rows+=("$name: no d2kernels in $dir"); continue; }
  if [[ " ${NO_TESTS:-} " == *" $name "* ]]; then echo "skipped (NO_TESTS) passed" >"$OUT/$name.tests.log"; trc=0
  else
  (cd "$dir" && PYTHONPATH=$dir timeout "${TEST_SECS:-150}" python3 -m pytest -q ${PYTEST_XDIST--n 8} -p no:cacheprovider -rfE \
      tests/test_cross_entropy_triton.py tests/test_models.py tests/test_cuda.py -k "cross or decayed or gpu" \
      >"$OUT/$name.tests.log" 2>&1)
  trc=$?
  fi
  (cd "$dir" && PYTHONPATH=$dir timeout "${BENCH_SECS:-120}" bash -c \
      "${VARIANT_CMD:-python3 scripts/gpu_cross_entropy.py --no-compile}" >"$OUT/$name.bench.log" 2>&1)
  brc=$?
  tests=$(grep -E "passed|failed" "$OUT/$name.tests.log" | tail -1 | cut -c1-70)
  ours=$(grep -E "^\| [0-9]+ \| [0-9]+ \| [0-9]+ \| [0-9]+% \| ours \|" "$OUT/$name.bench.log" | awk -F'|' '{printf "%s %s ms; ", $5, $8}')
  rows+=("$(printf '%-10s tests rc=%-3s %s | bench rc=%-3s %s' "$name" "$trc" "$tests" "$brc" "$ours")")
done
echo "===== variants"
printf '%s\n' "${rows[@]}"
