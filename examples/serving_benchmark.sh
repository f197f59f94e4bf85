#!/usr/bin/env bash
# SGLang's bench_serving against a tiny NSA model, served without speculation and with
# `--speculative-algo specsa` (tree draft, self-drafting), on the CPU harness; JSON result in
# benchmark/results/serving_cpu.json. On a GPU drop --cpu (and SGLANG_PLATFORM).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-/tmp/specsa_tiny_nsa}
python -c "from specsa.model.tiny import build_tiny; build_tiny('$MODEL', kind='llama', seed=0)"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python benchmark/serving.py --model "$MODEL" --cpu \
    --num-prompts 8 --input-len 200 --output-len 32 --concurrency 4 \
    --topk 2 --steps 3 --draft-tokens 6 --out benchmark/results/serving_cpu.json
