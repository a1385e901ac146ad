#!/usr/bin/env bash
# A/B of one server setting, alternating, in one run on one machine: each variant's server is
# started fresh, warmed and measured in turn, twice, so drift hits both alike.
#   VAR=EMBEDDING__ENGINE__PIPELINE_DEPTH VALUES="1 2" ROUNDS=2 bench/ab_env.sh <tkr-embed bench args...>
# Writes $OUT_DIR/ab-<value>-<round>.json and prints one line per run.
set -euo pipefail
OUT_DIR=${OUT_DIR:-/tmp}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for v in $VALUES; do
    out="$OUT_DIR/ab-$v-$round.json"
    env "$VAR=$v" python3 -m tkr_embed bench --systems tkr-embed --raw "$@" --out "$out" > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
    python3 - "$out" "$VAR=$v" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for case, systems in r["servers"].items():
    for row in systems["tkr-embed"]:
        print(sys.argv[2], case, row["concurrency"], "req/s", row["requests_per_s"], "p50", row["p50_ms"], "p95", row["p95_ms"], "errors", row["errors"])
PY
  done
done
