#!/bin/bash
# The request path's change on the GPU machine: fresh servers of the base checkout ($BASE) and of
# this one, alternating, each profiled under 64 short-text clients (8 front ends, 4 load-generator
# processes): requests/s, each front end's CPU per request, the worker's batches.
#   MODEL=/tmp/m BASE=/tmp/base OUT=$OUT/ab ROUNDS=2 docs/bench/request-path-s21/gpu-ab.sh
set -u
mkdir -p "$OUT"
HERE=$PWD
for r in $(seq 1 "${ROUNDS:-2}"); do
  for side in new base; do
    dir=$HERE; [ "$side" = base ] && dir=$BASE
    (cd "$dir" && EMBEDDING__SERVER__FRONTENDS=8 python3 bench/profile_server.py --cases ${CASES:-short} \
      --concurrency 64 --duration 8 --warmup 12 --model "$MODEL" --device "${DEVICE:-gpu}" --loadgen-processes 4 --top 5 \
      --out "$OUT/$side-$r.json" > "$OUT/$side-$r.txt" 2>&1)
    python3 - "$OUT/$side-$r.json" "$side" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for c in d["cases"]:
    kids = c["children"]  # the front-end processes
    print(sys.argv[2], c["case"], c["load"]["requests_per_s"], "req/s, p50", c["load"]["p50_ms"], "ms; batch",
          c["batches"]["mean_items"], "; worker busy", c.get("worker_busy_share"), "; front ends",
          round(sum(k["cpu_ms_per_request"] for k in kids), 3), "CPU ms per request,",
          round(sum(k["cores"] for k in kids), 2), "cores; machine", c["cores"], flush=True)
PY
  done
done
