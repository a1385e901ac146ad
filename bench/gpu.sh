#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md, on an NVIDIA machine with mlx-cuda-13 and the server's
# dependencies installed (../shared/tools/gpu-wheels.sh says how, where no registry is reachable).
#   TOKENIZER_FROM=<a `models make-tiny` dir> bench/gpu.sh
# Env: MODEL (where the Qwen2-VL-2B-sized random embedder is written, made once), RAW (raw ceilings
# to measure), RAW_FROM (an earlier result to start from), SYSTEMS (servers; empty: raw ceilings
# only), OUT_DIR, OUT_NAME, ROUNDS (raw ceilings and servers alternating, paired ratios). Each level
# runs 3 s unmeasured first: MLX's CUDA backend compiles each new batch shape once
# (engine/shapes.py), and the steady state is what a server lives in. Four load-generator
# processes: one could not send 448-pixel image requests fast enough (111 against 122 req/s, p95
# 1.7 s against 0.8 s; docs/benchmarks.md, "Paired rounds").
set -euo pipefail
MODEL=${MODEL:-/tmp/qwen2-vl-2b-sized}
OUT_DIR=${OUT_DIR:-docs/bench}
[ -d "$MODEL" ] || python3 -m tkr_embed.benchmark.sized_model "$MODEL" --tokenizer-from "$TOKENIZER_FROM"
python3 -m tkr_embed bench --systems ${SYSTEMS-tkr-embed} --raw ${RAW-mlx-engine torch} ${RAW_FROM:+--raw-from "$RAW_FROM"} \
  --cases short long image fused --text-model "$MODEL" --multimodal-model "$MODEL" --device gpu --dtype bfloat16 \
  --image-side 448 --raw-batch 1 8 32 64 --raw-seconds 2 --concurrency 1 8 32 64 --duration 5 --warmup 3 --prebuild-rate 150 \
  --loadgen-processes 4 --rounds ${ROUNDS:-1} \
  --out "$OUT_DIR/${OUT_NAME:-gpu.json}"
