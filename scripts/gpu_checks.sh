#!/bin/bash
# The GPU checks that back the README, one per device call, in the order to run them.
#
#   bash scripts/gpu_checks.sh suite      # kernel + package tests on the GPU (no SGLang), ~8 min cold
#                                         # (TESTS=<paths> for a part of it)
#   SGL=<unpacked sglang bundle> bash scripts/gpu_checks.sh e2e      # 8B shape in SGLang, ~9 min
#                                         # (E2E_ARGS="--systems ... --variant ..." for other systems)
#   SGL=<unpacked sglang bundle> bash scripts/gpu_checks.sh sampling # sampled SpecSA vs NSA AR, ~4-7 min
#   SECTIONS=decode,refresh [BASELINE=<other checkout>] bash scripts/gpu_checks.sh kernels
#                                         # benchmark/kernels.py sections (CUDA graphs, cold L2)
#                                         # of this checkout, then of BASELINE's, same machine
#                                         # (an A/B of two commits; ~1 min per decode section)
#   bash scripts/gpu_checks.sh runtime-profile   # the runtime's whole-step profile + planner
#                                         # check (no SGLang), ~4 min; ship
#                                         # $OUT/rt/runtime_profile_<gpu>_llama3-8b.json as
#                                         # configs/profiles/<gpu>/runtime/llama3-8b.json
#
# The sampling check takes 0.3 of the GPU's memory and only checks distributions, so it can run
# beside a part of the suite in one call (its servers are slower then; the e2e timings cannot):
#   SGL=... bash scripts/gpu_checks.sh sampling & TESTS=... bash scripts/gpu_checks.sh suite; wait
# Results go under $OUT (default /tmp/out); commit them under benchmark/results/<gpu>/ with the
# commit. The SGLang checks first make sure the bundle imports: a half-unpacked bundle fails
# here in a second instead of after the servers' start-up.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# a `git archive` snapshot carries its commit in COMMIT (the device's copy of the repository
# around it may sit at another commit)
COMMIT=$(cat COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
export PYTHONUNBUFFERED=1 SPECSA_COMMIT=$COMMIT

gpu_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || exit 2
    echo "$COMMIT" >> "$OUT/gpu.txt"
}

stage() {   # the package of a checkout (default this one), first on the path (no install)
    R=${1:-.}; S=/tmp/specsa_stage_$(echo "$R" | md5sum | cut -c1-8); rm -rf $S; mkdir -p $S
    cp -r "$R/python/specsa" $S/ && cp -r "$R/kernels" $S/specsa/kernels
    echo $S
}

need_sglang() {
    [ -n "${SGL:-}" ] || { echo "set SGL to the unpacked SGLang bundle" >&2; exit 2; }
    PYTHONPATH=$SGL python3 -c "import sglang, sglang.srt.entrypoints.http_server" \
        || { echo "SGLang at $SGL does not import (both bundle parts unpacked?)" >&2; exit 2; }
}

case "${1:-}" in
suite)
    gpu_info; S=$(stage)
    PYTHONPATH=$S timeout -s INT "${LIMIT:-560}" python3 -m pytest -n "${WORKERS:-16}" -v -rf \
        --tb=short -p no:cacheprovider ${TESTS:-test/kernels test/specsa} 2>&1 | tee "$OUT/pytest_gpu.log" \
        | grep -v PASSED | tail -30
    ;;
e2e)
    need_sglang; gpu_info
    M=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    if [ "$M" -gt 100000 ]; then B=1,16; else B=1,8; fi     # 16 x 32K fits only an H200's pool
    PYTHONPATH=$SGL timeout -s INT "${LIMIT:-540}" python3 benchmark/sglang_e2e.py --out "$OUT/e2e" \
        ${E2E_ARGS:---systems nsa_ar --variant specsa_chain=specsa_chain:SPECSA_STEP_TIMING= \
        --variant dense_ar=dense_ar:} \
        --contexts "${CONTEXTS:-32768,65536}" --batches "${BATCHES:-$B}" --new-tokens 128 \
        --budget-s "${BUDGET:-380}" 2>&1 | tee "$OUT/e2e.log" | tail -20
    ;;
sampling)
    need_sglang; gpu_info
    OUT=$OUT/sampling REQS=${REQS:-240} PYTHONPATH=$SGL timeout -s INT "${LIMIT:-560}" \
        python3 scripts/sglang_gpu_sampling_check.py 2>&1 | tee "$OUT/sampling.log" | tail -20
    ;;
kernels)
    gpu_info
    for R in . ${BASELINE:-}; do
        S=$(stage "$R"); C=$(cat "$R/COMMIT" 2>/dev/null || git -C "$R" rev-parse --short HEAD)
        (cd "$R" && PYTHONPATH=$S SPECSA_COMMIT=$C timeout -s INT "${LIMIT:-240}" python3 \
            benchmark/kernels.py --out "$OUT/kernels_$C" --only "${SECTIONS:-decode,refresh}" \
            --budget-s "${BUDGET:-120}" --reps "${REPS:-15}" 2>&1 | tee "$OUT/kernels_$C.log" \
            | grep -E "^(decode|refresh) " | cut -c1-240)
    done
    ;;
runtime-profile)
    gpu_info; S=$(stage)
    PYTHONPATH=$S timeout -s INT "${LIMIT:-420}" python3 benchmark/profile_runtime_steps.py \
        --out "$OUT/rt" --budget-s "${BUDGET:-200}" --reps 5 2>&1 | tee "$OUT/rt.log" | tail -12
    ;;
*)
    sed -n 2,14p "$0"; exit 2 ;;
esac
