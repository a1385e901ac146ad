#!/usr/bin/env bash
# engine.regroup off against on, fresh servers alternating on one GPU machine (2026-11-24,
# twentieth session): bench/profile_server.py at 64 clients (req/s, batch sizes, the worker's busy
# share, the regroup's waits), 8 front ends, 4 load-generator processes.
#   MODEL=<Qwen2-VL-2B-sized dir> OUT=<dir> CASES="short" ROUNDS=2 docs/bench/regroup/ab.sh
# engine.regroup was removed after this measurement: run it at commit 27dbe02, where it exists.
set -euo pipefail
mkdir -p "$OUT"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for v in ${VALUES:-off on}; do
    for case in ${CASES:-short}; do
      f="$OUT/$case-$v-$round.json"
      EMBEDDING__SERVER__FRONTENDS=8 EMBEDDING__ENGINE__REGROUP=$v timeout ${RUN_LIMIT:-150} python3 bench/profile_server.py \
        --cases "$case" --concurrency ${CLIENTS:-64} --duration ${DURATION:-8} --warmup ${WARMUP:-4} --model "$MODEL" \
        --device gpu --loadgen-processes 4 --top 5 --out "$f" > "$f.log" 2>&1 || { echo "$v $case failed"; tail -5 "$f.log"; continue; }
      python3 - "$f" "$v" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for c in (r if isinstance(r, list) else r.get("cases", [r])):
    l, b = c["load"], c["batches"]
    print(sys.argv[2], c["case"], "req/s", l["requests_per_s"], "p50", l["p50_ms"], "p95", l["p95_ms"],
          "errors", l.get("errors"), "batch", b["mean_items"], "busy", c["worker_busy_share"],
          "waits", b.get("regroup_waits"), "wait_s", b.get("regroup_wait_seconds"), "items", b.get("regroup_items"), flush=True)
PY
    done
  done
done
